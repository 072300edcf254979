"""The paper's init-error table on the demo model, and batched refinement against the authors' per-row loop.

    python bench/bench_init.py                      # 4/3/2 bits, r = 8 and 64, blocks 0,5,...,25;
                                                    # timing on all 210 layers
    python bench/bench_init.py --layers all --bits 4 --rank 64 --hessians runs/hessians-32x256.safetensors

1. Calibration: n_calib random windows of seq_len tokens from assets/wikitext/train.txt (seeded), Hessians of
   all 210 linears collected once (calib.collect_hessians, full-precision inputs) and cached to a file.
2. Each layer GPTQ-quantized (gptq.gptq_quantize, group 64) at each bit width, E = W − Q; --gptq refined (default)
   with train.py's GPTQ settings (the defaults of its TrainConfig fields prepare.QUANT_KEYS: act-order, clipped
   grids, coordinate-descent passes, scale refit), --gptq classic with plain GPTQ (every option off). Cached per
   bit width, calibration and settings: runs/gptq-<bits>b-<n>x<len>.safetensors (classic) and
   runs/gptq-<bits>b-<n>x<len>-<settings tag>.safetensors, e.g. ...-ao-clip-cd2-refit (settings also in its metadata).
3. Average layer output error ‖(E − ΔW)Rᵀ‖_F after init, for None, Random, Magnitude (|C|, global top-B),
   AdaAlloc (each refined) and AdaAlloc unrefined, at the same budget B = r(m+n); also AdaAlloc with the
   channel score 'weight' (‖e_i‖, the authors' code) against 'output' (‖e_i Rᵀ‖), AdaAlloc + N rounds of
   exchange search (qwha.swap_search), and AdaAlloc's k_i with the greedy per-row selection (rule='greedy', beyond the
   paper) with and without exchanges. Reported absolute and relative to bare GPTQ (None), as the ratio of the
   layer means (the paper's 7.21 → 3.86 is 0.54×). A reference row: what cancelling the top B coefficients of a
   white error would leave (white_noise_ratio at each layer's density B/(m·n), times its bare error).
4. Timing (one process, alternating per layer, after warm-up): init of every layer (qwha.init_layer_full at
   r = --timing-rank) for each of --timing-methods, and the refinement alone, batched (qwha.refine, float32
   blocks from qwha.FP32_MIN_K, and all-float64) against the authors' per-row loop and a per-row
   normal-equations loop on G blocks (qwha.refine_reference) on the same P, G, support. Agreement: the layer
   error (damped problem) of the float32-block values against the all-float64 ones, and the batched values
   against a per-row least-squares solve of the whitened problem on a few layers (max relative error gap).
5. --ppl-bits: held-out perplexity right after init of all layers (qwha.init_qwha) with top-k + --ppl-rounds
   exchange rounds and greedy + --ppl-greedy-rounds rounds, with each whole-model init time.
Prints a table and one JSON line (also appended to runs/bench_init.jsonl).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import calib  # noqa: E402
import gptq  # noqa: E402
import model as modellib  # noqa: E402
import prepare  # noqa: E402  (the GPTQ settings' keys and the layer quantizer)
import qwha  # noqa: E402
import train  # noqa: E402  (its TrainConfig's defaults: the refined GPTQ settings the bench follows)
from jsonl import emit  # noqa: E402  (bench/jsonl.py: print + append to runs/)


@dataclass
class BenchConfig:
    assets: str = "assets"
    bits: tuple = (4, 3, 2)
    ranks: tuple = (8, 64)
    n_calib: int = 32              # calibration windows
    seq_len: int = 256             # tokens per window
    batch_size: int = 4
    seed: int = 0
    layers: str = "0,5,10,15,20,25"  # block indices for the error table, or "all"
    hessians: str = ""             # Hessian cache file (default runs/hessians-<n>x<len>.safetensors)
    timing: bool = True            # the whole-model init time and batched-vs-loop refinement
    timing_rank: int = 64
    timing_layers: str = "0,5,10,15,20,25"  # blocks for batched-vs-loop refinement ("all": slow, the loops)
    threads: int = 1               # torch threads (1: no oversubscription on shared cores; CPU time reported too)
    workers: int = 2               # timing: also init_qwha(workers=W) and refine(workers=W) (threads; 1: skip)
    verify_layers: int = 3         # layers checked against a per-row lstsq of the whitened problem
    quiet: bool = False
    ppl_bits: int = 0              # > 0: held-out perplexity after init at this bit width (all 210 layers)
    ppl_rank: int = 8
    ppl_rounds: tuple = (0, 1, 2, 4)  # top-k selection with these exchange rounds
    ppl_greedy_rounds: tuple = (0, 2)  # greedy selection (greedy_steps[0] steps) with these exchange rounds
    ppl_windows: int = 16
    swap_rounds: tuple = (1, 2, 4)  # rows "AdaAlloc + swaps (N rounds)"
    greedy_steps: tuple = (8,)     # rows "AdaAlloc greedy (S steps)" and "AdaAlloc greedy + swaps (S steps, 2 rounds)"
    methods: str = ""              # comma list of method labels to run ('' = all; "AdaAlloc + swaps" = every N)
    timing_methods: str = "AdaAlloc"  # comma list of method labels timed over all layers (the first is the reference)
    quantizer: str = "gptq"        # the error table's E = W − Q: gptq (cached) | rtn (round to nearest)
    gptq: str = "refined"          # GPTQ settings: refined (train.py's defaults) | classic (plain gptq_quantize)


def log(cfg, msg):
    if not cfg.quiet:
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- data


def get_hessians(cfg: BenchConfig, model, names):
    path = Path(cfg.hessians or ROOT / f"runs/hessians-{cfg.n_calib}x{cfg.seq_len}.safetensors")
    if path.exists():
        H, meta = calib.load_hessians(path)
        if all(n in H for n in names):
            log(cfg, f"Hessians from {path} ({meta})")
            return H, str(path)
    tok = modellib.Tokenizer.from_pretrained(Path(cfg.assets) / "smollm2-135m")
    train = Path(cfg.assets) / "wikitext" / "train.txt"
    if not train.exists():
        raise FileNotFoundError(f"{train} missing: run `python data.py fetch-demo --out {cfg.assets}`")
    t0 = time.perf_counter()
    ids = tok.encode(train.read_text())
    windows = calib.calibration_windows(ids, cfg.n_calib, cfg.seq_len, torch.Generator().manual_seed(cfg.seed))
    log(cfg, f"tokenized {train}: {len(ids)} tokens ({time.perf_counter() - t0:.1f}s); "
             f"{cfg.n_calib} windows × {cfg.seq_len}")
    t0 = time.perf_counter()
    # float32 products per batch of 1024 tokens, float64 running sum: half the CPU time of float64 products
    H = calib.collect_hessians(model, calib.window_batches(windows, cfg.batch_size), names,
                               product_dtype=torch.float32, progress=not cfg.quiet)
    log(cfg, f"Hessians of {len(H)} layers in {time.perf_counter() - t0:.1f}s -> {path}")
    calib.save_hessians(path, H, {"n_calib": cfg.n_calib, "seq_len": cfg.seq_len, "seed": cfg.seed,
                                  "source": str(train)})
    return H, str(path)


GPTQ_KINDS = ("refined", "classic")


def gptq_settings(kind: str) -> dict:
    """The GPTQ settings of --gptq, as prepare.QUANT_KEYS (magr, act_order, gptq_clip, gptq_cd_passes, ...).
    refined: train.py's defaults (read from its TrainConfig fields, so the bench follows them); classic: all off."""
    import dataclasses

    if kind not in GPTQ_KINDS:
        raise ValueError(f"--gptq {kind!r}: expected one of {GPTQ_KINDS}")
    defaults = {f.name: f.default for f in dataclasses.fields(train.TrainConfig) if f.name in prepare.QUANT_KEYS}
    if set(defaults) != set(prepare.QUANT_KEYS):
        raise ValueError(f"prepare.QUANT_KEYS {prepare.QUANT_KEYS}: not all are TrainConfig fields with defaults")
    if kind == "classic":
        return {k: type(v)(0) for k, v in defaults.items()}      # False / 0 passes: plain gptq_quantize
    return defaults


