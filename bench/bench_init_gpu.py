"""The QWHA init at a model's widths: seconds per linear and where they go, with random weights and Hessians.

    python bench/bench_init_gpu.py --config bench/configs/llama-3.1-8b.json --device cuda   # one block's 7 linears
    python bench/bench_init_gpu.py --config bench/configs/llama-3.1-8b.json --device cuda --linears down_proj --detail
    python bench/bench_init_gpu.py --config bench/configs/tiny.json                         # a CPU smoke run

Each linear of --blocks blocks of the config (or those named by --linears) gets seeded random weights
W ~ N(0, 0.02) kept on the host (as train.py keeps the originals), a --bits round-to-nearest gptq.QuantLinear base
on --device, and a Hessian H = XᵀX/N on --device from N = --tokens random activations (per-channel log-normal
scales plus a shared low-rank part: correlated, positive definite), one H per shared input (q/k/v, o, gate/up,
down). Each layer is then initialized as qwha.init_qwha does it (E = W − Q in float64 on H's device, then
qwha.init_layer_full with the budget r·(m + n) and init_qwha's defaults: AdaAlloc, top-k selection, refinement,
qwha.SWAP_ROUNDS_DEFAULT exchange rounds, the final refinement). The stages are timed by wrapping the functions
of qwha and qwha_fast for the run (restored after; the results are unchanged), synchronizing CUDA at every stage
boundary: the Hessian in the Hadamard domain (G = T H Tᵀ), the spectrum (C = E Tᵀ), the rest of the layer problem
(P = C G, the row errors), AdaAlloc, the top-k selection, the refinement, the exchange search, its refinement, the
error reports, and the rest. --detail also times the batched solve's pieces (gathers, chunk factorizations,
fallbacks), each call synchronized, in a second table. A warm-up init of a small layer runs first (CUDA context,
solver handles).
The model estimate is the block time times the config's num_hidden_layers (when all 7 linears of a block ran).
A SIGTERM (e.g. from `timeout`) ends the run after the layer in progress is abandoned: the layers done are reported,
with "partial": true.
Prints tables and one JSON line (also appended to runs/bench_init_gpu.jsonl).
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import gptq  # noqa: E402
import model as modellib  # noqa: E402
import qwha  # noqa: E402
import qwha_fast  # noqa: E402
from jsonl import emit  # noqa: E402  (bench/jsonl.py: print + append to runs/)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INPUT_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
            "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out"}   # layers that share one H

# The init's functions timed as stages of init_layer_full: ("module.attribute", column label), patched where they
# are looked up (qwha's own steps in qwha, the fast paths in qwha_fast). A stage inside another is reported apart
# and subtracted from its parent (self time); a second top-level refinement in a layer gets its own column
# ("refine 2": the one after the exchange search).
STAGES = (("qwha.layer_problem", "problem"), ("qwha.hadamard_hessian", "G=THTᵀ"), ("qwha.spectrum", "C=ETᵀ"),
          ("qwha.select_support", "select"), ("qwha.adaalloc", "AdaAlloc"), ("qwha.select_topk", "top-k"),
          ("qwha_fast.select_greedy", "greedy"), ("qwha_fast.solve_support", "refine"),
          ("qwha_fast.swap_search", "swaps"), ("qwha.LayerProblem.error", "errors"),
          ("qwha.LayerProblem.quad", "errors"))
COLUMNS = ("E=W−Q", "G=THTᵀ", "C=ETᵀ", "problem", "AdaAlloc", "top-k", "greedy", "select", "refine", "swaps",
           "refine 2", "errors", "other")   # the main table: each path's self time under its deepest stage
DETAIL = (("qwha_fast._aug_source", "gather source"), ("qwha_fast._chunk_solve", "chunk solve"),
          ("qwha_fast._plain_chunk_solve", "small solve"), ("qwha_fast._chunk_redo", "fp64 redo"),
          ("qwha_fast._block_solve", "block solve"), ("qwha_fast.topk_rows", "row top-k"))


def stage_owner(attr: str):
    """(object, name) that holds a stage "module.attribute" (or "module.Class.method")."""
    module, *path, name = attr.split(".")
    owner = {"qwha": qwha, "qwha_fast": qwha_fast}[module]
    for part in path:
        owner = getattr(owner, part)
    return owner, name

@dataclass
class InitBenchConfig:
    config: str = "bench/configs/llama-3.1-8b.json"
    blocks: int = 1                 # blocks whose linears are initialized (each its own random weights)
    linears: tuple = LINEARS        # which of a block's linears
    rank: int = 64                  # budget r·(m + n) per layer (train.py's default)
    bits: int = 2
    group_size: int = 64
    tokens: int = 0                 # activations per Hessian (0: twice its width, so H has full rank)
    swap_rounds: int = qwha.SWAP_ROUNDS_DEFAULT   # init_qwha's default, as train.py
    rule: str = qwha.RULE_DEFAULT
    device: str = "cpu"
    seed: int = 0
    detail: bool = False            # also time the batched solve's pieces
    threads: int = 0                # torch CPU threads (0: torch's default)
    quiet: bool = False


class OutOfTime(Exception):
    """Raised by the SIGTERM handler that main installs: report the layers done so far."""


def _stop(signum, frame):
    raise OutOfTime(f"signal {signum}")


def log(cfg, msg, end="\n"):
    if not cfg.quiet:
        print(msg, file=sys.stderr, end=end, flush=True)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Self time per stage path ("refine>chunk solve") of the wrapped functions, synchronized at each boundary."""

    def __init__(self, device):
        self.device = device
        self.stack: list = []                       # [key, child seconds] of the open stages
        self.seconds: dict = defaultdict(float)
        self.calls: dict = defaultdict(int)
        self.top: dict = defaultdict(int)           # calls of each top-level label in the current layer

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.top.clear()

    def wrap(self, fn, label):
        def timed(*args, **kwargs):
            if not self.stack:                      # a top-level stage: number the refinements within the layer
                self.top[label] += 1
                key = f"{label} {self.top[label]}" if label == "refine" and self.top[label] > 1 else label
            else:
                key = f"{self.stack[-1][0]}>{label}"
            sync(self.device)
            t0 = time.perf_counter()
            self.stack.append([key, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                dt = time.perf_counter() - t0
                _, child = self.stack.pop()
                self.seconds[key] += dt - child
                self.calls[key] += 1
                if self.stack:
                    self.stack[-1][1] += dt
        return timed

    @contextmanager
    def patched(self, detail: bool):
        """The stage functions replaced by timed wrappers for the duration (looked up in their modules'
        namespaces at each call); always restored."""
        saved = []
        try:
            for attr, label in STAGES + (DETAIL if detail else ()):
                owner, name = stage_owner(attr)
                if not hasattr(owner, name):
                    raise ValueError(f"no {attr}: update bench_init_gpu.STAGES")
                fn = getattr(owner, name)
                saved.append((owner, name, fn))
                setattr(owner, name, self.wrap(fn, label))
            yield self
        finally:
            for owner, name, fn in reversed(saved):
                setattr(owner, name, fn)


def block_linears(config: modellib.ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of a block's linears, read from a one-block model built on "meta"."""
    with torch.device("meta"):
        m = modellib.LlamaForCausalLM(dataclasses.replace(config, num_hidden_layers=1), init=False)
    return {name.rsplit(".", 1)[1]: (mod.out_features, mod.in_features)
            for name in modellib.linear_names(m) for mod in [modellib.get_module(m, name)]}


def random_hessian(n: int, tokens: int, device, seed: int) -> torch.Tensor:
    """H = XᵀX/N (n, n) float32 on device, X = Z·s + U·V (per-channel log-normal scales s, a rank-16 shared part):
    correlated and positive definite when N ≥ n, as calibration Hessians are."""
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(n, generator=g, device=device).mul_(0.5).exp_()                        # (n,)
    V = torch.randn(16, n, generator=g, device=device) * 0.5                              # (16, n)
    H = torch.zeros(n, n, device=device)
    for t0 in range(0, tokens, 4096):                                                     # bounded workspace
        t = min(4096, tokens - t0)
        X = torch.randn(t, n, generator=g, device=device).mul_(s)                        # (t, n)
        X.addmm_(torch.randn(t, 16, generator=g, device=device), V)
        H.addmm_(X.T, X)
    return H.div_(tokens)


def make_layer(shape, bits, group_size, device, seed):
    """(W on the host, its round-to-nearest QuantLinear on device), W ~ N(0, 0.02) seeded."""
    W = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    return W, gptq.QuantLinear.from_state(gptq.quantize_rtn(W.to(device), bits, group_size))


def init_one(W, base, H, rank, swap_rounds, rule):
    """One layer as qwha.init_qwha's init_one does it: E = W − Q in float64 on H's device, init_layer_full."""
    dev = H.device
    sync(dev)
    t0 = time.perf_counter()
    Q = qwha._base_weight(base).detach()
    E = W.to(dev, torch.float64) - Q.to(dev, torch.float64)                               # (m, n)
    sync(dev)
    t_e = time.perf_counter() - t0
    m, n = E.shape
    li = qwha.init_layer_full(E, H, min(rank * (m + n), m * n), swap_rounds=swap_rounds, rule=rule)
    sync(dev)
    total = time.perf_counter() - t0
    return li, t_e, total


def fold(paths: dict) -> dict:
    """Self times per path ("refine 2>small solve") summed under the path's deepest COLUMNS stage ("refine 2")."""
    out = dict.fromkeys(COLUMNS, 0.0)
    for path, sec in paths.items():
        out[next(p for p in reversed(path.split(">")) if p in out)] += sec
    return out


def init_rows(cfg: InitBenchConfig, shapes: dict, hessians: dict, dev, rows: list) -> None:
    """Initialize each asked linear with its stages timed, appending one report row per layer to `rows`."""
    timer = StageTimer(dev)
    total_layers = cfg.blocks * len(cfg.linears)
    with timer.patched(cfg.detail):
        for b in range(cfg.blocks):
            for j, name in enumerate(cfg.linears):
                W, base = make_layer(shapes[name], cfg.bits, cfg.group_size, dev, cfg.seed + 1000 * b + j)
                timer.reset()
                li, t_e, total = init_one(W, base, hessians[INPUT_OF[name]], cfg.rank, cfg.swap_rounds, cfg.rule)
                paths = {"E=W−Q": t_e, **timer.seconds}
                paths["other"] = total - sum(paths.values())
                rows.append({"layer": f"{b}.{name}", "shape": list(shapes[name]), "budget": int(li.values.numel()),
                             "seconds": total, "stages": fold(paths), "paths": paths, "calls": dict(timer.calls),
                             "rel_refined": li.err_refined / max(li.err_before, 1e-30),
                             "k_min": int(li.k.min()), "k_max": int(li.k.max())})
                log(cfg, f"\rinit {len(rows)}/{total_layers} {b}.{name} {shapes[name][0]}×{shapes[name][1]} "
                         f"{total:.2f}s", end="")
                del W, base, li


def run(cfg: InitBenchConfig) -> dict:
    mc = modellib.ModelConfig.from_json(cfg.config)
    shapes = block_linears(mc)
    unknown = [x for x in cfg.linears if x not in shapes]
    if unknown:
        raise ValueError(f"--linears {','.join(unknown)}: expected some of {','.join(shapes)}")
    dev = torch.device(cfg.device)
    log(cfg, f"warm-up (a 256×256 layer) on {dev}")
    Ww, bw = make_layer((256, 256), cfg.bits, cfg.group_size, dev, cfg.seed + 999)
    init_one(Ww, bw, random_hessian(256, 512, dev, cfg.seed + 999), 8, cfg.swap_rounds, cfg.rule)
    widths = {INPUT_OF[x]: shapes[x][1] for x in cfg.linears}
    hessians, h_seconds = {}, {}
    for i, (key, n) in enumerate(sorted(widths.items())):
        sync(dev)
        t0 = time.perf_counter()
        hessians[key] = random_hessian(n, cfg.tokens or 2 * n, dev, cfg.seed + 100 + i)
        sync(dev)
        h_seconds[key] = time.perf_counter() - t0
        log(cfg, f"Hessian {key} ({n}×{n}, {cfg.tokens or 2 * n} tokens) {h_seconds[key]:.2f}s")
    rows, partial = [], False
    try:
        init_rows(cfg, shapes, hessians, dev, rows)
    except OutOfTime:
        partial = True
    log(cfg, "")
    per_block = None
    if set(cfg.linears) == set(LINEARS) and not partial:
        per_block = statistics.mean(sum(r["seconds"] for r in rows[b * 7:(b + 1) * 7]) for b in range(cfg.blocks))
    return {"bench": "init_gpu", "config": asdict(cfg), "model": Path(cfg.config).stem
            if Path(cfg.config).name != "config.json" else Path(cfg.config).parent.name,
            "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "hessian_seconds": h_seconds,
            "rows": rows, "partial": partial, "per_block_s": per_block, "num_hidden_layers": mc.num_hidden_layers,
            "model_estimate_s": per_block * mc.num_hidden_layers if per_block is not None else None}


def report(res: dict) -> None:
    rows = res["rows"]
    top = [k for k in COLUMNS if any(k in r["paths"] or any(p.endswith(">" + k) for p in r["paths"]) for r in rows)]
    c = res["config"]
    print(f"\nQWHA init, {res['model']} widths, r = {c['rank']}, {c['bits']}-bit RTN base, "
          f"{c['swap_rounds']} exchange rounds, {res['device']} ({res['device_name']}); seconds per stage "
          f"(self time; CUDA synchronized at each boundary)")
    print(f"{'layer':<14} {'m×n':>11} {'B':>9} {'total':>7} " + " ".join(f"{k[:9]:>9}" for k in top)
          + f" {'rel err':>7}")
    for r in rows:
        print(f"{r['layer']:<14} {r['shape'][0]:>5}×{r['shape'][1]:<5} {r['budget']:>9} {r['seconds']:>7.2f} "
              + " ".join(f"{r['stages'].get(k, 0.0):>9.3f}" for k in top) + f" {r['rel_refined']:>7.3f}")
    tot = sum(r["seconds"] for r in rows)
    print(f"{'sum':<14} {'':>11} {'':>9} {tot:>7.2f} "
          + " ".join(f"{sum(r['stages'].get(k, 0.0) for r in rows):>9.3f}" for k in top))
    print(f"{'share':<14} {'':>11} {'':>9} {'':>7} "
          + " ".join(f"{sum(r['stages'].get(k, 0.0) for r in rows) / max(tot, 1e-12):>9.1%}" for k in top))
    inner = [k for k in dict.fromkeys(k for r in rows for k in r["paths"]) if ">" in k]
    if inner:
        print(f"\n{'nested stage (self time, all layers)':<44} {'seconds':>9} {'calls':>7}")
        for k in inner:
            print(f"{k:<44} {sum(r['paths'].get(k, 0.0) for r in rows):>9.3f} "
                  f"{sum(r['calls'].get(k, 0) for r in rows):>7}")
    if res["partial"]:
        print(f"\nstopped by a signal after {len(rows)} layer(s): the rest were not run")
    if res["per_block_s"] is not None:
        print(f"\nper block {res['per_block_s']:.2f} s; the model's {res['num_hidden_layers']} blocks "
              f"{res['model_estimate_s'] / 60:.2f} min")


def parse(argv=None) -> InitBenchConfig:
    d = InitBenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=d.config, help="a LLaMA/Mistral config.json (its widths)")
    p.add_argument("--blocks", type=int, default=d.blocks)
    p.add_argument("--linears", default=",".join(d.linears), help="comma list of a block's linears")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--bits", type=int, default=d.bits)
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--tokens", type=int, default=d.tokens, help="activations per Hessian (0: twice its width)")
    p.add_argument("--swap-rounds", type=int, default=d.swap_rounds)
    p.add_argument("--rule", choices=qwha.RULES, default=d.rule)
    p.add_argument("--device", default=d.device)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--detail", action="store_true", help="also time the batched solve's pieces")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.blocks < 1 or a.rank < 1 or a.tokens < 0 or a.swap_rounds < 0:
        p.error("--blocks and --rank must be >= 1, --tokens and --swap-rounds >= 0")
    return InitBenchConfig(a.config, a.blocks, tuple(x for x in a.linears.split(",") if x), a.rank, a.bits,
                           a.group_size, a.tokens, a.swap_rounds, a.rule, a.device, a.seed, a.detail, a.threads,
                           a.quiet)


def main(argv=None) -> dict:
    cfg = parse(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not Path(cfg.config).is_file():
        raise FileNotFoundError(f"--config {cfg.config}: no such config.json")
    signal.signal(signal.SIGTERM, _stop)                              # `timeout`: report the layers done
    res = run(cfg)
    report(res)
    emit("bench_init_gpu", res)
    return res


if __name__ == "__main__":
    main()
