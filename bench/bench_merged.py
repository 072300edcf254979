"""Benchmark: the pieces of WHALinear's merged training path (adapter._WHAMerged) that depend on how it is computed.

    python bench/bench_merged.py --threads 1            # SmolLM2's layer shapes at r = 8, 512 tokens

1. Forming W = Q + s·F T (done twice per step at batch 1: forward, and again for the input gradient), both ways on
   the same layer: the row-block WHT (wht.wht_from_t) and a CSR F times the cached dense T; which one the merged
   path picks (adapter._csr_form: at most adapter._CSR_MAX_K entries per row on average, n ≤ adapter._CSR_MAX_N,
   on a CPU).
2. The value gradient s·(gyᵀ x Tᵀ) at the support over --vg-tokens tokens (default 8 × 512, batch 8), per layer:
   the route the merged path takes (adapter._use_sampled: the sampled product, x Tᵀ in chunks of adapter._SDDMM_CHUNK
   tokens) against the dense gyᵀ x, transformed and gathered (the route taken where F is denser).
3. The backward of layers that read one input, like q/k/v (out widths --siblings, in width --sibling-in): forward
   and backward of all of them on one x (x Tᵀ transformed once for their value gradients, adapter._SharedInput)
   against the same on a copy of x per layer (transformed once per layer).
Random weights and supports (the cost depends only on the shapes and B = r·(m + n)); every side in one process,
alternating after a warm-up, medians of --repeats. Prints a table and one JSON line (also appended to
runs/merged.jsonl).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import adapter  # noqa: E402
from jsonl import emit  # noqa: E402  (bench/jsonl.py: print + append to runs/)


def layer(m: int, n: int, rank: int, g: torch.Generator) -> adapter.WHALinear:
    base = nn.Linear(n, m, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(m, n, generator=g) / n ** 0.5)
    B = min(rank * (m + n), m * n)
    idx = torch.randperm(m * n, generator=g)[:B].sort().values
    return adapter.WHALinear(base, idx, torch.randn(B, generator=g) * 1e-3, path="merged")


def medians(sides: dict, repeats: int) -> dict:
    """Median seconds of each side's call, alternating the sides, after one warm-up call each."""
    for fn in sides.values():
        fn()
    times = {k: [] for k in sides}
    for _ in range(repeats):
        for k, fn in sides.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def form(mod: adapter.WHALinear, csr: bool) -> torch.Tensor:
    """W = Q + s·F T, forced through the CSR product (csr) or the row-block WHT."""
    old = adapter._CSR_MAX_K, adapter._CSR_MAX_N
    adapter._CSR_MAX_K, adapter._CSR_MAX_N = (10**9, 10**9) if csr else (-1, -1)
    try:
        return adapter._wha_merged_weight(mod, mod.values)
    finally:
        adapter._CSR_MAX_K, adapter._CSR_MAX_N = old


def value_grad(mod: adapter.WHALinear, x: torch.Tensor, gy: torch.Tensor, dense: bool) -> torch.Tensor:
    """The merged path's value gradient, or (dense) the dense gyᵀ x route forced (needs N ≥ m)."""
    old = adapter._SDDMM_COST
    adapter._SDDMM_COST = 10**9 if dense else old
    try:
        return adapter._wha_value_grad(mod, x, gy)
    finally:
        adapter._SDDMM_COST = old