def gptq_tag(settings: dict) -> str:
    """Cache-name suffix of the settings ('' for classic, e.g. '-ao-clip-cd2-refit' for train.py's)."""
    parts = [("magr", settings["magr"]), ("ao", settings["act_order"]), ("clip", settings["gptq_clip"]),
             (f"cd{settings['gptq_cd_passes']}", settings["gptq_cd_passes"]), ("refit", settings["gptq_refit"]),
             ("fp16x", settings.get("gptq_fp16_exact", False))]
    unknown = set(settings) - {"magr", "act_order", "gptq_clip", "gptq_cd_passes", "gptq_refit", "gptq_fp16_exact"}
    if unknown:
        raise ValueError(f"GPTQ settings {sorted(unknown)} have no cache-name tag: add them to gptq_tag")
    return "".join(f"-{t}" for t, on in parts if on)


def gptq_cache_path(cfg: BenchConfig, bits: int, settings: dict) -> Path:
    return ROOT / f"runs/gptq-{bits}b-{cfg.n_calib}x{cfg.seq_len}{gptq_tag(settings)}.safetensors"


def quantize_layer(W, H, bits, settings: dict, name: str = "") -> torch.Tensor:
    """Q (dequantized fp32) of one layer as train.py quantizes it (prepare.gptq_layer, group 64) with these settings."""
    return prepare.gptq_layer(W, H, bits, 64, settings, name=name, measure=False).dequantize()


