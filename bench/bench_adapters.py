"""Init error of every adapter × selection at the same budget, and the outlier coverage of WHA / DHA / DCA.

    python bench/bench_adapters.py                       # 2/3/4 bits, r = 8, blocks 0,5,...,25 (42 layers)
    python bench/bench_adapters.py --bits 2 --layers all

On SmolLM2-135M with real calibration Hessians (the cache of bench/bench_init.py, runs/hessians-32x256.safetensors,
made here the same way if missing) and GPTQ g64 bases (--gptq refined: train.py's settings, the default;
classic: plain GPTQ; cached as bench_init.py does):
1. Average layer output error ‖(E − ΔW) Rᵀ‖_F after init (paper Tables 2 and 5) for each combination below, all at
   B = r·(m + n) trainable parameters per layer (LoRA: rank r), absolute and as a ratio of bare GPTQ.
2. Outlier coverage (paper App. B.3, Table 6): outliers = the top 10 % of |E| in the layer; their coefficients
   C_o = E_o T_nᵀ in each adapter's kernel; coverage = the share of Σ C_o² on the support that AdaAlloc selected
   for that adapter ('energy'), and of Σ |C_o| ('abs'); the support density B/(m·n) is a random support's share.
Prints tables and one JSON line (also appended to runs/bench_adapters.jsonl).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import baselines as bl  # noqa: E402
import model as modellib  # noqa: E402
import qwha  # noqa: E402
from bench_init import GPTQ_KINDS, get_hessians, get_quantized  # noqa: E402  (same caches in runs/)
from jsonl import emit  # noqa: E402  (bench/jsonl.py: print + append to runs/)

# (label, AdapterConfig keywords): Table 2 (selection on WHA), Table 5 (kernel with AdaAlloc), the 2-D and
# LoRA baselines of Table 1 with quantization-aware values (LoCA's and plain LoRA's own zero init is "None").
COMBOS = [
    ("None (GPTQ; LoCA, LoRA init)", None),
    ("WHA AdaAlloc (QWHA)", dict(adapter="wha")),
    ("WHA AdaAlloc unrefined", dict(adapter="wha", refine=False)),
    ("WHA Magnitude", dict(adapter="wha", select="magnitude")),
    ("WHA SSH", dict(adapter="wha", select="ssh")),
    ("WHA Random", dict(adapter="wha", select="random")),
    ("DCA AdaAlloc", dict(adapter="dca")),
    ("DHA AdaAlloc", dict(adapter="dha")),
    ("Sparse AdaAlloc", dict(adapter="sparse")),
    ("Sparse Random (SHiRA+QA)", dict(adapter="sparse", select="random")),
    ("2-D WHT AdaAlloc", dict(adapter="wha", transform_dims=2)),
    ("2-D DCT AdaAlloc", dict(adapter="dca", transform_dims=2)),
    ("2-D DHT AdaAlloc", dict(adapter="dha", transform_dims=2)),
    ("2-D DCT Random (LoCA+QA)", dict(adapter="dca", transform_dims=2, select="random")),
    ("2-D DHT SSH (SSH+QA)", dict(adapter="dha", transform_dims=2, select="ssh")),
    ("LoRA CLoQ", dict(adapter="lora")),
]
COVERAGE = {"WHA": "wht", "DHA": "dht", "DCA": "dct"}
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class BenchConfig:
    assets: str = "assets"
    bits: tuple = (2, 3, 4)
    rank: int = 8                   # budget r·(m + n): SmolLM2's r = 8 is the paper's density (r = 64 at n = 3072)
    n_calib: int = 32
    seq_len: int = 256
    seed: int = 0
    layers: str = "0,5,10,15,20,25"  # block indices, or "all"
    hessians: str = ""              # default runs/hessians-<n_calib>x<seq_len>.safetensors
    threads: int = 1
    quiet: bool = False
    batch_size: int = 4             # calibration windows per forward
    gptq: str = "refined"           # GPTQ settings of the bases, as bench_init.py --gptq:
                                    # refined (train.py's) | classic


def log(cfg, msg, end="\n"):
    if not cfg.quiet:
        print(msg, file=sys.stderr, end=end, flush=True)


def run_bits(cfg, weights, H, Q, names, bits):
    """Per combination: mean init error over the layers; per kernel: outlier coverage of its AdaAlloc support."""
    errs = {label: [] for label, _ in COMBOS}
    secs = {label: 0.0 for label, _ in COMBOS}
    cov = {k: {"energy": [], "abs": [], "density": []} for k in COVERAGE}
    cov_types = {k: {t: [] for t in TYPES} for k in COVERAGE}
    t0 = time.perf_counter()
    for j, name in enumerate(names):
        W = weights[name].double()
        E = W - Q[name].double()
        m, n = E.shape
        Hn = H[name].double()
        budget = min(cfg.rank * (m + n), m * n)
        for label, kw in COMBOS:
            ts = time.perf_counter()
            if kw is None:
                err = float(qwha.layer_error(E, Hn))
            elif kw["adapter"] == "lora":
                A, B = bl.cloq_init(E, Hn, min(cfg.rank, m, n))
                err = float(qwha.layer_error(E, Hn, B.double() @ A.double()))
            else:
                c = bl.AdapterConfig(rank=cfg.rank, seed=cfg.seed, **kw)
                li = bl.init_sparse_layer(E, Hn, budget, bl.ADAPTERS[c.adapter], c.transform_dims, select=c.select,
                                          refine=c.refine, qa_init=c.use_qa_init, W=W,
                                          generator=torch.Generator().manual_seed(cfg.seed * 1000 + j))
                err = li.err_refined
                short = {"wht": "WHA", "dht": "DHA", "dct": "DCA"}.get(bl.ADAPTERS[c.adapter])
                if short and c.transform_dims == 1 and c.select == "adaalloc" and c.refine:
                    cv = bl.outlier_coverage(E, li.indices, bl.ADAPTERS[c.adapter])
                    for key in cv:
                        cov[short][key].append(cv[key])
                    cov_types[short][name.rsplit(".", 1)[-1]].append(cv["energy"])
            errs[label].append(err)
            secs[label] += time.perf_counter() - ts
        el = time.perf_counter() - t0
        log(cfg, f"\r{bits}b layer {j + 1}/{len(names)} ({el:.0f}s, ETA {el / (j + 1) * (len(names) - j - 1):.0f}s)",
            end="")
    log(cfg, "")
    base = statistics.fmean(errs[COMBOS[0][0]])
    table = [{"bits": bits, "rank": cfg.rank, "method": label, "mean_err": statistics.fmean(e),
              "ratio": statistics.fmean(e) / base,
              "mean_layer_ratio": statistics.fmean(a / b for a, b in zip(e, errs[COMBOS[0][0]])),
              "seconds": secs[label]} for label, e in errs.items()]
    coverage = {k: {"energy": statistics.fmean(v["energy"]), "abs": statistics.fmean(v["abs"]),
                    "density": statistics.fmean(v["density"]),
                    "by_type": {t: statistics.fmean(x) for t, x in cov_types[k].items() if x}}
                for k, v in cov.items()}
    return table, coverage


def parse(argv=None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = BenchConfig()
    p.add_argument("--assets", default=d.assets)
    p.add_argument("--bits", default=",".join(map(str, d.bits)))
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--n-calib", type=int, default=d.n_calib)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--layers", default=d.layers, help="block indices (comma list) or 'all'")
    p.add_argument("--hessians", default=d.hessians)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--gptq", default=d.gptq, choices=GPTQ_KINDS,
                   help="GPTQ settings of the bases: refined = train.py's defaults, classic = plain GPTQ "
                        "(cached as bench_init.py does)")
    a = p.parse_args(argv)
    return BenchConfig(a.assets, tuple(int(b) for b in a.bits.split(",")), a.rank, a.n_calib, a.seq_len, a.seed,
                       a.layers, a.hessians, a.threads, a.quiet, d.batch_size, a.gptq)


def main(argv=None):
    cfg = parse(argv)
    torch.set_num_threads(cfg.threads)
    mpath = Path(cfg.assets) / "smollm2-135m"
    if not (mpath / "config.json").exists():
        raise FileNotFoundError(f"{mpath} missing: run `python data.py fetch-demo --out {cfg.assets}`")
    model = modellib.from_pretrained(mpath)
    all_names = modellib.linear_names(model)
    weights = {n: modellib.get_module(model, n).weight.detach().clone() for n in all_names}
    H, hpath = get_hessians(cfg, model, all_names)
    blocks = None if cfg.layers == "all" else {int(b) for b in cfg.layers.split(",")}
    names = [n for n in all_names if blocks is None or int(n.split(".")[2]) in blocks]
    table, coverage = [], {}
    for bits in cfg.bits:
        Q = get_quantized(cfg, weights, H, names, bits)
        t, c = run_bits(cfg, weights, H, Q, names, bits)
        table += t
        coverage[bits] = c

    print(f"\nAverage layer output error after init, {len(names)} layers of SmolLM2-135M, GPTQ ({cfg.gptq}) g64, "
          f"budget r·(m+n) with r = {cfg.rank}, Hessians {hpath}")
    print(f"{'bits':>4} {'method':<30} {'mean err':>10} {'× GPTQ':>8} {'mean of ratios':>15} {'rank':>5}")
    for bits in cfg.bits:
        rows = sorted((r for r in table if r["bits"] == bits), key=lambda r: r["mean_err"])
        for i, r in enumerate(rows):
            print(f"{bits:>4} {r['method']:<30} {r['mean_err']:>10.4g} {r['ratio']:>8.3f} "
                  f"{r['mean_layer_ratio']:>15.3f} {i + 1:>5}")
    print("\nOutlier coverage (top 10 % |E|; share of their coefficient energy on the AdaAlloc support), %")
    print(f"{'bits':>4} {'adapter':<8} " + " ".join(f"{t.split('_')[0]:>6}" for t in TYPES)
          + f" {'energy':>7} {'abs':>6} {'density':>8}")
    for bits, cv in coverage.items():
        for k, v in cv.items():
            print(f"{bits:>4} {k:<8} " + " ".join(f"{100 * v['by_type'].get(t, float('nan')):>6.2f}" for t in TYPES)
                  + f" {100 * v['energy']:>7.2f} {100 * v['abs']:>6.2f} {100 * v['density']:>8.2f}")
    result = {"bench": "adapters", "config": asdict(cfg), "layers": len(names), "table": table,
              "coverage": {str(b): c for b, c in coverage.items()}}
    for bits in cfg.bits:
        rows = {r["method"]: r["mean_err"] for r in table if r["bits"] == bits}
        best = min(rows, key=rows.get)
        result[f"best_{bits}b"] = {"method": best, "qwha_over_best": rows["WHA AdaAlloc (QWHA)"] / rows[best]}
    emit("bench_adapters", result)


if __name__ == "__main__":
    main()
