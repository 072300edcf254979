"""Benchmark model.py on the demo checkpoint: load time and peak memory, forward throughput, and (with
--reference, when `transformers` is importable) logit parity and throughput against transformers' model.

    python bench/bench_model.py                                  # load time / peak RSS, our throughput
    /tmp/refenv/bin/python bench/bench_model.py --reference      # + side by side with transformers

`transformers` is not a dependency of the project: --reference is run from a throwaway environment that has it
(see tests/fixtures/README.md). Prints a table and one JSON line.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import model as M  # noqa: E402

LOAD_PROBE = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch, model
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
m = model.from_pretrained({path!r}, dtype=getattr(torch, {dtype!r}))
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({{"load_s": dt, "base_rss_kb": base, "peak_rss_kb": peak, "param_bytes": n}}))
"""


def log(args, msg):
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure_load(path: Path, dtype: str, reps: int) -> dict:
    """Load in a fresh interpreter (peak RSS from getrusage, minus the RSS before the load); best of reps."""
    runs = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-c", LOAD_PROBE.format(root=str(ROOT), path=str(path), dtype=dtype)],
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["load_s"])
    best["added_rss_bytes"] = max(r["peak_rss_kb"] - r["base_rss_kb"] for r in runs) * 1024
    return best


def text_tokens(args) -> torch.Tensor:
    tok = M.Tokenizer.from_pretrained(args.model)
    text = Path(args.text).read_text()[:200_000]
    ids = tok.encode(text)
    need = args.batch * args.tokens
    if len(ids) < need:
        raise ValueError(f"{args.text}: {len(ids)} tokens, need {need}")
    return torch.tensor(ids[:need]).view(args.batch, args.tokens)


def timed(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def padded_ref_checks(args, ours, ref, x, result, rows):
    """A left-padded batch (real positions) and greedy generation from a chat prompt, against transformers."""
    ids = x.reshape(-1)[:128].view(2, 64).clone()
    mask = torch.ones_like(ids)
    ids[1, :24], mask[1, :24] = 0, 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    err = (ours(ids, mask)[real] - ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits[real]).abs().max()
    result["max_abs_logit_diff_padded"] = err.item()
    rows.append(("padded batch vs transformers", f"max abs {err.item():.2e}", "2x64, row 1 left-padded by 24",
                 "PASS" if err < 1e-3 else "FAIL"))
    tok = M.Tokenizer.from_pretrained(args.model)
    chat = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Name a primary color.")]
    prompts = [tok.encode(tok.apply_chat_template(c)) for c in chat]
    mine = M.generate(ours, prompts, 24, eos_id=tok.eos_id, pad_id=tok.pad_id)
    L = max(len(p) for p in prompts)
    pids = torch.tensor([[tok.pad_id] * (L - len(p)) + p for p in prompts])
    pmask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    theirs = ref.generate(input_ids=pids, attention_mask=pmask, max_new_tokens=24, do_sample=False,
                          eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[:, L:].tolist()
    theirs = [t[:t.index(tok.eos_id)] if tok.eos_id in t else t for t in theirs]
    same = mine == theirs
    result["generate_equal"] = same
    rows.append(("greedy generate vs transformers", "equal" if same else "DIFFERENT", "2 chat prompts, 24 tokens",
                 repr(tok.decode(mine[0], skip_special_tokens=True))[:40]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "assets" / "smollm2-135m"))
    ap.add_argument("--text", default=str(ROOT / "assets" / "wikitext" / "test.txt"))
    ap.add_argument("--tokens", type=int, default=512, help="tokens per row of the forward batch")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7, help="timed forwards per side (alternating), after 1 warm-up")
    ap.add_argument("--load-reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--reference", action="store_true", help="compare with transformers (must be importable)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    path = Path(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"bench": "model", "model": path.name, "tokens": args.tokens, "batch": args.batch,
              "threads": torch.get_num_threads(), "torch": torch.__version__}

    cfg = json.loads((path / "config.json").read_text())
    ck_dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    ck_bytes = checkpoint_bytes(path)
    rows = []
    for dtype in dict.fromkeys([ck_dtype, "float32"]):
        log(args, f"load {path.name} as {dtype} ({args.load_reps} fresh processes)")
        r = measure_load(path, dtype, args.load_reps)
        ratio = r["added_rss_bytes"] / ck_bytes
        result[f"load_{dtype}"] = {"load_s": round(r["load_s"], 3),
                                   "added_rss_mb": round(r["added_rss_bytes"] / 2**20, 1),
                                   "peak_rss_mb": round(r["peak_rss_kb"] / 1024, 1),
                                   "param_mb": round(r["param_bytes"] / 2**20, 1),
                                   "rss_over_checkpoint": round(ratio, 3),
                                   "rss_over_params": round(r["added_rss_bytes"] / r["param_bytes"], 3)}
        rows.append((f"load as {dtype}", f"{r['load_s']:.2f} s", f"+{r['added_rss_bytes'] / 2**20:.0f} MB RSS",
                     f"{ratio:.2f}x checkpoint ({ck_bytes / 2**20:.0f} MB, {ck_dtype}), "
                     f"{r['added_rss_bytes'] / r['param_bytes']:.2f}x the loaded weights"))
    result["checkpoint_mb"] = round(ck_bytes / 2**20, 1)

    x = text_tokens(args)
    ours = M.from_pretrained(path, dtype=torch.float32).eval()
    fwd_ours = lambda t: ours(t)  # noqa: E731
    ref = None
    if args.reference:
        from transformers import AutoModelForCausalLM
        from transformers import __version__ as tv
        result["transformers"] = tv
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
        fwd_ref = lambda t: ref(input_ids=t).logits  # noqa: E731
    with torch.inference_mode():
        a = fwd_ours(x)
        if ref is not None:
            b = fwd_ref(x)
            err = (a.float() - b.float()).abs().max().item()
            result["max_abs_logit_diff"] = err
            rows.append(("logits vs transformers", f"max abs {err:.2e}",
                         f"on {args.batch}x{args.tokens} wikitext tokens",
                         "tolerance 1e-3: " + ("PASS" if err < 1e-3 else "FAIL")))
            padded_ref_checks(args, ours, ref, x, result, rows)
        t_ours, t_ref = [], []
        for i in range(args.reps):
            log(args, f"forward {i + 1}/{args.reps}")
            t_ours.append(timed(fwd_ours, x))
            if ref is not None:
                t_ref.append(timed(fwd_ref, x))
    n_tok = x.numel()
    med = statistics.median(t_ours)
    result["ours_tok_s"] = round(n_tok / med, 1)
    rows.append(("forward (ours)", f"{med * 1e3:.0f} ms", f"{n_tok / med:.0f} tok/s", f"median of {args.reps}"))
    if ref is not None:
        med_ref = statistics.median(t_ref)
        result["ref_tok_s"] = round(n_tok / med_ref, 1)
        result["time_ratio_ours_over_ref"] = round(med / med_ref, 3)
        rows.append(("forward (transformers)", f"{med_ref * 1e3:.0f} ms", f"{n_tok / med_ref:.0f} tok/s",
                     f"ours/ref time {med / med_ref:.2f}x"))
    width = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:>12}  {r[2]:>22}  {r[3]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
