"""Evaluate a model, a quantized model or a QWHA-adapted one: perplexity, GSM8K exact match, multiple choice.

    python eval.py --model assets/smollm2-135m --task ppl --data assets/wikitext/test.txt --limit 40
    python eval.py --model assets/smollm2-135m --quantized runs/demo/quantized.safetensors \
        --adapter runs/demo/adapter.safetensors --task gsm8k --data assets/gsm8k/test.jsonl --limit 50

- ppl:   exp(mean NLL) over non-overlapping windows of --seq-len tokens of a text file (documents separated by
         blank lines, each closed by EOS); --limit N takes N windows evenly spaced over the file (a fixed subset).
- gsm8k: greedy, batched, KV-cached decoding of the GSM8K prompt; the prediction is the first number after
         "The final answer is:", else the last number of the completion (commas removed); numeric equality
         with the number after "####" in the reference answer.
- mc:    multiple-choice log-likelihood (lm-eval-harness style) over JSONL {context, choices, label}: acc takes
         the choice with the largest summed log-probability, acc_norm divides it by the choice's UTF-8 length.
Prints a table and writes the results as JSON (--out).
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import checks
import data
import gptq_format
import model as model_lib
import prepare
from checks import setting
from prepare import load_model  # noqa: F401  (public here too)

ANSWER_PREFIX = "The final answer is:"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


# ------------------------------------------------------------------------------------------- loading


# ------------------------------------------------------------------------------------------- perplexity


def window_starts(n_tokens: int, seq_len: int, limit: int | None = None) -> list[int]:
    """Starts of the non-overlapping windows of a stream; `limit` keeps that many, evenly spaced."""
    n = n_tokens // seq_len
    if n == 0:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than one window of --seq-len {seq_len}")
    idx = list(range(n))
    if limit is not None and limit < n:
        idx = sorted({round(i * (n - 1) / max(limit - 1, 1)) for i in range(limit)})
    return [i * seq_len for i in idx]


@torch.no_grad()
def perplexity(model, ids: list[int], seq_len: int, limit: int | None = None, batch_size: int = 4,
               progress: bool = False) -> dict:
    """exp(mean NLL of every token but each window's first) over non-overlapping windows of `ids`."""
    device = next(model.parameters()).device
    stream = torch.tensor(ids, dtype=torch.long)
    starts = window_starts(len(ids), seq_len, limit)
    nll, count, t0 = 0.0, 0, time.time()
    for b in range(0, len(starts), batch_size):
        x = torch.stack([stream[s:s + seq_len] for s in starts[b:b + batch_size]]).to(device)  # (B, T)
        logits = model(x).float()                                                             # (B, T, V)
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += x[:, 1:].numel()
        if progress:
            _progress(f"ppl window {min(b + batch_size, len(starts))}/{len(starts)}", t0,
                      min(b + batch_size, len(starts)) / len(starts))
    if progress:
        print(file=sys.stderr)
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(starts),
            "seq_len": seq_len}


# ------------------------------------------------------------------------------------------- GSM8K


def extract_answer(text: str) -> float | None:
    """First number after "The final answer is:", else the last number in the text; commas removed."""
    text = text.replace(",", "")
    if ANSWER_PREFIX in text:
        m = _NUMBER.search(text.split(ANSWER_PREFIX, 1)[1])
        if m:
            return float(m.group())
    nums = _NUMBER.findall(text)
    return float(nums[-1]) if nums else None


def gold_answer(answer: str) -> float:
    """The reference number of a GSM8K answer: what follows '####' (commas removed)."""
    return float(data.gsm8k_answer_number(answer))


def is_correct(pred: float | None, gold: float) -> bool:
    return pred is not None and math.isclose(pred, gold, rel_tol=0.0, abs_tol=1e-6)


