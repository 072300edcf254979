"""eval.py: answer extraction, perplexity, GSM8K and multiple-choice scoring on a tiny random model."""
import json
import math

import pytest
import torch

import eval as ev
import model as model_lib
from test_train import CORPUS, GSM, make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_eval")
    make_tiny_model(root / "model", seed=1)
    m = model_lib.from_pretrained(root / "model")
    tok = model_lib.Tokenizer.from_pretrained(root / "model")
    return root, m, tok


@pytest.mark.parametrize("text, expected", [
    ("She has 3+4=7 apples.\nThe final answer is: 7", 7.0),
    ("The final answer is: 1,234 dollars, not 5", 1234.0),           # commas removed; first number after it
    ("The final answer is: -3.5 degrees", -3.5),
    ("2 + 2 = 4, so he keeps 4. Then 10 more makes 14.", 14.0),      # no marker: the last number
    ("The final answer is: unknown; we had 12 and 13", 12.0),  # the first number anywhere after the marker
    ("We had 12 and 13. The final answer is: unknown", 13.0),  # none after the marker: the last number
    ("The final answer is: 18.", 18.0),                               # a sentence's full stop is not a decimal
    ("no number at all", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert ev.extract_answer(text) == expected


def test_gold_and_equality():
    assert ev.gold_answer("3+4=<<3+4=7>>7\n#### 1,007") == 1007.0
    assert ev.is_correct(7.0, 7.0) and ev.is_correct(7.0000000001, 7.0)
    assert not ev.is_correct(None, 7.0) and not ev.is_correct(7.1, 7.0)


def test_window_starts():
    assert ev.window_starts(100, 10) == list(range(0, 100, 10))
    assert ev.window_starts(105, 10, limit=3) == [0, 40, 90]        # evenly spaced, first and last kept
    assert ev.window_starts(100, 10, limit=50) == list(range(0, 100, 10))
    with pytest.raises(ValueError, match="fewer than one window"):
        ev.window_starts(5, 10)


def test_perplexity_equals_exp_mean_nll(tiny):
    _, m, tok = tiny
    ids = tok.encode(" ".join(CORPUS))
    seq = 16
    res = ev.perplexity(m, ids, seq, batch_size=3)
    nll, n = 0.0, 0                       # independent: one window at a time, token by token
    for s in range(0, len(ids) - seq + 1, seq):
        w = ids[s:s + seq]
        with torch.no_grad():
            logp = torch.log_softmax(m(torch.tensor([w]))[0].double(), -1)
        nll -= sum(logp[t - 1, w[t]].item() for t in range(1, seq))
        n += seq - 1
    assert res["tokens"] == n == (len(ids) // seq) * (seq - 1)
    assert res["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_gsm8k_scoring(tiny, monkeypatch):
    _, m, tok = tiny
    recs = GSM[:4]
    # a model that answers every question with its gold solution scores 1; one always saying 0 scores 0
    answers = {}
    for r in recs:
        prompt = tok.encode(ev.data.format_example(r, "gsm8k")[0])
        answers[tuple(prompt)] = r["answer"].replace("####", "The final answer is:")

    def fake_generate(model, prompts, max_new_tokens, eos_id=None, **kw):
        return [tok.encode(answers[tuple(p)]) for p in prompts]
    monkeypatch.setattr(ev.model_lib, "generate", fake_generate)
    assert ev.gsm8k(m, tok, recs, batch_size=3)["accuracy"] == 1.0
    monkeypatch.setattr(ev.model_lib, "generate", lambda model, prompts, *a, **k: [tok.encode("0") for _ in prompts])
    assert ev.gsm8k(m, tok, recs, batch_size=3)["accuracy"] == 0.0


def test_gsm8k_cli_real_generation(tiny, tmp_path):
    root, _, _ = tiny
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in GSM) + "\n")
    out = tmp_path / "res.json"
    res = ev.main(["--model", str(root / "model"), "--task", "gsm8k", "--data", str(path), "--limit", "3",
                   "--max-new-tokens", "4", "--batch-size", "2", "--out", str(out), "--quiet"])
    saved = json.loads(out.read_text())
    assert saved["n"] == 3 and 0.0 <= saved["accuracy"] <= 1.0 and len(saved["samples"]) == 3
    assert res["accuracy"] == saved["accuracy"]


def test_choice_logprobs_against_manual(tiny):
    _, m, tok = tiny
    ctx, choices = "Tom has 3 apples", [" and buys 4 more.", " river", " stone and apple"]
    got = ev.choice_logprobs(m, tok, ctx, choices)
    for c, lp in zip(choices, got):
        a, b = tok.encode(ctx), tok.encode(c)
        with torch.no_grad():
            logp = torch.log_softmax(m(torch.tensor([a + b]))[0], -1)
        ref = sum(logp[len(a) + j - 1, t].item() for j, t in enumerate(b))
        assert lp == pytest.approx(ref, abs=1e-4)


def test_multiple_choice_acc_and_norm(tiny, monkeypatch, tmp_path):
    root, m, tok = tiny
    # raw log-likelihood prefers the short choice, per-byte normalization the long one
    monkeypatch.setattr(ev, "choice_logprobs", lambda model, tok, ctx, choices, max_len=1024: [-2.0, -3.0])
    recs = [{"context": "Q", "choices": ["ab", "abcdefgh"], "label": 1}]
    res = ev.multiple_choice(m, tok, recs)
    assert (res["acc"], res["acc_norm"]) == (0.0, 1.0)
    monkeypatch.undo()
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps({"context": c[:20], "choices": [" apple", " river"], "label": i % 2})
                              for i, c in enumerate(CORPUS)) + "\n")
    res = ev.main(["--model", str(root / "model"), "--task", "mc", "--data", str(path), "--quiet"])
    assert res["n"] == len(CORPUS) and 0 <= res["acc"] <= 1 and 0 <= res["acc_norm"] <= 1
    path.write_text(json.dumps({"context": "x", "choices": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="no field 'label'"):
        ev.main(["--model", str(root / "model"), "--task", "mc", "--data", str(path), "--quiet"])


def test_bad_inputs(tiny, tmp_path):
    root, _, _ = tiny
    with pytest.raises(FileNotFoundError, match="--data"):
        ev.main(["--model", str(root / "model"), "--task", "ppl", "--data", str(tmp_path / "none.txt")])
    (tmp_path / "t.txt").write_text("short")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ev.main(["--model", str(tmp_path), "--task", "ppl", "--data", str(tmp_path / "t.txt")])
    with pytest.raises(ValueError, match="--adapter needs --quantized"):
        ev.main(["--model", str(root / "model"), "--task", "ppl", "--data", str(tmp_path / "t.txt"),
                 "--adapter", "a.safetensors"])
