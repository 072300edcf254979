"""train.py end to end on a tiny random model (hidden 64, 2 layers), in-process and in seconds."""
import dataclasses
import json
import math

import pytest
import torch

import data
import model as model_lib
import qwha
import train
from eval import load_model

CORPUS = [
    "The cat sat on the mat. The dog ran to the park and back again.",
    "Numbers like 12, 345 and 6789 appear in text; so do words such as apple, river and stone.",
    "Tom has 3 apples and buys 4 more. How many apples does Tom have now?",
    "Answer the above question. First think step by step and then answer the final number.",
    "The final answer is: 7",
]
GSM = [
    {"question": f"Tom has {a} apples and buys {b} more. How many apples?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
    for a, b in [(3, 4), (5, 2), (1, 1), (6, 3), (2, 7), (4, 4), (9, 1), (8, 0), (2, 2), (3, 3)]
]


def make_tokenizer(folder):
    """A byte-level BPE trained on CORPUS, with <s>, </s>, <pad>; written as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    return tok.get_vocab_size()


def make_tiny_model(folder, seed=0):
    """A random LLaMA (hidden 64, 2 layers, GQA 4/2 heads, MLP 128) saved with model.save_pretrained."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder)
    cfg = model_lib.ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0)
    m = model_lib.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=g) * 0.08)
    model_lib.save_pretrained(m, folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_model(root / "model")
    (root / "gsm.jsonl").write_text("\n".join(json.dumps(r) for r in GSM) + "\n")
    (root / "calib.txt").write_text("\n\n".join(CORPUS * 4))
    return root


def argv(tiny, out, *extra):
    return ["--model", str(tiny / "model"), "--bits", "2", "--group-size", "32", "--rank", "4",
            "--data", str(tiny / "gsm.jsonl"), "--calib", str(tiny / "calib.txt"), "--n-calib", "4",
            "--calib-len", "32", "--n-eval", "2", "--batch-size", "2", "--max-len", "128", "--lr", "1e-2",
            "--out", str(out), "--quiet", "--device", "cpu", *extra]   # CPU unless extra says otherwise


def logits_of(m, ids):
    with torch.no_grad():
        return m(torch.tensor([ids]))[0]


def test_pipeline_end_to_end(tiny, tmp_path):
    out = tmp_path / "run"
    record, m = train.run(train.parse_args(argv(tiny, out, "--steps", "3", "--eval-every", "3")))
    for f in ("quantized.safetensors", "adapter.safetensors", "config.json", "log.jsonl", "checkpoint.pt"):
        assert (out / f).is_file(), f
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["bits"] == 2 and saved["train"]["steps"] == 3 and saved["data"]["format"] == "gsm8k"
    assert saved["init"]["err_refined"] < saved["init"]["err_before"]   # the init cancels part of the error
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tok_per_s"] > 0 for r in steps)
    assert [r["step"] for r in log if "eval_loss" in r] == [0, 3]
    # save -> reload -> same outputs; the base on disk is 2-bit, only adapter values are trainable
    reloaded, tok = load_model(tiny / "model", out / "quantized.safetensors", out / "adapter.safetensors")
    adapters = qwha.adapters(reloaded)
    assert len(adapters) == 14 and all(a.base.bits == 2 for a in adapters.values())
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {f"{n}.values" for n in adapters}
    ids = tok.encode("Tom has 3 apples and buys 4 more.")
    m.eval()
    assert torch.equal(logits_of(reloaded, ids), logits_of(m, ids))
    ev = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert ev[0] != ev[1]                                             # the values did move
    # the merged dense export loads with from_pretrained and matches up to bf16 rounding
    train.merge_export(m, out / "merged", tiny / "model")
    merged = model_lib.from_pretrained(out / "merged")
    a, b = logits_of(merged, ids), logits_of(reloaded, ids)
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert model_lib.Tokenizer.from_pretrained(out / "merged").encode("apples") == tok.encode("apples")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pipeline_on_cuda(tiny, tmp_path):
    """train.py's GPU path: bf16 autocast, the packed QuantLinear base (no dense copy), the merged backward with a
    bf16 output gradient for fp32 inputs; the saved adapter reloads to the same outputs."""
    out = tmp_path / "run"
    record, m = train.run(train.parse_args(argv(tiny, out, "--steps", "2", "--eval-every", "2", "--device", "cuda")))
    assert all(p.is_cuda for p in m.parameters())
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in steps)
    reloaded, tok = load_model(tiny / "model", out / "quantized.safetensors", out / "adapter.safetensors")
    ids = torch.tensor([tok.encode("Tom has 3 apples and buys 4 more.")])
    m.eval()
    with torch.no_grad():
        a, b = m(ids.cuda()).cpu(), reloaded(ids)
    assert (a - b).abs().max() <= 1e-3 * b.abs().max()