@torch.no_grad()
def gsm8k(model, tok, records: list[dict], max_new_tokens: int = 256, batch_size: int = 8,
          progress: bool = False) -> dict:
    """Exact-match accuracy of greedy answers to GSM8K questions (the training template's prompt)."""
    add_bos = data.wants_bos(tok)
    prompts = [tok.encode(data.format_example(r, "gsm8k")[0], add_bos=add_bos) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    outputs: list[str] = [""] * len(prompts)
    t0 = time.time()
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]

        def tick(t, b=b):           # within the batch: its token t of at most max_new_tokens
            if progress:
                _progress(f"gsm8k {b}/{len(order)} done, batch of {len(idx)}: token {t}/{max_new_tokens}", t0,
                          (b + len(idx) * t / max_new_tokens) / len(order))
        gen = model_lib.generate(model, [prompts[i] for i in idx], max_new_tokens, tok.eos_ids or tok.eos_id,
                                 pad_id=_pad_id(tok), on_token=tick)
        for i, g in zip(idx, gen):
            outputs[i] = tok.decode(g, skip_special_tokens=True)
        if progress:
            _progress(f"gsm8k {min(b + batch_size, len(order))}/{len(order)} done", t0,
                      min(b + batch_size, len(order)) / len(order))
    if progress:
        print(file=sys.stderr)
    rows = []
    for r, out in zip(records, outputs):
        gold, pred = gold_answer(r["answer"]), extract_answer(out)
        rows.append({"question": r["question"], "gold": gold, "pred": pred, "correct": is_correct(pred, gold),
                     "output": out})
    acc = sum(r["correct"] for r in rows) / len(rows)
    return {"accuracy": acc, "n": len(rows), "samples": rows}


# ------------------------------------------------------------------------------------------- multiple choice


@torch.no_grad()
def choice_logprobs(model, tok, context: str, choices: list[str], max_len: int = 1024) -> list[float]:
    """Summed log-probability of each choice's tokens after the context (context truncated from the left)."""
    device = next(model.parameters()).device
    ctx = tok.encode(context, add_bos=data.wants_bos(tok))
    seqs, spans = [], []
    for c in choices:
        cont = tok.encode(c)
        if not cont:
            raise ValueError(f"choice {c!r} has no tokens")
        ids = (ctx + cont)[-max_len:]
        seqs.append(ids)
        spans.append(len(ids) - len(cont))
    x, _labels, mask = data.collate_right([(s, s) for s in seqs], _pad_id(tok))
    logp = torch.log_softmax(model(x.to(device), attention_mask=mask.to(device)).float(), dim=-1)  # (C, T, V)
    out = []
    for k, (s, start) in enumerate(zip(seqs, spans)):
        tgt = torch.tensor(s[start:], device=device)
        out.append(logp[k, start - 1:len(s) - 1].gather(-1, tgt[:, None]).sum().item())
    return out


def multiple_choice(model, tok, records: list[dict], max_len: int = 1024, progress: bool = False) -> dict:
    """acc and acc_norm (log-likelihood / UTF-8 length of the choice) over {context, choices, label} records."""
    hits = hits_norm = 0
    t0 = time.time()
    for i, r in enumerate(records):
        for f in ("context", "choices", "label"):
            if f not in r:
                raise ValueError(f"multiple-choice record {i} has no field {f!r} (expected context, choices, label)")
        lp = choice_logprobs(model, tok, r["context"], r["choices"], max_len)
        norm = [v / max(len(c.encode("utf-8")), 1) for v, c in zip(lp, r["choices"])]
        hits += int(max(range(len(lp)), key=lp.__getitem__) == int(r["label"]))
        hits_norm += int(max(range(len(norm)), key=norm.__getitem__) == int(r["label"]))
        if progress:
            _progress(f"mc {i + 1}/{len(records)}", t0, (i + 1) / len(records))
    if progress:
        print(file=sys.stderr)
    return {"acc": hits / len(records), "acc_norm": hits_norm / len(records), "n": len(records)}


# ------------------------------------------------------------------------------------------- CLI


