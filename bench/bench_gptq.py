"""Benchmark gptq.py on every linear layer of the demo model (SmolLM2-135M: 30 blocks × 7 linears = 210).

  python bench/bench_gptq.py [--hessians FILE] [--weights FILE] [--magr-blocks 0,15,29] [--threads 1] [--quiet]
                             [--act-order] [--opt-act-order] [--clip] [--cd-passes N] [--refit]
                             [--ppl-windows N] [--ppl-bits 2 3 4]

Measures (CPU unless --device says otherwise):
  * the time to GPTQ-quantize all 210 layers given their Hessians, at 2, 3 and 4 bits (group 64), with the time
    of RTN on the same layers measured alternately in the same process after a warm-up; with any of --clip,
    --cd-passes, --refit, --opt-act-order (gptq_quantize's options) also GPTQ with those options, alternating
    layer by layer;
  * the layer output error of RTN vs GPTQ (vs GPTQ + options) over all layers, averaged two ways: the mean of
    ‖(W − Q)Rᵀ‖ (RᵀR = H; the "layer output error", as bench_init reports it: layers with larger
    outputs weigh more) and the mean of the relative error ‖(W − Q)Rᵀ‖ / ‖W Rᵀ‖ (every layer weighs the same);
    each as a ratio of GPTQ's mean over RTN's. And the relative error of
    RTN vs GPTQ vs MagR+GPTQ over the linears of a few sampled blocks (MagR's 200 iterations are slow on CPU);
  * the bytes of the 2-bit, group-64 QuantLinears against the fp16 weights;
  * with --ppl-windows N (demo checkpoint only): held-out Wikipedia perplexity of the whole model with every
    linear replaced by its RTN, GPTQ and GPTQ + options weights at --ppl-bits, and in full precision: N windows of
    512 tokens evenly spaced over assets/wikitext/test.txt (eval.perplexity), no adapter.

Hessians: --hessians FILE (safetensors {linear name: H (n, n)}, as calib.save_hessians writes), else random
correlated ones, seeded, one per input site (q/k/v share one, gate/up share one, as in a real model):
H = (A Aᵀ/n) ⊙ d dᵀ + 1e-3·mean(diag)·I, the columns of A scaled by k^−0.75 (a decaying spectrum) and d
log-normal channel scales (outlier channels). Weights: --weights FILE (default the demo checkpoint,
assets/smollm2-135m/model.safetensors, when present), else random N(0, 0.02²) of the demo shapes.
Prints a table and one JSON line.

Threads: GPTQ's column loop is serial work on (m,) vectors, so a second intra-op thread buys little and, on a
shared, oversubscribed machine, costs a lot; hence --threads 1 by default (figures in docs/performance.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import gptq  # noqa: E402

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SITE = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
        "self_attn.o_proj": "o_in", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "down_in"}


@dataclass
class BenchConfig:
    weights: str = str(ROOT / "assets" / "smollm2-135m" / "model.safetensors")  # used when it exists
    hessians: str | None = None       # safetensors {name: H}; None: random correlated Hessians
    bits: tuple = (2, 3, 4)
    group_size: int = 64
    act_order: bool = False           # GPTQ columns by decreasing diag H (static groups: same grid, no g_idx)
    opt_act_order: bool | None = None # the "GPTQ + options" column: act_order (None: as act_order)
    clip: bool = False                #   ... gptq_quantize(clip=...)
    cd_passes: int = 0                #   ... cd_passes=... (coordinate-descent passes after GPTQ)
    refit: bool = False               #   ... refit=... (least-squares scale refits)
    magr_blocks: tuple = (0, 15, 29)  # blocks whose 7 linears also get MagR+GPTQ
    magr_iters: int = 200
    magr_alpha: float = 1e-4
    layers: int = 30                  # blocks: the demo's 30 (fewer for a quick run; at most the file's)
    hidden: int = 576
    kv_dim: int = 192
    intermediate: int = 1536
    seed: int = 0
    threads: int = 1                  # intra-op threads; see the module docstring
    device: str = "cpu"
    ppl_windows: int = 0              # > 0: whole-model Wikipedia perplexity over that many windows (demo model)
    ppl_bits: tuple = (2,)            # bit widths whose quantized weights get a perplexity
    seq_len: int = 512
    quiet: bool = False


def progress(cfg: BenchConfig, msg: str) -> None:
    if not cfg.quiet:
        sys.stderr.write("\r" + msg[:110].ljust(110))
        sys.stderr.flush()


def load_weights(cfg: BenchConfig) -> tuple[dict[str, torch.Tensor], str]:
    """{linear name: W (m, n) fp32} from the checkpoint, or random weights of the demo shapes."""
    path = Path(cfg.weights)
    if path.exists():
        from safetensors import safe_open
        out = {}
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            i = 0
            while i < cfg.layers and f"model.layers.{i}.{PROJ[0]}.weight" in keys:
                for p in PROJ:
                    out[f"model.layers.{i}.{p}"] = f.get_tensor(f"model.layers.{i}.{p}.weight").float()
                i += 1
        if not out:
            raise ValueError(f"--weights {path}: no tensors named model.layers.<i>.{PROJ[0]}.weight")
        return out, str(path)
    g = torch.Generator().manual_seed(cfg.seed)
    shapes = {"self_attn.q_proj": (cfg.hidden, cfg.hidden), "self_attn.k_proj": (cfg.kv_dim, cfg.hidden),
              "self_attn.v_proj": (cfg.kv_dim, cfg.hidden), "self_attn.o_proj": (cfg.hidden, cfg.hidden),
              "mlp.gate_proj": (cfg.intermediate, cfg.hidden), "mlp.up_proj": (cfg.intermediate, cfg.hidden),
              "mlp.down_proj": (cfg.hidden, cfg.intermediate)}
    return {f"model.layers.{i}.{p}": torch.randn(*shapes[p], generator=g) * 0.02
            for i in range(cfg.layers) for p in PROJ}, "random"


def random_hessian(n: int, seed: int) -> torch.Tensor:
    """A correlated, ill-conditioned H (n, n): decaying spectrum, log-normal channel scales, small ridge."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g) * torch.arange(1, n + 1, dtype=torch.float32) ** -0.75
    d = torch.exp(0.75 * torch.randn(n, generator=g))
    H = (A @ A.T / n) * d[:, None] * d[None, :]
    return H + 1e-3 * torch.diagonal(H).mean() * torch.eye(n)