def run(args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    cpu = torch.device("cpu")
    rows = []
    for m, n in args.shapes:
        mod = layer(m, n, args.rank, g)
        t = medians({"wht": lambda: form(mod, False), "csr": lambda: form(mod, True)}, args.repeats)
        diff = (form(mod, False) - form(mod, True)).abs().max().item()
        rows.append({"m": m, "n": n, "entries_per_row": mod.indices.numel() / m, "wht_ms": t["wht"] * 1e3,
                     "csr_ms": t["csr"] * 1e3, "csr_vs_wht": t["csr"] / t["wht"], "max_abs_diff": diff,
                     "chosen": "csr" if adapter._csr_form(mod, cpu) else "wht"})
    vg = []
    for m, n in args.shapes:
        mod = layer(m, n, args.rank, g)
        x, gy = torch.randn(args.vg_tokens, n, generator=g), torch.randn(args.vg_tokens, m, generator=g)
        t = medians({"chosen": lambda: value_grad(mod, x, gy, False),
                     "dense": lambda: value_grad(mod, x, gy, True)}, args.repeats)
        a, b = value_grad(mod, x, gy, False), value_grad(mod, x, gy, True)
        vg.append({"m": m, "n": n, "tokens": args.vg_tokens,
                   "route": "sampled" if adapter._use_sampled(mod, cpu) else "dense",
                   "chosen_ms": t["chosen"] * 1e3, "dense_ms": t["dense"] * 1e3,
                   "chosen_vs_dense": t["chosen"] / t["dense"],
                   "max_rel_diff": ((a - b).abs().max() / b.abs().max()).item()})
    n = args.sibling_in
    mods = [layer(m, n, args.rank, g) for m in args.siblings]
    x = torch.randn(args.tokens, n, generator=g)
    gys = [torch.randn(args.tokens, m, generator=g) for m in args.siblings]

    def step(shared: bool):
        xs = [x] * len(mods) if shared else [x.clone() for _ in mods]
        ys = [mod(xi) for mod, xi in zip(mods, xs)]
        torch.autograd.backward(ys, gys)
        grads = [mod.values.grad for mod in mods]
        for mod in mods:
            mod.values.grad = None
        return grads

    t = medians({"shared": lambda: step(True), "separate": lambda: step(False)}, args.repeats)
    same = all(torch.equal(a, b) for a, b in zip(step(True), step(False)))
    sib = {"out": list(args.siblings), "in": n, "tokens": args.tokens, "shared_ms": t["shared"] * 1e3,
           "separate_ms": t["separate"] * 1e3, "saved_ms": (t["separate"] - t["shared"]) * 1e3,
           "same_grads": same}
    return {"bench": "merged", "rank": args.rank, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "csr_max_k": adapter._CSR_MAX_K, "csr_max_n": adapter._CSR_MAX_N, "sddmm_chunk": adapter._SDDMM_CHUNK,
            "formation": rows, "value_grad": vg, "siblings": sib}


def report(res: dict) -> None:
    print(f"Forming W = Q + s·F T, r = {res['rank']}, {res['threads']} thread(s), median of {res['repeats']}")
    print(f"{'m x n':>11} {'k/row':>6} {'WHT ms':>8} {'CSR ms':>8} {'CSR/WHT':>8} {'chosen':>7} {'max diff':>9}")
    for r in res["formation"]:
        print(f"{r['m']:>5} x {r['n']:<5}{r['entries_per_row']:>6.1f} {r['wht_ms']:>8.3f} {r['csr_ms']:>8.3f} "
              f"{r['csr_vs_wht']:>8.2f} {r['chosen']:>7} {r['max_abs_diff']:>9.1e}")
    print(f"Value gradient, {res['value_grad'][0]['tokens'] if res['value_grad'] else 0} tokens: the merged path's "
          f"route against the dense gyᵀ x")
    print(f"{'m x n':>11} {'route':>8} {'route ms':>9} {'dense ms':>9} {'ratio':>6} {'rel diff':>9}")
    for r in res["value_grad"]:
        print(f"{r['m']:>5} x {r['n']:<5}{r['route']:>8} {r['chosen_ms']:>9.2f} {r['dense_ms']:>9.2f} "
              f"{r['chosen_vs_dense']:>6.2f} {r['max_rel_diff']:>9.1e}")
    s = res["siblings"]
    print(f"Forward + backward of {len(s['out'])} layers ({'/'.join(map(str, s['out']))} x {s['in']}) on one input "
          f"of {s['tokens']} tokens: shared x Tᵀ {s['shared_ms']:.2f} ms, one per layer {s['separate_ms']:.2f} ms "
          f"(saved {s['saved_ms']:.2f} ms); value gradients equal: {s['same_grads']}")
    emit("merged", res)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="576x576,192x576,1536x576,576x1536", help="comma list of MxN")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vg-tokens", type=int, default=4096, help="tokens for the value-gradient table (>= every m)")
    p.add_argument("--siblings", default="576,192,192", help="out widths of the layers sharing one input")
    p.add_argument("--sibling-in", type=int, default=576)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        a.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")]
        a.siblings = [int(v) for v in a.siblings.split(",")]
    except ValueError:
        p.error(f"--shapes must look like 576x576,1536x576 and --siblings like 576,192 (got {a.shapes!r}, "
                f"{a.siblings!r})")
    if any(len(s) != 2 for s in a.shapes):
        p.error(f"--shapes: each shape is MxN, got {a.shapes}")
    if any(a.vg_tokens < m for m, _ in a.shapes):
        p.error(f"--vg-tokens {a.vg_tokens}: the dense route it is compared with needs at least m tokens "
                f"(largest m: {max(m for m, _ in a.shapes)})")
    if a.threads:
        torch.set_num_threads(a.threads)
    return a


def main(argv=None) -> dict:
    res = run(parse(argv))
    report(res)
    return res


if __name__ == "__main__":
    main()