@dataclass
class EvalConfig:
    """The settings of an evaluation; every field is a flag (--seq-len for seq_len), its help in the metadata."""
    model: str = setting(help="HF-style model folder")
    task: str = setting(help="ppl (perplexity), gsm8k (exact match) or mc (multiple choice)",
                        choices=("ppl", "gsm8k", "mc"))
    data: str = setting(help="text file (ppl) or JSON/JSONL records (gsm8k, mc)")
    quantized: str | None = setting(None, "quantized.safetensors written by train.py, or a GPTQ checkpoint folder "
                                          "(config.json with quantization_config, e.g. train.py --export-gptq)")
    adapter: str | None = setting(None, "adapter.safetensors written by train.py (needs --quantized)")
    limit: int | None = setting(None, "ppl: N evenly spaced windows; gsm8k/mc: first N records")
    seq_len: int = setting(512, "ppl window length")
    batch_size: int = setting(8, "ppl windows or gsm8k prompts per forward pass")
    max_new_tokens: int = setting(256, "gsm8k generation length")
    max_len: int = setting(1024, "mc: longest context+choice")
    device: str = setting("cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda, cuda:1 ...")
    dtype: str = setting("float32", "dtype of the weights and activations",
                         choices=("float32", "bfloat16", "float16"))
    out: str | None = setting(None, "write the results here as JSON")
    quiet: bool = setting(False, "no progress line on stderr")
    allow_base_mismatch: bool = setting(False, "evaluate --adapter on a --quantized base other than the one it was "
                                               "initialized for (bits, group size, GPTQ settings or weights "
                                               "differ); an error without it")
    debug: bool = setting(False, "an error shows its traceback (or QWHA_DEBUG=1)")


def parse_args(argv=None) -> EvalConfig:
    """EvalConfig from the command line: a flag per field, its help and default from the field."""
    return EvalConfig(**checks.given_flags(EvalConfig, argv, __doc__.split("\n\n")[0]))


