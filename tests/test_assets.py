"""Demo assets: the converted checkpoint, its tokenizer, the Wikipedia and GSM8K splits; and the pure
pieces of data.py and demo.py behind them (markup stripping, splits, q/k permutation, checked extraction),
which need no assets."""
import json
import random
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from tokenizers import Tokenizer

import data
import demo

# ---------------------------------------------------------------------------------------------- no assets needed


def test_permute_qk_matches_llama_cpp_layout():
    # one head, head_dim 6: HF rotate-half rows (0 1 2 | 3 4 5) are stored interleaved as (0 3 1 4 2 5)
    w = torch.arange(6.0)[:, None]
    assert demo.permute_qk(w, 1).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert demo.unpermute_qk(torch.tensor([0, 3, 1, 4, 2, 5.0])[:, None], 1).flatten().tolist() == list(range(6))


@settings(max_examples=30, deadline=None)
@given(n_head=st.integers(1, 9), half=st.integers(1, 8), cols=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_unpermute_qk_inverts_permute_qk(n_head, half, cols, seed):
    w = torch.randn(n_head * 2 * half, cols, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(demo.unpermute_qk(demo.permute_qk(w, n_head), n_head), w)
    assert torch.equal(demo.permute_qk(demo.unpermute_qk(w, n_head), n_head), w)
    # numpy arrays (what GGUF dequantization gives) take the same path
    assert np.array_equal(demo.unpermute_qk(demo.permute_qk(w.numpy(), n_head), n_head), w.numpy())


def test_unpermute_qk_rejects_rows_not_divisible():
    with pytest.raises(ValueError, match="multiple of 2 \\* n_head = 6"):
        demo.unpermute_qk(torch.zeros(9, 4), 3)


def test_hf_names():
    assert demo.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert demo.hf_name("output_norm.weight") == "model.norm.weight"
    assert demo.hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert demo.hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    with pytest.raises(ValueError, match="blk.0.attn_qkv.weight"):
        demo.hf_name("blk.0.attn_qkv.weight")


@pytest.mark.parametrize("wiki, plain", [
    ("'''Anarchism''' is a [[political philosophy]].", "Anarchism is a political philosophy."),
    ("a [[self-governance|self-governed]] society", "a self-governed society"),
    ("x{{cite book|title={{nested|y}}|page=3}} z", "x z"),
    ("Text.<ref name=a>{{cite web|url=http://a}}</ref> More.<ref name=b/>", "Text. More."),
    ("[[File:A.jpg|thumb|A [[link]] in a caption]]\nKept.", "Kept."),
    ("[[Image:B.png|left|x]]Kept.[[Category:Things]][[de:Dinge]]", "Kept."),
    ("See [http://example.com the site] and [http://example.com].", "See the site and."),
    ("== History ==\n=== Early ===\n* first\n# second\n: indented", "History\nEarly\nfirst\nsecond\nindented"),
    ("{| class=wikitable\n|-\n| a || {{x}} \n|}\nAfter.", "After."),
    ("a <!-- hidden [[x]] --> b &amp; <small>c</small><br/>d", "a b & c\nd"),
    ("An area of {{convert|52419|sqmi|km2}}, in {{lang|fr|{{small|[[Paris|la ville]]}}}}.",
     "An area of 52419 sqmi, in la ville."),
    ("Apollo ({{lang-grc|x}}) is a god.", "Apollo is a god."),
    ("Body.\n== See also ==\n* [[Other]]\n== References ==\n{{reflist}}", "Body."),
    ("[[Edge of space|altitude of {{convert|100|km|mi|sp=us}}]] up", "altitude of 100 km up"),
])
def test_strip_wiki_markup(wiki, plain):
    assert data.strip_wiki_markup(wiki) == plain


def test_iter_wiki_articles_skips_redirects_other_namespaces_and_empty_pages():
    import io
    xml = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
      <page><title>Redir</title><ns>0</ns><redirect title="X"/><revision><text>#REDIRECT [[X]]</text></revision></page>
      <page><title>Wikipedia:Policy</title><ns>4</ns><revision><text>Policy text.</text></revision></page>
      <page><title>Empty</title><ns>0</ns><revision><text>{{stub}}</text></revision></page>
      <page><title>Real</title><ns>0</ns><revision><text>'''Real''' text.\n\nSecond paragraph.</text></revision></page>
    </mediawiki>"""
    assert list(data.iter_wiki_articles(io.BytesIO(xml.encode()))) == [("Real", "Real text.\nSecond paragraph.")]


def test_split_articles_synthetic_disjoint_deterministic_order_free():
    articles = [f"Title {i}\nbody {i}" for i in range(50)]
    train, test = data.split_articles(articles, 0.1)
    assert (len(train), len(test)) == (45, 5)
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(articles)
    assert data.split_articles(articles, 0.1) == (train, test)
    shuffled = articles[:]
    random.Random(0).shuffle(shuffled)
    tr2, te2 = data.split_articles(shuffled, 0.1)
    assert set(tr2) == set(train) and set(te2) == set(test)
    with pytest.raises(ValueError, match="unique"):
        data.split_articles(["T\na", "T\nb"])


def test_gsm8k_answer_number():
    assert data.gsm8k_answer_number("so 16-3-4=9\n#### 18") == "18"
    assert data.gsm8k_answer_number("#### 1,450,000") == "1450000"
    assert data.gsm8k_answer_number("a #### b\n#### -3") == "-3"
    with pytest.raises(ValueError, match="no '####'"):
        data.gsm8k_answer_number("the answer is 5")
    with pytest.raises(ValueError, match="not a number"):
        data.gsm8k_answer_number("#### five")


def test_readers_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.read_text(tmp_path / "nope.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:3"):
        data.read_jsonl(bad)


def _wheel(tmp_path, member, payload):
    path = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
    return path


def test_extract_member_checks_sha256_and_names_missing_member(tmp_path):
    import hashlib
    payload = b"hello"
    wheel = _wheel(tmp_path, "pkg/data.txt", payload)
    good = demo.WheelMember("pkg", "1.0", "pkg/data.txt", hashlib.sha256(payload).hexdigest())
    assert demo.extract_member(good, wheel, tmp_path / "out" / "data.txt").read_bytes() == payload
    bad = demo.WheelMember("pkg", "1.0", "pkg/data.txt", "0" * 64)
    with pytest.raises(ValueError, match="checksum mismatch for pkg/data.txt"):
        demo.extract_member(bad, wheel, tmp_path / "out2" / "data.txt")
    assert not (tmp_path / "out2" / "data.txt").exists()  # nothing half-written left behind
    assert list((tmp_path / "out2").iterdir()) == []
    missing = demo.WheelMember("pkg", "1.0", "pkg/other.bin", "0" * 64)
    with pytest.raises(FileNotFoundError, match="pkg/other.bin not found in pkg-1.0-py3-none-any.whl"):
        demo.extract_member(missing, wheel, tmp_path / "out3" / "other.bin")


def test_is_complete_detects_missing_or_changed_outputs(tmp_path):
    spec = demo.WheelMember("pkg", "1.0", "pkg/x", "ab" * 32)
    (tmp_path / "a.txt").write_text("abc")
    assert not demo.is_complete(tmp_path, spec)  # no SOURCE.json yet
    data.write_json(tmp_path / "SOURCE.json", demo._source_record(spec, ["a.txt"], tmp_path))
    assert demo.is_complete(tmp_path, spec)
    assert not demo.is_complete(tmp_path, demo.WheelMember("pkg", "1.1", "pkg/x", "cd" * 32))
    (tmp_path / "a.txt").write_text("abcd")  # truncated or rewritten output
    assert not demo.is_complete(tmp_path, spec)


# ---------------------------------------------------------------------------------------------- the demo assets


@pytest.mark.demo_assets
def test_checkpoint_names_and_shapes_match_config(assets):
    folder = assets / "smollm2-135m"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    assert hd * cfg["num_attention_heads"] == d
    want = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        want |= {p + "self_attn.q_proj.weight": (cfg["num_attention_heads"] * hd, d),
                 p + "self_attn.k_proj.weight": (cfg["num_key_value_heads"] * hd, d),
                 p + "self_attn.v_proj.weight": (cfg["num_key_value_heads"] * hd, d),
                 p + "self_attn.o_proj.weight": (d, cfg["num_attention_heads"] * hd),
                 p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                 p + "mlp.down_proj.weight": (d, f),
                 p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
    with safe_open(str(folder / "model.safetensors"), "pt") as sf:
        assert set(sf.keys()) == set(want)
        for name, shape in want.items():
            assert tuple(sf.get_slice(name).get_shape()) == shape, name
        q = sf.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert q.dtype == torch.float32 and torch.isfinite(q).all() and q.abs().max() > 0
    src = json.loads((folder / "SOURCE.json").read_text())
    assert src["license"] == "Apache-2.0" and len(src["sha256"]) == 64


@pytest.fixture(scope="module")
def tokenizer(assets):
    return Tokenizer.from_file(str(assets / "smollm2-135m" / "tokenizer.json"))


@pytest.mark.demo_assets
def test_tokenizer_round_trips_digits_utf8_and_special_tokens(tokenizer, assets):
    text = "<|im_start|>user\nIn 2024, café costs 3.50 € — 日本語 🙂🚀<|im_end|>\n<|endoftext|>"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    cfg = json.loads((assets / "smollm2-135m" / "config.json").read_text())
    assert ids[0] == cfg["bos_token_id"] and ids.count(cfg["eos_token_id"]) == 1  # special tokens are single ids
    assert tokenizer.id_to_token(0) == "<|endoftext|>" and 0 in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nIn 2024, café costs 3.50 € — 日本語 🙂🚀\n"
    # digits: one token each, whatever the surrounding text
    for number in ("2024", "1234567890", "x99y"):
        pieces = [tokenizer.decode([i]) for i in tokenizer.encode(number).ids]
        assert [p for p in pieces if any(c.isdigit() for c in p)] == [c for c in number if c.isdigit()]


@pytest.mark.demo_assets
def test_tokenizer_config_has_special_tokens_and_chat_template(assets):
    tc = json.loads((assets / "smollm2-135m" / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "<|im_start|>" in tc["chat_template"] and "add_generation_prompt" in tc["chat_template"]


@pytest.mark.demo_assets
def test_wiki_split_disjoint_deterministic_and_clean(assets):
    train = data.read_articles(assets / "wikitext" / "train.txt")
    test = data.read_articles(assets / "wikitext" / "test.txt")
    assert len(test) >= 5 and len(train) >= 9 * len(test) - 9
    titles_train = {a.split("\n", 1)[0] for a in train}
    titles_test = {a.split("\n", 1)[0] for a in test}
    assert titles_train.isdisjoint(titles_test) and set(train).isdisjoint(test)
    assert data.split_articles(train + test, demo.WIKI_TEST_FRACTION) == (train, test)  # re-splitting: the same
    for name in ("train.txt", "test.txt"):
        text = data.read_text(assets / "wikitext" / name)
        for leftover in ("[[", "]]", "{{", "}}", "<ref", "'''", "\n\n\n"):
            assert leftover not in text, (name, leftover)


@pytest.mark.demo_assets
def test_gsm8k_split(assets):
    train = data.read_jsonl(assets / "gsm8k" / "train.jsonl")
    test = data.read_jsonl(assets / "gsm8k" / "test.jsonl")
    assert (len(train), len(test)) == (1319 - demo.GSM8K_N_TEST, demo.GSM8K_N_TEST)
    assert {r["question"] for r in train}.isdisjoint(r["question"] for r in test)
    for r in train + test:
        float(data.gsm8k_answer_number(r["answer"]))
    src = json.loads((assets / "gsm8k" / "SOURCE.json").read_text())
    assert src["license"] == "MIT"