def get_quantized(cfg: BenchConfig, weights, H, names, bits):
    """{name: Q (dequantized fp32)} from gptq_quantize with --gptq's settings, cached per bit width, calibration
    and settings (the settings also in the file's metadata, checked on load; the classic files predate it)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    settings = gptq_settings(cfg.gptq)
    path = gptq_cache_path(cfg, bits, settings)
    Q = load_file(str(path)) if path.exists() else {}
    if Q:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "gptq" in meta and json.loads(meta["gptq"]) != settings:
            raise ValueError(f"{path} was made with GPTQ settings {meta['gptq']}, not {settings}: remove it")
    todo = [n for n in names if n not in Q]
    t0 = time.perf_counter()
    for i, name in enumerate(todo):
        Q[name] = quantize_layer(weights[name], H[name], bits, settings, name=name)
        if not cfg.quiet:
            print(f"\rGPTQ ({cfg.gptq}) {bits}b {i + 1}/{len(todo)} ({time.perf_counter() - t0:.0f}s)", end="",
                  file=sys.stderr)
    if todo:
        log(cfg, "")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")   # atomic: other layers already cached are kept
        save_file({k: v.contiguous() for k, v in Q.items()}, str(tmp),
                  metadata={"gptq": json.dumps(settings), "bits": str(bits), "group_size": "64"})
        os.replace(tmp, path)
    return Q


# ---------------------------------------------------------------------------------------------- references


def authors_per_row(bases, RE, support):
    """The authors' refinement loop (QHFT initialize_adapter): for each output row, the whitened basis columns
    of its support (n × k), the normal equations formed from them and solved: f = (BᵀB)⁻¹ Bᵀ (R e_i).
    bases = R Tᵀ (n × n) and RE = R Eᵀ (n × m) are computed once per layer, outside the timed part."""
    rows, cols = support
    m = RE.shape[1]
    k = torch.bincount(rows, minlength=m).tolist()
    out = torch.empty(rows.numel(), dtype=torch.float64)
    start = 0
    for i in range(m):
        if k[i]:
            Bc = bases[:, cols[start:start + k[i]]]                       # (n, k)
            out[start:start + k[i]] = torch.linalg.solve(Bc.T @ Bc, Bc.T @ RE[:, i])
            start += k[i]
    return out


def per_row_lstsq(E, H, support, lam):
    """The refinement of docs/method.md, row by row: min_f ‖(e_i − f T_Ω) Rᵀ‖ with R from the damped H."""
    n = E.shape[1]
    T = wht_matrix(n)
    R = calib.whitening_root(calib.damp(H, lam))
    rows, cols = support
    out = torch.empty(rows.numel(), dtype=torch.float64)
    for i in range(E.shape[0]):
        sel = rows == i
        c = cols[sel]
        A = (T[c] @ R.T).T                                            # (n, k)
        out[sel] = torch.linalg.lstsq(A, (E[i] @ R.T)[:, None], driver="gelsd").solution[:, 0]
    return out


def wht_matrix(n):
    import wht
    return wht.hadamard_matrix(n, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- the table


METHODS = [  # (label, init_layer_full keywords)
    ("None", dict(select="none")),
    ("Random", dict(select="random")),
    ("Magnitude", dict(select="magnitude", rule="magnitude")),
    ("AdaAlloc", dict(select="adaalloc")),
    ("AdaAlloc unrefined", dict(select="adaalloc", refine=False)),
    ("AdaAlloc score=weight", dict(select="adaalloc", score="weight")),
]


def methods(cfg, spec=None):
    ms = METHODS + [(f"AdaAlloc + swaps ({n} rounds)", dict(select="adaalloc", swap_rounds=n)) for n in cfg.swap_rounds]
    for s in cfg.greedy_steps:
        ms += [(f"AdaAlloc greedy ({s} steps)", dict(select="adaalloc", rule="greedy", greedy_steps=s)),
               (f"AdaAlloc greedy + swaps ({s} steps, {qwha.SWAP_ROUNDS_DEFAULT} rounds)",
                dict(select="adaalloc", rule="greedy", greedy_steps=s, swap_rounds=qwha.SWAP_ROUNDS_DEFAULT))]
    spec = cfg.methods if spec is None else spec
    if spec:
        keep = [m.strip() for m in spec.split(",")]
        ms = list(dict((label, kw) for k in keep for label, kw in ms
                       if label == k or label.split(" (")[0] == k).items())
    return ms


def layer_type(name):
    return name.rsplit(".", 1)[-1]


def quantized(cfg, weights, H, names, bits):
    """{name: Q} by --quantizer: GPTQ (cached) or round-to-nearest (gptq.quantize_rtn, group 64)."""
    if cfg.quantizer == "gptq":
        return get_quantized(cfg, weights, H, names, bits)
    return {n: gptq.quantize_rtn(weights[n], bits, group_size=64).dequantize() for n in names}


def quantizer_label(cfg) -> str:
    return f"gptq-{cfg.gptq}" if cfg.quantizer == "gptq" else cfg.quantizer


def top_energy(E, H, frac):
    """(energy along the top ⌈frac·n⌉ eigen-directions u_l of H, total): the output error ‖E Rᵀ‖² = Σ_l λ_l ‖E u_l‖².
    An error white in the whitened domain (GPTQ's aim) puts the share frac there; round-to-nearest far more."""
    lam, U = torch.linalg.eigh(H.double())
    e = lam.clamp_min(0) * (E.double() @ U).square().sum(0)          # (n,) by ascending λ
    return float(e[-max(1, round(frac * E.shape[1])):].sum()), float(e.sum())


WHITE = "white noise, top B of an orthonormal basis"   # the reference row of the error table


def white_noise_ratio(p: float) -> float:
    """The error left, as a fraction, when the largest fraction p of an i.i.d. Gaussian error's coefficients in an
    orthonormal basis are cancelled exactly: sqrt(1 − s), s = E[z²; |z| > t] = 2·(t·φ(t) + p/2), t = Φ⁻¹(1 − p/2).
    What a B = p·m·n sparse init can expect on an error white in the whitened domain (the basis here, T_Ω Rᵀ, is
    not orthonormal, so it is a reference, not a bound)."""
    if p >= 1:
        return 0.0
    if p <= 0:
        return 1.0
    t = float(torch.special.ndtri(torch.tensor(1 - p / 2, dtype=torch.float64)))
    s = 2 * (t * math.exp(-t * t / 2) / math.sqrt(2 * math.pi) + p / 2)
    return math.sqrt(max(0.0, 1 - s))


def error_table(cfg, weights, H, names, bits):
    Q = quantized(cfg, weights, H, names, bits)
    rows = {}
    for r in cfg.ranks:
        top, tot, dens = 0.0, 0.0, []
        for name in names:
            E = weights[name].double() - Q[name].double()
            frac = min(r * sum(E.shape), E.numel()) / E.numel()
            t, a = top_energy(E, H[name], frac)
            top, tot = top + t, tot + a
            dens.append(frac)
        rows[f"{bits}b r={r} concentration"] = {"bits": bits, "rank": r, "method": "concentration",
                                                "top_share": top / tot, "white": statistics.fmean(dens)}
        e0 = None                                                     # each layer's ‖E Rᵀ‖ (the same for every method)
        for label, kw in methods(cfg):
            errs, gptq_errs = [], []
            t0 = time.perf_counter()
            for j, name in enumerate(names):
                E = weights[name].double() - Q[name].double()
                m, n = E.shape
                li = qwha.init_layer_full(E, H[name], min(r * (m + n), m * n),
                                          generator=torch.Generator().manual_seed(j), **kw)
                errs.append(li.err_refined)
                gptq_errs.append(li.err_before)
            key = f"{bits}b r={r} {label}"
            rows[key] = {"bits": bits, "rank": r, "method": label, "mean_err": statistics.fmean(errs),
                         "gptq_err": statistics.fmean(gptq_errs),
                         "ratio": statistics.fmean(errs) / statistics.fmean(gptq_errs),
                         "mean_layer_ratio": statistics.fmean(e / g for e, g in zip(errs, gptq_errs)),
                         "seconds": time.perf_counter() - t0,
                         "per_type": per_type_ratio(names, errs, gptq_errs), "quantizer": quantizer_label(cfg),
                         "removed_energy": 1 - sum(e * e for e in errs) / sum(g * g for g in gptq_errs)}
            log(cfg, f"  {key:<34} mean err {rows[key]['mean_err']:.4g}  ×{rows[key]['ratio']:.3f} of GPTQ")
            e0 = gptq_errs
        if e0 is not None:                                            # each layer's bare error times the reference
            ref = [e * white_noise_ratio(min(1.0, r * sum(weights[nm].shape) / weights[nm].numel()))
                   for e, nm in zip(e0, names)]
            rows[f"{bits}b r={r} white"] = {
                "bits": bits, "rank": r, "method": WHITE, "mean_err": statistics.fmean(ref),
                "gptq_err": statistics.fmean(e0), "ratio": statistics.fmean(ref) / statistics.fmean(e0),
                "mean_layer_ratio": statistics.fmean(a / e for a, e in zip(ref, e0)), "seconds": 0.0,
                "per_type": per_type_ratio(names, ref, e0), "quantizer": quantizer_label(cfg),
                "removed_energy": 1 - sum(a * a for a in ref) / sum(e * e for e in e0)}
    return rows


def per_type_ratio(names, errs, gptq_errs):
    """{q_proj: mean err / mean GPTQ err over the layers of that type, ...} (the per-type figures)."""
    out = {}
    for t in dict.fromkeys(layer_type(n) for n in names):
        sel = [i for i, n in enumerate(names) if layer_type(n) == t]
        out[t] = sum(errs[i] for i in sel) / sum(gptq_errs[i] for i in sel)
    return out


# ---------------------------------------------------------------------------------------------- timing


def whole_model_init(cfg, weights, H, Q, all_names):
    """Init of every layer at r = cfg.timing_rank for each of --timing-methods, alternating per layer (order
    rotated) after a warm-up: {label: (wall s, CPU s, mean error / mean GPTQ error)}. With --workers W > 1, then
    each method once more through qwha.init_qwha(workers=W) on a model of nn.Linear bases holding Q (the API a
    user calls; layers W at a time in threads, torch threads // W each): rows "<label>, W workers", with
    "same_errors": whether every layer's error equals the sequential pass's (so it should at --threads 1; with
    more threads the sequential pass runs on more intra-op threads than each worker) and "max_rel_err_gap"."""
    r = cfg.timing_rank
    ms = methods(cfg, cfg.timing_methods)
    if not ms:
        raise ValueError(f"--timing-methods {cfg.timing_methods!r} matches no method")
    E0 = weights[all_names[0]].double() - Q[all_names[0]].double()   # warm-up
    for _, kw in ms:
        qwha.init_layer_full(E0, H[all_names[0]], r * sum(E0.shape), **kw)
    wall, cpu, err = ({label: 0.0 for label, _ in ms} for _ in range(3))
    errs = {label: [] for label, _ in ms}
    err0 = 0.0
    for j, name in enumerate(all_names):
        E = weights[name].double() - Q[name].double()
        m, n = E.shape
        for label, kw in ms[j % len(ms):] + ms[:j % len(ms)]:
            w0, c0 = time.perf_counter(), time.process_time()
            li = qwha.init_layer_full(E, H[name], min(r * (m + n), m * n), **kw)
            wall[label] += time.perf_counter() - w0
            cpu[label] += time.process_time() - c0
            err[label] += li.err_refined
            errs[label].append(li.err_refined)
        err0 += li.err_before
        if not cfg.quiet:
            print(f"\rinit {j + 1}/{len(all_names)} " + " ".join(f"{v:.1f}s" for v in cpu.values()), end="",
                  file=sys.stderr)
    log(cfg, "")
    out = {label: {"wall_s": wall[label], "cpu_s": cpu[label], "ratio": err[label] / err0,
                   "cpu_vs_first": cpu[label] / cpu[ms[0][0]], "wall_vs_first": wall[label] / wall[ms[0][0]]}
           for label, _ in ms}
    if cfg.workers > 1:
        for label, kw in ms:
            if kw.get("select") == "random":
                continue                                              # init_qwha refuses workers with one generator
            mdl = linear_tree(Q, all_names)
            w0, c0 = time.perf_counter(), time.process_time()
            rows = qwha.init_qwha(mdl, H, weights, budget_rank=r, names=all_names, quiet=True, workers=cfg.workers,
                                  **{"swap_rounds": 0, **kw})
            w, c = time.perf_counter() - w0, time.process_time() - c0
            out[f"{label}, {cfg.workers} workers"] = {
                "wall_s": w, "cpu_s": c, "ratio": sum(x["err_refined"] for x in rows) / err0,
                "cpu_vs_first": c / cpu[ms[0][0]], "wall_vs_first": w / wall[ms[0][0]], "workers": cfg.workers,
                "same_errors": [x["err_refined"] for x in rows] == errs[label],
                "max_rel_err_gap": max(abs(x["err_refined"] - e) / e for x, e in zip(rows, errs[label]))}
            log(cfg, f"init with {cfg.workers} workers ({label}): {w:.1f}s wall, {c:.1f}s CPU")
    return out


def linear_tree(Q, names):
    """A module tree with an nn.Linear at each name (weight Q[name], frozen, shared not copied): the bases
    qwha.init_qwha wraps."""
    root = torch.nn.Module()
    for name in names:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        lin = torch.nn.Linear(Q[name].shape[1], Q[name].shape[0], bias=False)
        lin.weight = torch.nn.Parameter(Q[name], requires_grad=False)
        parent.add_module(leaf, lin)
    return root


def timing(cfg, weights, H, all_names, names):
    """Whole-model init time (all_names), and on `names` the refinement alone: batched (float32 blocks from
    qwha.FP32_MIN_K, and all-float64) vs the authors' loop vs a per-row loop on G blocks (same P, G, support;
    order rotated per layer)."""
    Q = get_quantized(cfg, weights, H, all_names, 4)
    r = cfg.timing_rank
    inits = whole_model_init(cfg, weights, H, Q, all_names)
    first = next(iter(inits.values()))
    init_wall, init_cpu = first["wall_s"], first["cpu_s"]
    t = {"batched": [], "batched64": [], "authors": [], "rowloop": []}
    if cfg.workers > 1:
        t["batched_w"] = []                                           # as "batched", chunks over workers threads
    tc = {k: 0.0 for k in t}                                          # process CPU time per side
    gaps = {"authors": 0.0, "rowloop": 0.0}
    fp32_err_gap = workers_gap = 0.0
    for j, name in enumerate(names):
        E = weights[name].double() - Q[name].double()
        m, n = E.shape
        li = qwha.init_layer_full(E, H[name], min(r * (m + n), m * n), refine=False)
        # the same damped problem for every side; precomputations outside the timed part
        Hd = calib.damp(H[name].double(), 1e-4)
        G = qwha.hadamard_hessian(Hd)
        P = qwha.spectrum(E) @ G
        R = calib.whitening_root(Hd)
        bases, RE = wht_rows(R), R @ E.T                              # R Tᵀ (n, n), R Eᵀ (n, m)
        sides = [("batched", lambda: qwha.refine(P, G, li.indices, fp32_min_k=qwha.FP32_MIN_K)),   # as init_layer_full
                 ("batched64", lambda: qwha.refine(P, G, li.indices)),
                 ("authors", lambda: authors_per_row(bases, RE, li.indices)),
                 ("rowloop", lambda: qwha.refine_reference(P, G, li.indices))]
        if cfg.workers > 1:
            sides.append(("batched_w", lambda: qwha.refine(P, G, li.indices, fp32_min_k=qwha.FP32_MIN_K,
                                                           workers=cfg.workers)))
        sides = sides[j % len(sides):] + sides[:j % len(sides)]       # alternate the order
        res = {}
        for side, fn in sides:
            t0, c0 = time.perf_counter(), time.process_time()
            res[side] = fn()
            t[side].append(time.perf_counter() - t0)
            tc[side] += time.process_time() - c0
        for side in gaps:
            gap = float((res["batched"] - res[side]).abs().max() / res[side].abs().max())
            gaps[side] = max(gaps[side], gap)
        if cfg.workers > 1:                      # one thread: bitwise; more: the round-off of the thread count
            if torch.get_num_threads() == 1 and not torch.equal(res["batched_w"], res["batched"]):
                raise RuntimeError(f"{name}: refine with {cfg.workers} workers differs from 1 worker")
            gap = float((res["batched_w"] - res["batched"]).abs().max() / res["batched"].abs().max())
            workers_gap = max(workers_gap, gap)
        # what float32 blocks cost in the objective: the damped layer error of both value sets, dense
        e32, e64 = (float(qwha.layer_error(E, Hd, dense_F(li.indices, res[s], m, n) @ wht_matrix(n)))
                    for s in ("batched", "batched64"))
        fp32_err_gap = max(fp32_err_gap, abs(e32 - e64) / e64)
        if not cfg.quiet:
            print(f"\rrefine {j + 1}/{len(names)} batched {sum(t['batched']):.1f}s float64 {sum(t['batched64']):.1f}s "
                  f"authors {sum(t['authors']):.1f}s row-loop {sum(t['rowloop']):.1f}s",
                  end="", file=sys.stderr, flush=True)
    log(cfg, "")
    # agreement with plain per-row least squares of the whitened problem (no normal equations), a few layers
    err_gaps = []
    for name in names[: cfg.verify_layers]:
        E = weights[name].double() - Q[name].double()
        m, n = E.shape
        li = qwha.init_layer_full(E, H[name], min(r * (m + n), m * n))
        ref = per_row_lstsq(E, H[name].double(), li.indices, 1e-4)
        F = torch.zeros(m, n, dtype=torch.float64)
        F[li.indices[0], li.indices[1]] = ref
        err_ref = float(qwha.layer_error(E, H[name], F @ wht_matrix(n)))
        err_gaps.append(abs(li.err_refined - err_ref) / err_ref)
    tot = {k: sum(v) for k, v in t.items()}
    return {"init_layers": len(all_names), "init_wall_s": init_wall, "init_cpu_s": init_cpu, "inits": inits,
            "layers": len(names), "rank": r, "refine_batched_s": tot["batched"], "refine_float64_s": tot["batched64"],
            "authors_loop_s": tot["authors"], "row_loop_s": tot["rowloop"],
            "speedup_vs_authors": tot["authors"] / tot["batched"],
            "speedup_vs_row_loop": tot["rowloop"] / tot["batched"],
            "refine_cpu_s": tc, "cpu_speedup_vs_authors": tc["authors"] / tc["batched"],
            "cpu_speedup_vs_row_loop": tc["rowloop"] / tc["batched"],
            "float64_speedup_vs_authors": tot["authors"] / tot["batched64"],
            "median_layer_speedup_vs_authors": statistics.median(a / b for a, b in zip(t["authors"], t["batched"])),
            "max_rel_value_gap_vs_authors": gaps["authors"], "max_rel_value_gap_vs_row_loop": gaps["rowloop"],
            "max_rel_err_gap_float32_blocks": fp32_err_gap, "fp32_min_k": qwha.FP32_MIN_K,
            "verify_layers": names[: cfg.verify_layers], "workers": cfg.workers,
            "refine_workers_s": tot.get("batched_w"),
            "workers_speedup_vs_authors": tot["authors"] / tot["batched_w"] if "batched_w" in tot else None,
            "workers_speedup_vs_row_loop": tot["rowloop"] / tot["batched_w"] if "batched_w" in tot else None,
            "max_rel_value_gap_workers": workers_gap if "batched_w" in tot else None,
            "max_rel_err_gap_vs_lstsq": max(err_gaps) if err_gaps else None, "threads": torch.get_num_threads()}


def ppl_after_init(cfg, weights, H, all_names):
    """Held-out perplexity of the demo model right after init: every linear GPTQ'd at cfg.ppl_bits,
    wrapped by qwha.init_qwha at r = cfg.ppl_rank with the top-k selection and swap_rounds N ∈ cfg.ppl_rounds,
    then the greedy selection (cfg.greedy_steps[0] steps) and N ∈ cfg.ppl_greedy_rounds; also full precision
    and bare GPTQ. A fixed subset: cfg.ppl_windows windows of cfg.seq_len tokens evenly spaced over
    assets/wikitext/test.txt (eval.perplexity). Whole-model init time per run (wall and process CPU)."""
    import copy

    import data
    import eval as evallib
    mpath = Path(cfg.assets) / "smollm2-135m"
    test = Path(cfg.assets) / "wikitext" / "test.txt"
    if not test.exists():
        raise FileNotFoundError(f"{test} missing: run `python data.py fetch-demo --out {cfg.assets}`")
    tok = modellib.Tokenizer.from_pretrained(mpath)
    ids = data.text_token_stream(tok, data.read_text(test))
    Q = get_quantized(cfg, weights, H, all_names, cfg.ppl_bits)
    fp = modellib.from_pretrained(mpath).eval()

    def ppl(mdl):
        return evallib.perplexity(mdl, ids, cfg.seq_len, cfg.ppl_windows)["ppl"]

    out = {"bits": cfg.ppl_bits, "rank": cfg.ppl_rank, "windows": cfg.ppl_windows, "seq_len": cfg.seq_len,
           "fp_ppl": ppl(fp), "runs": []}
    base = copy.deepcopy(fp)
    for name in all_names:
        lin = modellib.get_module(base, name)
        with torch.no_grad():
            lin.weight.copy_(Q[name])
    out["gptq_ppl"] = ppl(base)
    log(cfg, f"ppl: fp {out['fp_ppl']:.3f}, GPTQ {cfg.ppl_bits}b {out['gptq_ppl']:.3f}")
    steps = cfg.greedy_steps[0] if cfg.greedy_steps else qwha.GREEDY_STEPS
    runs = [("output", n) for n in cfg.ppl_rounds] + [("greedy", n) for n in cfg.ppl_greedy_rounds]
    for rule, n_rounds in runs:
        mdl = copy.deepcopy(base)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        rep = qwha.init_qwha(mdl, H, weights, budget_rank=cfg.ppl_rank, names=all_names, quiet=True,
                             swap_rounds=n_rounds, rule=rule, greedy_steps=steps)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        err = statistics.fmean(r["err_refined"] for r in rep)
        g = statistics.fmean(r["err_before"] for r in rep)
        row = {"rule": rule, "greedy_steps": steps if rule == "greedy" else 0, "swap_rounds": n_rounds,
               "ppl": ppl(mdl.eval()), "init_wall_s": wall, "init_cpu_s": cpu, "mean_err": err, "ratio": err / g}
        out["runs"].append(row)
        log(cfg, f"ppl: {rule} swaps {n_rounds}: {row['ppl']:.3f}, init {wall:.0f}s wall {cpu:.0f}s CPU, "
                 f"×{row['ratio']:.3f} of GPTQ")
        del mdl
    return out


def dense_F(support, values, m, n):
    F = torch.zeros(m, n, dtype=torch.float64)
    F[support[0], support[1]] = values
    return F


def wht_rows(R):
    import wht
    return wht.wht(R)


# ---------------------------------------------------------------------------------------------- main


def select_layers(all_names, spec):
    if spec == "all":
        return all_names
    blocks = {int(b) for b in spec.split(",")}
    return [n for n in all_names if int(n.split(".")[2]) in blocks]


def parse(argv=None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = BenchConfig()
    p.add_argument("--assets", default=d.assets)
    p.add_argument("--bits", default=",".join(map(str, d.bits)), help="comma list, e.g. 4,3,2 ('' : no error table)")
    p.add_argument("--rank", default=",".join(map(str, d.ranks)), help="comma list of r (B = r(m+n))")
    p.add_argument("--n-calib", type=int, default=d.n_calib)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--layers", default=d.layers, help="block indices (comma list) for the error table, or 'all'")
    p.add_argument("--hessians", default=d.hessians, help="Hessian cache file (made if missing)")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--timing-layers", default=d.timing_layers, help="block indices for the timing, or 'all'")
    p.add_argument("--timing-rank", type=int, default=d.timing_rank)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--workers", type=int, default=d.workers,
                   help="timing: layers (whole-model init) and chunks (refinement) at once in threads (1: skip)")
    p.add_argument("--verify-layers", type=int, default=d.verify_layers)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--swap-rounds", default=",".join(map(str, d.swap_rounds)),
                   help="comma list of N for the rows 'AdaAlloc + swaps (N rounds)' ('' : none)")
    p.add_argument("--methods", default=d.methods,
                   help="comma list of method labels to run, e.g. 'AdaAlloc,AdaAlloc + swaps' ('' : all)")
    p.add_argument("--ppl-bits", type=int, default=d.ppl_bits,
                   help="held-out perplexity right after init of all layers at these bits (0: skip)")
    p.add_argument("--ppl-rank", type=int, default=d.ppl_rank)
    p.add_argument("--ppl-rounds", default=",".join(map(str, d.ppl_rounds)),
                   help="swap_rounds values compared with the top-k selection ('' : none)")
    p.add_argument("--ppl-greedy-rounds", default=",".join(map(str, d.ppl_greedy_rounds)),
                   help="swap_rounds values compared with the greedy selection ('' : none)")
    p.add_argument("--greedy-steps", default=",".join(map(str, d.greedy_steps)),
                   help="comma list of S for the rows 'AdaAlloc greedy (S steps)' ('' : none); "
                        "the first for --ppl-bits")
    p.add_argument("--quantizer", default=d.quantizer, choices=("gptq", "rtn"),
                   help="the error table's quantizer (rtn: how the init fares on a less white error)")
    p.add_argument("--gptq", default=d.gptq, choices=GPTQ_KINDS,
                   help="GPTQ settings: refined = train.py's defaults (act-order, clipped grids, coordinate descent, "
                        "refit), classic = plain GPTQ; each cached under its own name")
    p.add_argument("--timing-methods", default=d.timing_methods,
                   help="comma list of method labels whose whole-model init is timed (the first is the reference)")
    p.add_argument("--ppl-windows", type=int, default=d.ppl_windows, help="windows of --seq-len tokens of test.txt")
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error(f"--workers {a.workers}: expected 1 (no threaded timing) or more")

    def ints(s):
        return tuple(int(x) for x in s.split(",") if x)

    return BenchConfig(a.assets, ints(a.bits), ints(a.rank), a.n_calib, a.seq_len, d.batch_size, a.seed, a.layers,
                       a.hessians, not a.no_timing, a.timing_rank, a.timing_layers, a.threads, a.workers,
                       a.verify_layers, a.quiet, a.ppl_bits, a.ppl_rank, ints(a.ppl_rounds), ints(a.ppl_greedy_rounds),
                       a.ppl_windows, ints(a.swap_rounds), ints(a.greedy_steps), a.methods, a.timing_methods,
                       a.quantizer, a.gptq)