def load_hessians(cfg: BenchConfig, weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    if cfg.hessians:
        from safetensors import safe_open
        path = Path(cfg.hessians)
        if not path.exists():
            raise FileNotFoundError(f"--hessians {path} does not exist (write it with calib.save_hessians)")
        with safe_open(str(path), framework="pt") as f:
            missing = [n for n in weights if n not in f.keys()]
            if missing:
                raise ValueError(f"--hessians {path}: no Hessian for {missing[0]} (and {len(missing) - 1} more); "
                                 "expected keys named like model.layers.0.self_attn.q_proj")
            return {n: f.get_tensor(n) for n in weights}, str(path)
    out, cache = {}, {}
    for k, (name, W) in enumerate(weights.items()):
        block, proj = name.split(".")[2], name.split(".", 3)[3]
        key = (block, SITE[proj])
        if key not in cache:
            cache[key] = random_hessian(W.shape[1], cfg.seed * 100003 + len(cache))
        out[name] = cache[key]
    return out, "random-correlated"


def rel_err(W, Q, H) -> float:
    return gptq.output_error(W, Q, H)[1]


def both_errs(W, Q, H, abs_list: list, rel_list: list) -> None:
    """Append ‖(W − Q)Rᵀ‖ to abs_list and ‖(W − Q)Rᵀ‖ / ‖W Rᵀ‖ to rel_list (one computation)."""
    a, r = gptq.output_error(W, Q, H)
    abs_list.append(a)
    rel_list.append(r)


def options(cfg: BenchConfig) -> dict:
    """gptq_quantize's settings for the "GPTQ + options" column ({} when no option is chosen)."""
    opts = {"clip": cfg.clip, "cd_passes": cfg.cd_passes, "refit": cfg.refit}
    if not any(opts.values()) and cfg.opt_act_order in (None, cfg.act_order):
        return {}
    return {"act_order": cfg.act_order if cfg.opt_act_order is None else cfg.opt_act_order, **opts}


def opt_label(cfg: BenchConfig) -> str:
    o = options(cfg)
    return "+".join((["ao"] if o.get("act_order") else []) + (["clip"] if o.get("clip") else [])
                    + ([f"cd{o['cd_passes']}"] if o.get("cd_passes") else []) + (["refit"] if o.get("refit") else [])
                    ) or "none"


def perplexities(cfg: BenchConfig, weights: dict[str, torch.Tensor], states: dict) -> dict:
    """{bits: {variant: ppl}} of the demo model with its linears replaced by each variant's dequantized weights
    (states: {bits: {variant: {name: QuantState}}}), plus full precision; eval.perplexity over cfg.ppl_windows
    windows of cfg.seq_len tokens of assets/wikitext/test.txt."""
    import data
    import eval as evallib
    import model as modellib
    mpath = Path(cfg.weights).parent
    test = ROOT / "assets" / "wikitext" / "test.txt"
    if not (mpath / "config.json").exists() or not test.exists():
        raise FileNotFoundError(f"--ppl-windows needs the demo model folder ({mpath}) and {test}: "
                                "run `python data.py fetch-demo`")
    tok = modellib.Tokenizer.from_pretrained(mpath)
    ids = data.text_token_stream(tok, data.read_text(test))
    mdl = modellib.from_pretrained(mpath, device=cfg.device).eval()
    ppl = lambda: evallib.perplexity(mdl, ids, cfg.seq_len, cfg.ppl_windows, batch_size=1)["ppl"]  # noqa: E731
    out = {"windows": cfg.ppl_windows, "seq_len": cfg.seq_len, "fp": ppl()}
    for b, variants in states.items():
        out[b] = {}
        for label, qs in variants.items():
            progress(cfg, f"ppl {b}-bit {label}")
            with torch.no_grad():
                for n, s in qs.items():
                    modellib.get_module(mdl, n).weight.copy_(s.dequantize())
            out[b][label] = ppl()
    with torch.no_grad():                                             # leave the model as loaded
        for n, W in weights.items():
            modellib.get_module(mdl, n).weight.copy_(W)
    return out


def run(cfg: BenchConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    dev = torch.device(cfg.device)
    weights, wsrc = load_weights(cfg)
    hessians, hsrc = load_hessians(cfg, weights)
    weights = {n: W.to(dev) for n, W in weights.items()}
    hessians = {n: H.to(dev) for n, H in hessians.items()}
    names = list(weights)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)  # noqa: E731
    opts = options(cfg)

    # warm-up: one layer of every shape
    seen = set()
    for n in names:
        if weights[n].shape not in seen:
            seen.add(weights[n].shape)
            gptq.gptq_quantize(weights[n], hessians[n], 4, cfg.group_size)
            gptq.gptq_quantize(weights[n], hessians[n], 4, cfg.group_size, **opts)
            gptq.quantize_rtn(weights[n], 4, cfg.group_size)

    res = {"gptq_time_s": {}, "gptq_cpu_s": {}, "rtn_time_s": {}, "err_rtn": {}, "err_gptq": {}, "retries": 0,
           "opt_time_s": {}, "opt_cpu_s": {}, "err_opt": {}, "abs_err_rtn": {}, "abs_err_gptq": {}, "abs_err_opt": {}}
    keep = {b: {"RTN": {}, "GPTQ": {}, **({f"GPTQ+{opt_label(cfg)}": {}} if opts else {})}
            for b in (cfg.ppl_bits if cfg.ppl_windows > 0 else ()) if b in cfg.bits}   # states for perplexity
    for b in cfg.bits:                                            # alternating: RTN, GPTQ, GPTQ + options per layer
        errs_r, errs_g, errs_o, t_r, t_g, c_g, t_o, c_o = [], [], [], 0.0, 0.0, 0.0, 0.0, 0.0
        abs_r, abs_g, abs_o = [], [], []                              # ‖(W − Q)Rᵀ‖ per layer
        for i, n in enumerate(names):
            W, H = weights[n], hessians[n]
            sync()
            t = time.perf_counter()
            r = gptq.quantize_rtn(W, b, cfg.group_size)
            sync()
            t_r += time.perf_counter() - t
            t, c = time.perf_counter(), time.process_time()
            s = gptq.gptq_quantize(W, H, b, cfg.group_size, act_order=cfg.act_order, name=n,
                                   measure=False)
            sync()
            t_g += time.perf_counter() - t
            c_g += time.process_time() - c
            both_errs(W, r.dequantize(), H, abs_r, errs_r)
            both_errs(W, s.dequantize(), H, abs_g, errs_g)
            if b in keep:
                keep[b]["RTN"][n], keep[b]["GPTQ"][n] = r, s
            res["retries"] += s.stats["retries"]
            if opts:
                t, c = time.perf_counter(), time.process_time()
                so = gptq.gptq_quantize(W, H, b, cfg.group_size, name=n, measure=False, **opts)
                sync()
                t_o += time.perf_counter() - t
                c_o += time.process_time() - c
                both_errs(W, so.dequantize(), H, abs_o, errs_o)
                if b in keep:
                    keep[b][f"GPTQ+{opt_label(cfg)}"][n] = so
            progress(cfg, f"{b}-bit {i + 1}/{len(names)} {n}  gptq {t_g:.1f}s (cpu {c_g:.1f}s)  rtn {t_r:.1f}s"
                     + (f"  +{opt_label(cfg)} {t_o:.1f}s" if opts else ""))
        res["gptq_time_s"][b], res["gptq_cpu_s"][b], res["rtn_time_s"][b] = t_g, c_g, t_r
        res["err_rtn"][b], res["err_gptq"][b] = statistics.fmean(errs_r), statistics.fmean(errs_g)
        res["abs_err_rtn"][b], res["abs_err_gptq"][b] = statistics.fmean(abs_r), statistics.fmean(abs_g)
        if opts:
            res["opt_time_s"][b], res["opt_cpu_s"][b], res["err_opt"][b] = t_o, c_o, statistics.fmean(errs_o)
            res["abs_err_opt"][b] = statistics.fmean(abs_o)

    sample = [n for n in names if int(n.split(".")[2]) in cfg.magr_blocks]
    res["sampled"] = {"layers": len(sample), "blocks": list(cfg.magr_blocks), "rtn": {}, "gptq": {}, "magr_gptq": {}}
    magr_w, t0 = {}, time.perf_counter()
    for i, n in enumerate(sample):
        progress(cfg, f"magr {i + 1}/{len(sample)} {n}  {time.perf_counter() - t0:.0f}s")
        magr_w[n] = gptq.magr(weights[n], hessians[n], cfg.magr_alpha, cfg.group_size, cfg.magr_iters)
    res["magr_time_s"] = time.perf_counter() - t0
    for b in cfg.bits:
        e = {"rtn": [], "gptq": [], "magr_gptq": []}
        for n in sample:
            W, H = weights[n], hessians[n]
            e["rtn"].append(rel_err(W, gptq.quantize_rtn(W, b, cfg.group_size).dequantize(), H))
            e["gptq"].append(gptq.gptq_quantize(W, H, b, cfg.group_size, act_order=cfg.act_order).stats["rel_err"])
            Qm = gptq.gptq_quantize(magr_w[n], H, b, cfg.group_size, act_order=cfg.act_order).dequantize()
            e["magr_gptq"].append(rel_err(W, Qm, H))
        for k, v in e.items():
            res["sampled"][k][b] = statistics.fmean(v) if v else float("nan")
    if not cfg.quiet:
        sys.stderr.write("\n")

    res["ppl"] = perplexities(cfg, weights, keep) if keep else None
    del keep
    q_bytes = sum(gptq.QuantLinear.from_state(gptq.quantize_rtn(weights[n], 2, 64)).nbytes() for n in names)
    fp16_bytes = sum(W.numel() * 2 for W in weights.values())
    res.update({"layers": len(names), "weights": wsrc, "hessians": hsrc, "threads": cfg.threads,
                "device": cfg.device, "group_size": cfg.group_size, "act_order": cfg.act_order, "options": opts,
                "gptq_time_median_s": statistics.median(res["gptq_time_s"].values()),
                "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                "rtn_time_median_s": statistics.median(res["rtn_time_s"].values()),
                "ratio_gptq_rtn": {b: res["err_gptq"][b] / res["err_rtn"][b] for b in cfg.bits},
                "ratio_opt_rtn": {b: res["err_opt"][b] / res["err_rtn"][b] for b in res["err_opt"]},
                "abs_ratio_gptq_rtn": {b: res["abs_err_gptq"][b] / res["abs_err_rtn"][b] for b in cfg.bits},
                "abs_ratio_opt_rtn": {b: res["abs_err_opt"][b] / res["abs_err_rtn"][b] for b in res["abs_err_opt"]},
                "opt_time_median_s": statistics.median(res["opt_time_s"].values()) if opts else None,
                "bytes_2bit_g64_vs_fp16": q_bytes / fp16_bytes})
    return res


def report(res: dict, cfg: BenchConfig) -> None:
    s = res["sampled"]
    opt = bool(res["options"])
    lab = f"+{opt_label(cfg)}"
    print(f"GPTQ on {res['layers']} linears (weights: {res['weights']}; Hessians: {res['hessians']}; "
          f"{res['threads']} threads, {res['device']}), group {res['group_size']}, act_order {res['act_order']}"
          + (f"; options {res['options']}" if opt else ""))
    print("err: mean relative error ‖(W − Q)Rᵀ‖/‖WRᵀ‖; /RTN: its ratio to RTN's; ‖·‖/RTN: the ratio of the mean "
          "‖(W − Q)Rᵀ‖ (absolute) to RTN's")
    head = (f"{'bits':>4} | {'GPTQ s':>7} | {'cpu s':>6} | {'RTN s':>6} | {'err RTN':>8} | {'err GPTQ':>8} | "
            f"{'GPTQ/RTN':>8} | {'‖·‖/RTN':>7}")
    if opt:
        head += f" | {lab + ' s':>16} | {'cpu s':>6} | {'err':>7} | {lab + '/RTN':>16} | {'‖·‖/RTN':>7}"
    print(head + f" || sampled {s['layers']} layers: {'RTN':>7} | {'GPTQ':>7} | {'MagR+GPTQ':>9}")
    for b in cfg.bits:
        row = (f"{b:>4} | {res['gptq_time_s'][b]:7.1f} | {res['gptq_cpu_s'][b]:6.1f} | {res['rtn_time_s'][b]:6.2f} | "
               f"{res['err_rtn'][b]:8.4f} | {res['err_gptq'][b]:8.4f} | {res['ratio_gptq_rtn'][b]:8.3f} | "
               f"{res['abs_ratio_gptq_rtn'][b]:7.3f}")
        if opt:
            row += (f" | {res['opt_time_s'][b]:16.1f} | {res['opt_cpu_s'][b]:6.1f} | {res['err_opt'][b]:7.4f} | "
                    f"{res['ratio_opt_rtn'][b]:16.3f} | {res['abs_ratio_opt_rtn'][b]:7.3f}")
        print(row + f" || {'':>23}{s['rtn'][b]:7.4f} | {s['gptq'][b]:7.4f} | {s['magr_gptq'][b]:9.4f}")
    if opt:
        print(f"median GPTQ{lab} time for all {res['layers']} layers: {res['opt_time_median_s']:.1f} s")
    print(f"median GPTQ time for all {res['layers']} layers: {res['gptq_time_median_s']:.1f} s; "
          f"MagR ({cfg.magr_iters} it) on {s['layers']} layers: {res['magr_time_s']:.1f} s; damping retries: "
          f"{res['retries']}; load average {res['load_avg_1min']}; 2-bit g64 QuantLinear bytes / fp16: "
          f"{res['bytes_2bit_g64_vs_fp16']:.4f}")
    if res["ppl"]:
        p = res["ppl"]
        print(f"Wikipedia perplexity ({p['windows']} windows of {p['seq_len']} tokens, no adapter): "
              f"fp32 {p['fp']:.2f}; "
              + "; ".join(f"{b} bits: " + ", ".join(f"{k} {v:,.1f}" for k, v in p[b].items())
                          for b in p if isinstance(b, int)))
    print(json.dumps({"bench": "gptq", **res}))


def parse(argv=None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=BenchConfig.weights)
    p.add_argument("--hessians", default=None)
    p.add_argument("--bits", type=int, nargs="+", default=list(BenchConfig.bits))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--act-order", action="store_true", help="GPTQ with act_order (static groups)")
    p.add_argument("--opt-act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="act_order of the GPTQ + options column (default: as --act-order)")
    p.add_argument("--clip", action="store_true", help="also GPTQ with clip=True (clipped-range grid search)")
    p.add_argument("--cd-passes", type=int, default=0, help="also GPTQ with this many coordinate-descent passes")
    p.add_argument("--refit", action="store_true", help="also GPTQ with refit=True (least-squares scale refits)")
    p.add_argument("--magr-blocks", default="0,15,29", help="comma-separated block indices ('' for none)")
    p.add_argument("--magr-iters", type=int, default=200)
    p.add_argument("--magr-alpha", type=float, default=1e-4)
    p.add_argument("--blocks", type=int, default=30, help="benchmark the first N blocks only (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: see the docstring)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ppl-windows", type=int, default=0, help="whole-model perplexity over N windows (0: off)")
    p.add_argument("--ppl-bits", type=int, nargs="+", default=[2], help="bit widths that get a perplexity")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    blocks = tuple(int(x) for x in a.magr_blocks.split(",") if x.strip())
    if a.cd_passes < 0 or a.ppl_windows < 0:
        p.error("--cd-passes and --ppl-windows must be >= 0")
    return BenchConfig(weights=a.weights, hessians=a.hessians, bits=tuple(a.bits), group_size=a.group_size,
                       act_order=a.act_order, opt_act_order=a.opt_act_order, clip=a.clip, cd_passes=a.cd_passes,
                       refit=a.refit, magr_blocks=blocks, magr_iters=a.magr_iters, magr_alpha=a.magr_alpha, seed=a.seed,
                       layers=a.blocks, threads=a.threads, device=a.device, ppl_windows=a.ppl_windows,
                       ppl_bits=tuple(a.ppl_bits), quiet=a.quiet)


if __name__ == "__main__":
    cfg = parse()
    report(run(cfg), cfg)