def test_resume_equals_uninterrupted(tiny, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    # the first run writes the Hessians and the quantized base; the second reuses them (stage caching)
    cache = ["--hessians", str(tmp_path / "h.safetensors"), "--quantized", str(tmp_path / "q.safetensors")]
    train.main(argv(tiny, full, "--steps", "6", "--eval-every", "2", *cache))
    assert (tmp_path / "h.safetensors").is_file() and (tmp_path / "q.safetensors").is_file()
    train.main(argv(tiny, part, "--steps", "6", "--eval-every", "2", "--stop-after", "3", *cache))
    first = [json.loads(line) for line in (part / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in first) == 3
    train.main(argv(tiny, part, "--steps", "6", "--eval-every", "2", "--resume", *cache))
    rows = lambda d: [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    losses = lambda d: [(r["step"], r["loss"], r["lr"]) for r in rows(d) if "loss" in r]  # noqa: E731
    assert losses(part) == losses(full)            # bitwise: same batches, same optimizer and scheduler state
    evals = lambda d: [(r["step"], r["eval_loss"]) for r in rows(d) if "eval_loss" in r]  # noqa: E731
    assert evals(part) == evals(full)
    from safetensors.torch import load_file
    a, b = load_file(str(full / "adapter.safetensors")), load_file(str(part / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantized_file_from_other_gptq_settings_is_refused(tiny, tmp_path):
    q = ["--quantized", str(tmp_path / "q.safetensors")]
    train.main(argv(tiny, tmp_path / "a", "--steps", "0", *q))                 # writes q with train.py's defaults
    with pytest.raises(ValueError, match="gptq_cd_passes=2.*gptq_cd_passes=0"):
        train.main(argv(tiny, tmp_path / "b", "--steps", "0", "--gptq-cd-passes", "0", *q))
    train.main(argv(tiny, tmp_path / "c", "--steps", "0", *q))                 # same settings: reused


def test_resume_refuses_changed_settings(tiny, tmp_path):
    out = tmp_path / "run"
    train.main(argv(tiny, out, "--steps", "4", "--stop-after", "1"))
    with pytest.raises(ValueError, match="--lr"):
        train.main(argv(tiny, out, "--steps", "4", "--resume", "--lr", "0.5"))
    record = json.loads((out / "config.json").read_text())      # a config.json without the demo entry resumes too
    del record["train"]["demo"]
    (out / "config.json").write_text(json.dumps(record))
    assert train.main(argv(tiny, out, "--steps", "4", "--resume"))["train_result"]["steps_done"] == 4


def test_masked_loss_ignores_the_prompt(tiny):
    m = model_lib.from_pretrained(tiny / "model")
    tok = model_lib.Tokenizer.from_pretrained(tiny / "model")
    ex = [data.tokenize_example(tok, "Tom has 3 apples. How many?\n", "3 apples."),
          data.tokenize_example(tok, "Q?\n", "The final answer is: 7")]
    batch = data.collate_right(ex, pad_id=0)
    loss, n = train.loss_sum(m, batch, "cpu", autocast=False)
    ref, count = 0.0, 0          # independent: a loop over the response positions of each unpadded sequence
    for ids, labels in ex:
        logp = torch.log_softmax(logits_of(m, ids), -1)
        for t in range(1, len(ids)):
            if labels[t] != data.IGNORE_INDEX:
                ref -= logp[t - 1, ids[t]].item()
                count += 1
    assert n == count == sum(len(tok.encode(r)) + 1 for r in ("3 apples.", "The final answer is: 7"))
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    unmasked = [(ids, ids) for ids, _ in ex]          # the same tokens, prompt not masked: a different loss
    assert train.loss_sum(m, data.collate_right(unmasked, 0), "cpu", False)[1] > n


def test_lr_schedule():
    f = [train.lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.001


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Any model loading or calibration during validation fails the test."""
    def boom(*a, **k):
        raise AssertionError("heavy work started before the inputs were validated")
    monkeypatch.setattr(model_lib, "from_pretrained", boom)
    monkeypatch.setattr(train.calib, "collect_hessians", boom)
    monkeypatch.setattr(train.prepare, "prepare", boom)


def test_bad_inputs_stop_before_heavy_work(tiny, tmp_path, no_heavy_work):
    base = argv(tiny, tmp_path / "x", "--steps", "1")
    with pytest.raises(FileNotFoundError, match=r"--model .*nowhere"):
        train.main(["--model", str(tmp_path / "nowhere")] + base[2:])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        train.main(["--model", str(tmp_path / "empty")] + base[2:])
    with pytest.raises(ValueError, match=r"--bits 5: expected one of \(2, 3, 4\)"):
        train.main(base + ["--bits", "5"])
    with pytest.raises(ValueError, match=r"--swap-rounds -1: expected 0"):
        train.main(base + ["--swap-rounds", "-1"])
    with pytest.raises(ValueError, match=r"--init-workers -1: expected 0 \(auto\)"):
        train.main(base + ["--init-workers", "-1"])
    with pytest.raises(ValueError, match=r"--group-size 48 does not divide the input width 64 of q_proj"):
        train.main(base + ["--group-size", "48"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no usable fields"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl.*question/answer"):
        train.main(base + ["--data", str(bad)])
    with pytest.raises(FileNotFoundError, match=r"--data .*missing\.jsonl"):
        train.main(base + ["--data", str(tmp_path / "missing.jsonl")])
    with pytest.raises(ValueError, match="--rank"):
        train.main(base + ["--rank", "1", "--group-size", "32"] + ["--rank", "0"])
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        train.main(base + ["--resume"])
    odd = tmp_path / "odd"                       # hidden 88 = 11·8: no Hadamard matrix of that order
    odd.mkdir()
    cfg = json.loads((tiny / "model" / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "hidden_size": 88, "head_dim": 22}))
    with pytest.raises(ValueError, match="q_proj.*no Hadamard matrix for width 88"):
        train.main(["--model", str(odd)] + base[2:] + ["--group-size", "8"])


def test_init_workers_flag(monkeypatch):
    """--init-workers N is N; 0 is one worker per torch thread on a CPU and one on a GPU; and it reaches init_qwha."""
    cfg = train.parse_args(["--model", "m", "--device", "cpu"])
    assert cfg.init_workers == 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert train.init_workers(cfg) == 3
    cfg.device = "cuda:0"
    assert train.init_workers(cfg) == 1
    cfg.init_workers = 2
    assert train.init_workers(cfg) == 2
    seen = {}
    monkeypatch.setattr(train.qwha, "init_qwha", lambda *a, **kw: seen.update(kw) or [
        {"err_before": 1.0, "err_select": 1.0, "err_refined": 1.0, "rel_refined": 1.0}])
    train.init_adapters(None, {}, {}, cfg, lambda msg: None)
    assert seen["settings"].workers == 2


def test_swap_rounds_flag_reaches_the_init(tiny, tmp_path):
    """--swap-rounds goes to qwha.init_qwha: 0 is the paper's plain init, more rounds never raise a layer's error."""
    errs = {}
    for rounds in (0, 2):
        out = tmp_path / f"swaps{rounds}"
        train.run(train.parse_args(argv(tiny, out, "--steps", "0", "--swap-rounds", str(rounds))))
        saved = json.loads((out / "config.json").read_text())
        assert saved["train"]["swap_rounds"] == rounds
        errs[rounds] = [row["err_refined"] for row in saved["init"]["layers"]]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errs[0], errs[2]))
    assert sum(errs[2]) < sum(errs[0])          # the search did run and found better supports


# The settings of the demo run whose figures README and docs/performance.md show: what a run without --data has
# always resolved to. The resume-relevant ones, so a changed default that would change the demo's numbers fails here.
DEMO_RUN = {"model": "assets/smollm2-135m", "bits": 2, "group_size": 64, "rank": 8, "temperature": 1.0,
            "adapter": "wha", "transform_dims": 1, "select": "adaalloc", "refine": True, "qa_init": None,
            "swap_rounds": 2, "rule": "output", "greedy_steps": 8, "magr": False, "eval_data": None, "n_eval": 16,
            "n_calib": 32, "calib_len": 256, "steps": 40, "epochs": None, "lr": 5e-4, "warmup": 0.1,
            "weight_decay": 0.0, "batch_size": 2, "grad_accum": 1, "clip": 1.0, "max_len": 256, "seed": 0,
            "dtype": "float32", "act_order": True, "gptq_clip": True, "gptq_cd_passes": 2, "gptq_refit": True,
            "block_inputs": "fp"}


def test_demo_preset_resolves_to_the_demo_run(tmp_path, monkeypatch, capsys):
    """--demo, and no --data (the demo command without --demo), resolve to the demo run's settings; the second says
    so in one line. RESUME_KEYS are the fields marked resume, the settings a config.json is checked against."""
    gsm, wiki = tmp_path / "train.jsonl", tmp_path / "train.txt"
    gsm.write_text(json.dumps(GSM[0]) + "\n")
    wiki.write_text(CORPUS[0])
    monkeypatch.setitem(train.DEMO, "data", str(gsm))
    monkeypatch.setattr(train, "DEMO_CALIB", wiki)
    assert set(train.RESUME_KEYS) == set(DEMO_RUN) | {"data", "calib"}
    base = ["--model", "assets/smollm2-135m", "--bits", "2", "--out", "runs/demo"]
    for extra, note in (([], True), (["--demo"], False)):
        cfg = train.resolve_defaults(train.parse_args(base + extra))
        assert {k: getattr(cfg, k) for k in DEMO_RUN} == DEMO_RUN
        assert (cfg.data, cfg.calib, cfg.demo, cfg.out) == (str(gsm), str(wiki), True, "runs/demo")
        err = capsys.readouterr().err.splitlines()
        assert err == (["no --data: using the demo preset (--demo): GSM8K from assets/gsm8k, --rank 8, --steps 40, "
                        "--batch-size 2, --max-len 256, --n-eval 16"] if note else [])


def test_demo_preset_yields_to_flags_given():
    """Flags given win over --demo (an --epochs given drops its --steps); without --demo the fields' defaults hold."""
    cfg = train.resolve_defaults(train.parse_args(["--model", "m", "--demo", "--rank", "64", "--epochs", "2",
                                                   "--data", "mine.jsonl"]))
    assert (cfg.rank, cfg.steps, cfg.epochs, cfg.batch_size, cfg.data) == (64, None, 2.0, 2, "mine.jsonl")
    cfg = train.resolve_defaults(train.parse_args(["--model", "m", "--data", "d.jsonl", "--calib", "c.txt"]))
    assert (cfg.demo, cfg.rank, cfg.steps, cfg.epochs, cfg.batch_size, cfg.max_len, cfg.n_eval) == (
        False, 64, None, 1.0, 4, 512, 64)


def test_help_lists_every_field_with_its_help(capsys):
    """Each TrainConfig field is a flag of train.py --help with its help text and default (--demo's value beside)."""
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(train.TrainConfig):
        assert f.metadata.get("help"), f"TrainConfig.{f.name}: declare it with setting(default, help)"
        assert f"--{f.name.replace('_', '-')}" in text and " ".join(f.metadata["help"].split()) in text, f.name
    assert "held-out examples (default 64; --demo 16)" in text and "(default 0.0005)" in text