def main(argv=None):
    cfg = parse(argv)
    torch.set_num_threads(cfg.threads)
    mpath = Path(cfg.assets) / "smollm2-135m"
    if not (mpath / "config.json").exists():
        raise FileNotFoundError(f"{mpath} missing: run `python data.py fetch-demo --out {cfg.assets}`")
    model = modellib.from_pretrained(mpath)
    model.eval()
    all_names = modellib.linear_names(model)
    weights = {n: modellib.get_module(model, n).weight.detach().clone() for n in all_names}
    H, hpath = get_hessians(cfg, model, all_names)
    names = select_layers(all_names, cfg.layers)
    table = {}
    for bits in cfg.bits:
        table.update(error_table(cfg, weights, H, names, bits))
    tim = timing(cfg, weights, H, all_names, select_layers(all_names, cfg.timing_layers)) if cfg.timing else None
    ppl = ppl_after_init(cfg, weights, H, all_names) if cfg.ppl_bits else None

    conc = {k: v for k, v in table.items() if v["method"] == "concentration"}
    table = {k: v for k, v in table.items() if v["method"] != "concentration"}
    if table:
        print(f"\nAverage layer output error after init, {len(names)} layers of SmolLM2-135M, "
              f"{quantizer_label(cfg).upper()} g64, Hessians {cfg.n_calib}×{cfg.seq_len} tokens ({hpath})")
        print(f"{'bits':>4} {'r':>3} {'method':<44} {'mean err':>10} {'× bare':>8} {'mean of ratios':>15} {'time':>9}")
    for row in table.values():
        print(f"{row['bits']:>4} {row['rank']:>3} {row['method']:<44} {row['mean_err']:>10.4g} "
              f"{row['ratio']:>8.3f} {row['mean_layer_ratio']:>15.3f} {row['seconds']:>8.1f}s")
    if table:
        types = list(next(iter(table.values()))["per_type"])
        print(f"\n× bare {quantizer_label(cfg).upper()} per layer type (ratio of the type's mean errors)\n"
              f"{'bits':>4} {'r':>3} {'method':<44} "
              + " ".join(f"{t:>9}" for t in types))
        for row in table.values():
            print(f"{row['bits']:>4} {row['rank']:>3} {row['method']:<44} "
                  + " ".join(f"{row['per_type'][t]:>9.3f}" for t in types))
    if conc:
        print(f"\nShare of the output error ‖ERᵀ‖² along the top d = (B/(m·n))·n eigen-directions of H "
              f"({quantizer_label(cfg).upper()}; white: B/(m·n)), and the share the init removes")
        for row in conc.values():
            removed = {v["method"]: v["removed_energy"] for v in table.values()
                       if (v["bits"], v["rank"]) == (row["bits"], row["rank"])}
            print(f"{row['bits']:>4} {row['rank']:>3} {row['top_share']:>8.3f}   (white {row['white']:.3f})   removed: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in removed.items()))
    if tim:
        print(f"\nInit of all {tim['init_layers']} layers at r={tim['rank']} (given Hessians, "
              f"{tim['threads']} thread(s), "
              f"alternating per layer; 'W workers': qwha.init_qwha(workers=W), W layers at once in threads):")
        print(f"{'method':<44} {'wall':>8} {'CPU':>8} {'CPU ×':>6} {'wall ×':>6} {'× GPTQ':>7}")
        for label, v in tim["inits"].items():
            same = "" if "same_errors" not in v else ("  same errors" if v["same_errors"] else
                                                      f"  errors within {v['max_rel_err_gap']:.0e} (thread round-off)")
            print(f"{label:<44} {v['wall_s']:>7.1f}s {v['cpu_s']:>7.1f}s {v['cpu_vs_first']:>6.2f} "
                  f"{v['wall_vs_first']:>6.2f} {v['ratio']:>7.3f}{same}")
        print(f"Refinement alone over {tim['layers']} layers: batched {tim['refine_batched_s']:.2f}s (all-float64 "
              f"{tim['refine_float64_s']:.2f}s) | authors' per-row loop {tim['authors_loop_s']:.2f}s "
              f"({tim['speedup_vs_authors']:.1f}×, median layer {tim['median_layer_speedup_vs_authors']:.1f}×; "
              f"all-float64 {tim['float64_speedup_vs_authors']:.1f}×) | per-row loop on G blocks "
              f"{tim['row_loop_s']:.2f}s "
              f"({tim['speedup_vs_row_loop']:.1f}×)")
        if tim["refine_workers_s"] is not None:
            print(f"  batched with {tim['workers']} workers {tim['refine_workers_s']:.2f}s: "
                  f"{tim['workers_speedup_vs_authors']:.1f}× the authors' loop, "
                  f"{tim['workers_speedup_vs_row_loop']:.1f}× "
                  f"the per-row loop on G blocks ("
                  + ("the same values bit for bit as 1 worker)" if tim["max_rel_value_gap_workers"] == 0 else
                     f"values within {tim['max_rel_value_gap_workers']:.1e} of 1 worker's at "
                     f"{tim['threads']} threads)"))
        print(f"  CPU time: batched {tim['refine_cpu_s']['batched']:.2f}s | authors' loop "
              f"{tim['refine_cpu_s']['authors']:.2f}s ({tim['cpu_speedup_vs_authors']:.1f}×) | "
              f"per-row loop on G blocks "
              f"{tim['refine_cpu_s']['rowloop']:.2f}s ({tim['cpu_speedup_vs_row_loop']:.1f}×)")
        print(f"Max relative value gap: vs authors' loop {tim['max_rel_value_gap_vs_authors']:.1e}, vs row loop "
              f"{tim['max_rel_value_gap_vs_row_loop']:.1e} (float32 blocks from k = {tim['fp32_min_k']}); their layer "
              f"error vs all-float64 {tim['max_rel_err_gap_float32_blocks']:.1e}; layer-error gap vs per-row lstsq of "
              f"the whitened problem ({len(tim['verify_layers'])} layers) {tim['max_rel_err_gap_vs_lstsq'] or 0:.1e}")
    if ppl:
        print(f"\nHeld-out perplexity right after init, all {len(all_names)} layers GPTQ {ppl['bits']}b, "
              f"r={ppl['rank']}, "
              f"{ppl['windows']} windows × {ppl['seq_len']} of wikitext test: full precision {ppl['fp_ppl']:.3f}, "
              f"GPTQ {ppl['gptq_ppl']:.3f}")
        print(f"{'selection':<18} {'swap rounds':>11} {'ppl':>9} {'× GPTQ err':>11} {'init wall':>10} {'init CPU':>9}")
        for r in ppl["runs"]:
            sel = "top-k" if r["rule"] == "output" else f"greedy ({r['greedy_steps']} steps)"
            print(f"{sel:<18} {r['swap_rounds']:>11} {r['ppl']:>9.3f} {r['ratio']:>11.3f} {r['init_wall_s']:>9.0f}s "
                  f"{r['init_cpu_s']:>8.0f}s")
    result = {"bench": "init", "config": asdict(cfg), "table": list(table.values()),
              "concentration": list(conc.values()),
              "timing": tim, "ppl": ppl}
    emit("bench_init", result)


if __name__ == "__main__":
    main()
