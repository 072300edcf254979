"""data.py readers, templates, label masking and batching."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import data


class CharTok:
    """A character-level tokenizer with the interface of model.Tokenizer (ids = code points + 3)."""
    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text, add_bos=False):
        return ([self.bos_id] if add_bos else []) + [ord(c) + 3 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_detect_formats(tmp_path):
    alp = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "input": "", "output": "hi"}])
    gsm = tmp_path / "g.json"
    gsm.write_text(json.dumps([{"question": "1+1?", "answer": "1+1=2\n#### 2"}]))
    gen = tmp_path / "p.json"
    gen.write_text(json.dumps({"data": [{"prompt": "p", "response": "r"}]}))
    assert data.detect_format(data.read_records(alp)) == "alpaca"
    assert data.detect_format(data.read_records(gsm)) == "gsm8k"
    assert data.detect_format(data.read_records(gen)) == "prompt_response"


def test_missing_fields_error_names_file_and_fields(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no fields here"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl.*instruction/output.*question/answer.*'text'"):
        data.detect_format(data.read_records(bad), bad)


def test_templates():
    p, r = data.format_example({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "alpaca")
    assert p.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n") and r == "5"
    assert "paired with an input" in p
    p, _ = data.format_example({"instruction": "Add.", "input": "", "output": "5"}, "alpaca")
    assert "### Input" not in p and p.endswith("### Instruction:\nAdd.\n\n### Response:\n")
    p, r = data.format_example({"question": "How many?", "answer": "3+4=<<3+4=7>>7 apples.\n#### 7"}, "gsm8k")
    assert p == "How many?\nAnswer the above question. First think step by step and then answer the final number.\n"
    assert r == "3+4=<<3+4=7>>7 apples.\nThe final answer is: 7" and "####" not in r


def test_label_mask_covers_exactly_the_prompt():
    tok = CharTok()
    ids, labels = data.tokenize_example(tok, "Q: x?\n", "yes")
    assert ids == [1] + tok.encode("Q: x?\n") + tok.encode("yes") + [2]
    n_prompt = 1 + len("Q: x?\n")
    assert labels[:n_prompt] == [data.IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]  # response and EOS are learned


def test_bad_records_counted_not_silently_dropped(tmp_path):
    recs = [
        {"question": "ok?", "answer": "fine\n#### 1"},
        {"question": "no answer"},                           # missing field
        {"question": "   ", "answer": "#### 2"},              # empty prompt
        {"question": "long " * 50, "answer": "#### 3"},       # over-long
        {"question": "ok2?", "answer": "good\n#### 4"},
    ]
    path = write_jsonl(tmp_path / "g.jsonl", recs)
    ex, rep = data.load_examples(path, CharTok(), max_len=120)
    assert (rep.total, rep.kept, rep.missing_fields, rep.empty, rep.too_long) == (5, 2, 1, 1, 1)
    assert rep.examples == {"missing fields": 1, "empty": 2, "over-long": 3}
    assert "2/5 examples kept" in str(rep) and "1 over-long (first: record 3)" in str(rep)
    assert len(ex) == 2


def test_no_usable_examples_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "x" * 500, "answer": "#### 1"}])
    with pytest.raises(ValueError, match="no usable examples.*over-long"):
        data.load_examples(path, CharTok(), max_len=64)


def test_collate_padding_sides():
    ex = [([5, 6, 7], [-100, 6, 7]), ([8], [8])]
    ids, labels, mask = data.collate_right(ex, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = data.collate_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=200), st.integers(1, 8), st.integers(0, 5),
       st.integers(0, 3))
def test_length_sorted_batches_partition_and_determinism(lengths, bs, seed, epoch):
    batches = data.length_sorted_batches(lengths, bs, seed, epoch, bucket=4)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))                   # every example exactly once per epoch
    assert all(1 <= len(b) <= bs for b in batches)
    assert batches == data.length_sorted_batches(lengths, bs, seed, epoch, bucket=4)  # replayable
    for b in batches:                                          # sorted within a bucket: a batch spans a short range
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)


def test_split_examples_disjoint_seeded():
    ex = [([i], [i]) for i in range(20)]
    tr, ho = data.split_examples(ex, 5, seed=3)
    assert len(ho) == 5 and len(tr) == 15 and not {e[0][0] for e in tr} & {e[0][0] for e in ho}
    assert data.split_examples(ex, 5, seed=3) == (tr, ho)
    assert data.split_examples(ex, 5, seed=4) != (tr, ho)


def test_text_token_stream_separates_documents():
    tok = CharTok()
    ids = data.text_token_stream(tok, "ab\ncd\n\n\nef\n")
    assert ids == tok.encode("ab\ncd") + [2] + tok.encode("ef") + [2]


def test_text_file_is_language_modelling_windows(tmp_path):
    tok = CharTok()
    path = tmp_path / "t.txt"
    path.write_text("abcdef\n\nghij\n\n")
    ex, rep = data.load_examples(path, tok, max_len=4)
    stream = tok.encode("abcdef") + [2] + tok.encode("ghij") + [2]     # 12 tokens -> 3 windows of 4
    assert rep.format == "text" and rep.kept == rep.total == 3
    assert [ids for ids, _ in ex] == [stream[0:4], stream[4:8], stream[8:12]]
    assert all(ids == labels for ids, labels in ex)                    # every token learned
    with pytest.raises(ValueError, match="fewer than one window"):
        data.load_examples(path, tok, max_len=100)