def validate(cfg: EvalConfig) -> list[dict] | None:
    """Every check that needs no weights: flags, the data file (and GSM8K's reference answers), the model's
    config and checkpoint headers, --quantized and --adapter against the model and each other, --out. Returns
    the records of a gsm8k/mc file."""
    bounds = (("--limit", cfg.limit, 1), ("--seq-len", cfg.seq_len, 2), ("--batch-size", cfg.batch_size, 1),
              ("--max-new-tokens", cfg.max_new_tokens, 1), ("--max-len", cfg.max_len, 2))
    for flag, value, low in bounds:
        if value is not None and value < low:
            raise ValueError(f"{flag} {value}: expected {low} or more")
    checks.check_device(cfg.device)
    checks.check_text_file(cfg.data, "--data")
    if cfg.adapter and not cfg.quantized:
        raise ValueError("--adapter needs --quantized (the adapters wrap the quantized linears)")
    if cfg.out:
        checks.check_output_file(cfg.out, "--out")
    folder = Path(cfg.model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {folder}: no config.json there (expected an HF-style model folder)")
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--model {folder}: no tokenizer.json in the folder (only fast tokenizers are read)")
    mc = model_lib.ModelConfig.from_json(folder / "config.json")
    try:
        for f in sorted(set(model_lib.checkpoint_files(folder).values())):
            checks.safetensors_header(f)
    except ValueError as e:
        raise ValueError(f"--model {e}") from None
    if cfg.quantized:
        if Path(cfg.quantized).is_dir():         # a GPTQ checkpoint folder: its quantization_config (hash: evaluate)
            qc = gptq_format.quant_config(cfg.quantized)
            q = {"settings": {"bits": qc["bits"], "group_size": qc["group_size"]}}
        else:
            q = checks.check_quantized_file(cfg.quantized, mc, cfg.model)
        if cfg.adapter:
            settings = checks.check_adapter_file(cfg.adapter, mc, cfg.model)
            diff = checks.base_mismatch(settings, q["settings"])
            if diff and not cfg.allow_base_mismatch:
                raise ValueError(f"--adapter {cfg.adapter} was initialized for another base than --quantized "
                                 f"{cfg.quantized} ({'; '.join(diff)}): pass the pair of one train.py run, or "
                                 f"--allow-base-mismatch")
    if cfg.task == "ppl":
        return None
    records = data.read_records(cfg.data)[:cfg.limit]
    if not records:
        raise ValueError(f"--data {cfg.data}: no records")
    if cfg.task == "gsm8k":
        for i, r in enumerate(records):
            if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
                raise ValueError(f"--data {cfg.data}: record {i} lacks 'question'/'answer' (GSM8K format)")
            try:
                gold_answer(r["answer"])
            except ValueError as e:
                raise ValueError(f"--data {cfg.data}: record {i}: {e}") from None
    for i, r in enumerate(records if cfg.task == "mc" else []):
        for f in ("context", "choices", "label"):
            if f not in r:
                raise ValueError(f"--data {cfg.data}: multiple-choice record {i} has no field {f!r} "
                                 f"(expected context, choices, label)")
        ch, label = r["choices"], r["label"]
        if not (isinstance(ch, list) and ch and all(isinstance(c, str) for c in ch)):
            raise ValueError(f"--data {cfg.data}: multiple-choice record {i}: choices must be a list of strings")
        if not (isinstance(label, int) or isinstance(label, str) and label.isdigit()) or not 0 <= int(label) < len(ch):
            raise ValueError(f"--data {cfg.data}: multiple-choice record {i}: label {label!r} is not an index "
                             f"of its {len(ch)} choices")
    return records


def evaluate(cfg: EvalConfig) -> dict:
    """Run one task; returns the results dict (what --out writes)."""
    records = validate(cfg)
    m, tok = load_model(cfg.model, cfg.quantized, cfg.adapter, cfg.device, getattr(torch, cfg.dtype))
    if cfg.adapter and Path(cfg.quantized).is_dir() and not cfg.allow_base_mismatch:
        check_folder_base(cfg, m)
    checks.check_finite(m.named_parameters(), f"--model {cfg.model}" + (" with --quantized" if cfg.quantized else "")
                        + (" and --adapter" if cfg.adapter else ""))
    t0 = time.time()
    if cfg.task == "ppl":
        ids = data.text_token_stream(tok, data.read_text(cfg.data))
        try:
            window_starts(len(ids), cfg.seq_len)
        except ValueError as e:
            raise ValueError(f"--data {cfg.data}: {e}") from None
        res = perplexity(m, ids, cfg.seq_len, cfg.limit, cfg.batch_size, not cfg.quiet)
    else:
        if cfg.task == "gsm8k":
            res = gsm8k(m, tok, records, cfg.max_new_tokens, cfg.batch_size, not cfg.quiet)
        else:
            res = multiple_choice(m, tok, records, cfg.max_len, not cfg.quiet)
    res["seconds"] = time.time() - t0
    return {"config": asdict(cfg), "task": cfg.task, **res}


def check_folder_base(cfg: EvalConfig, m) -> None:
    """--adapter on a GPTQ folder, which records no hash: the sha256 the adapter recorded for its base against the
    packed tensors read from the folder."""
    _, meta, _ = checks.safetensors_header(cfg.adapter, "--adapter")
    want = (json.loads(meta.get("settings") or "{}").get("base") or {}).get("sha256")
    have = prepare.packed_sha256(m)
    if want is not None and want != have:
        raise ValueError(f"--adapter {cfg.adapter} was initialized for another base than --quantized {cfg.quantized} "
                         f"(packed weights sha256 {want[:12]}… != {have[:12]}…): pass the pair of one train.py run, "
                         f"or --allow-base-mismatch")


def format_table(res: dict) -> str:
    keys = [k for k in ("ppl", "nll", "accuracy", "acc", "acc_norm", "n", "windows", "tokens", "seconds") if k in res]
    w = max(len(k) for k in keys)
    lines = [f"{res['task']} on {res['config']['data']}"]
    for k in keys:
        v = res[k]
        lines.append(f"  {k:<{w}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{w}}  {v}")
    return "\n".join(lines)


def _pad_id(tok) -> int:
    return tok.pad_id if tok.pad_id is not None else tok.eos_id


def _progress(msg: str, t0: float, frac: float | None = None) -> None:
    """The progress line: msg, the seconds since t0 and, given the fraction done, the ETA."""
    dt = time.time() - t0
    eta = f", ETA {dt / frac * (1 - frac):.0f}s" if frac and 0 < frac < 1 else ""
    print(f"\r{msg} ({dt:.0f}s{eta})\033[K", end="", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    res = evaluate(cfg)
    print(format_table(res))
    summary = {k: v for k, v in res.items() if k != "samples"}
    print(json.dumps(summary))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        data.atomic_write(Path(cfg.out), lambda p: p.write_text(json.dumps(res, indent=1)))
    return res


if __name__ == "__main__":
    checks.run_cli(main)
