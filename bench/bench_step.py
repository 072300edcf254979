"""Training step time and peak memory: QWHA against LoRA (CLoQ), SHiRA, 2-D DHT (SSH) and 2-D DCT (LoCA) adapters.

    python bench/bench_step.py                                  # CPU: batch 1,4,8 × seq 512, 1 block, no head, r = 64
    python bench/bench_step.py --blocks 30 --head full --device cuda   # the whole model on a GPU
    python bench/bench_step.py --config bench/configs/llama-3.1-8b.json --layers 1 --batch 1,16 --device cuda

--config PATH: any LLaMA/Mistral config.json instead of the demo checkpoint: seeded random weights of that shape,
--layers (= --blocks) decoder blocks built (nothing else of the model's depth is allocated), so the step is
measured at the widths of a model whose weights are not here. --base: the frozen base every adapter wraps,
packed (gptq.QuantLinear from a round-to-nearest --bits quantization: what train.py trains on a GPU, no dense
copy), dense (an nn.Linear: train.py on a CPU) or auto (packed on CUDA, dense elsewhere). --autocast: bf16
autocast around the forward as train.py does on CUDA (auto: on CUDA only).

SmolLM2-135M truncated to --blocks decoder blocks (embedding and final norm kept; with --head full the tied
lm_head and next-token cross-entropy, with --head none the loss is the mean square of the final hidden states,
which leaves out the 49152×576 head GEMMs that are the same for every adapter), every block linear a frozen base
(--base; on a CPU dense, as train.py's --dense-base auto) wrapped in one adapter per variant,
all at the same trainable parameter count r·(m + n) per layer. A step = forward, next-token cross-entropy,
backward, AdamW on the adapter parameters. Step time and memory do not depend on the adapter values or on which
positions the support holds (only on B), so the supports are random (seeded) and the values random: no init.
"QWHA keep W" is QWHA with keep_weight = True (the merged weight saved for the backward instead of re-formed).
The row "frozen base" times the same step with no adapter (bare linears, the embedding output made to require
a gradient so the backward still runs through every block; it also computes the input gradient of the first
block's q/k/v, which the adapters skip, a few % of its time): a variant's step minus it is what the
adapter costs, the split the table's "adapter s" column shows.
Timing: one process, the variants share the base modules and are swapped in turn; per repetition every variant
runs one step, the order rotating; after a warm-up step each; the median per variant, of the wall time and of the
process CPU time (on an oversubscribed machine the CPU time is the steadier of the two; use --threads 1 there).
Memory: on CUDA, torch.cuda.max_memory_allocated per variant (reset before each). On CPU, three figures:
"alloc", the peak of the live tensor bytes allocated during one step above those live before it, from the
profiler's allocation events (the CPU counterpart of max_memory_allocated; deterministic); "peak", the peak
resident set during the variant's first step above the resident set before it (freed heap returned by
malloc_trim, the peak reset through /proc/self/clear_refs; it also reflects what the C allocator keeps, so it
varies from run to run); and "saved", the bytes of the tensors autograd keeps for the backward pass that are not
parameters/buffers, distinct storages counted once. alloc and peak count activations, gradients, AdamW states
and transients.
Prints a table and one JSON line (also appended to runs/bench_step.jsonl).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import baselines as bl  # noqa: E402
import gptq  # noqa: E402
import model as modellib  # noqa: E402
import qwha  # noqa: E402
from jsonl import emit  # noqa: E402  (bench/jsonl.py: print + append to runs/)

VARIANTS = ("QWHA", "QWHA keep W", "LoRA (CLoQ)", "SHiRA", "2-D DHT (SSH)", "2-D DCT (LoCA)", "frozen base")
BASE = "frozen base"   # no adapter: the bare linears, the backward forced through every block (a reference)


@dataclass
class StepConfig:
    assets: str = "assets"
    blocks: int = 1                 # decoder blocks kept (SmolLM2-135M has 30)
    head: str = "none"              # full: lm_head + cross-entropy; none: mean-square loss on the final hidden states
    batches: tuple = (1, 4, 8)
    seq_len: int = 512
    rank: int = 64                  # r: budget r·(m + n) per layer, LoRA rank r (train.py's default)
    reps: int = 5                   # timed steps per variant and batch size (after one warm-up step)
    device: str = "cpu"
    threads: int = 0                # torch threads (0: leave torch's default)
    seed: int = 0
    quiet: bool = False
    random_weights: bool = False    # seeded random weights of the checkpoint's shape: only its config.json is read
    config: str = ""                # a config.json: random weights of its shape, `blocks` blocks (no checkpoint)
    base: str = "auto"              # packed (QuantLinear), dense (nn.Linear), auto (packed on CUDA, as train.py)
    bits: int = 2                   # packed base: round-to-nearest codes of this many bits, group `group_size`
    group_size: int = 64
    autocast: str = "auto"          # bf16 autocast around the forward: on, off, auto (on CUDA, as train.py)

    def packed(self) -> bool:
        return self.base == "packed" or (self.base == "auto" and self.device.startswith("cuda"))

    def use_autocast(self) -> bool:
        return self.autocast == "on" or (self.autocast == "auto" and self.device.startswith("cuda"))

    def label(self) -> str:
        """The model the step is measured on: the config's folder (or file stem), else the demo checkpoint."""
        if not self.config:
            return "SmolLM2-135M"
        p = Path(self.config)
        return p.parent.name if p.name == "config.json" else p.stem


def log(cfg, msg, end="\n"):
    if not cfg.quiet:
        print(msg, file=sys.stderr, end=end, flush=True)


def random_model(config, device, seed: int):
    """A LlamaForCausalLM of `config` made on `device` with seeded N(0, 0.02) weights and unit norms (the step's
    cost does not depend on the values; made in place, so an 8B-wide block needs no host copy)."""
    with torch.device(device):
        model = modellib.LlamaForCausalLM(config, init=False)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def pack_bases(model, names, bits: int, group_size: int) -> None:
    """Replace each linear by a gptq.QuantLinear of its round-to-nearest codes (packed; dequantized per forward)."""
    for name in names:
        lin = modellib.get_module(model, name)
        state = gptq.quantize_rtn(lin.weight.detach(), bits, group_size)
        ql = gptq.QuantLinear.from_state(state, bias=lin.bias)
        modellib.set_module(model, name, ql)
        del lin, state


def build(cfg):
    """The truncated model with frozen bases, and {variant: {name: adapter module}} on those bases."""
    folder = Path(cfg.assets) / "smollm2-135m"
    if cfg.config:
        config = modellib.ModelConfig.from_json(cfg.config)
        config = dataclasses.replace(config, num_hidden_layers=cfg.blocks)
        model = random_model(config, cfg.device, cfg.seed)
    elif cfg.random_weights:     # the step's cost does not depend on the weights' values
        config = modellib.ModelConfig.from_json(folder / "config.json")
        model = modellib.init_weights(modellib.LlamaForCausalLM(config), torch.Generator().manual_seed(cfg.seed))
        model = model.to(cfg.device)
    else:
        model = modellib.from_pretrained(folder, device=cfg.device)
    model.model.layers = model.model.layers[: cfg.blocks]
    for p in model.parameters():
        p.requires_grad_(False)
    names = modellib.linear_names(model)
    if cfg.packed():
        pack_bases(model, names, cfg.bits, cfg.group_size)
    g = torch.Generator().manual_seed(cfg.seed)
    variants = {v: {} for v in VARIANTS}
    for name in names:
        base = modellib.get_module(model, name)
        m, n = base.out_features, base.in_features
        B = min(cfg.rank * (m + n), m * n)
        idx = torch.randperm(m * n, generator=g)[:B].sort().values
        vals = torch.randn(B, generator=g) * 1e-3
        variants["QWHA"][name] = qwha.WHALinear(base, idx, vals)
        variants["QWHA keep W"][name] = qwha.WHALinear(base, idx, vals)
        variants["QWHA keep W"][name].keep_weight = True            # W saved for backward, not re-formed
        variants["SHiRA"][name] = bl.SpectralLinear(base, idx, vals, "identity", 1)
        variants["2-D DHT (SSH)"][name] = bl.SpectralLinear(base, idx, vals, "dht", 2)
        variants["2-D DCT (LoCA)"][name] = bl.SpectralLinear(base, idx, vals, "dct", 2)
        r = min(cfg.rank, m, n)
        A = torch.randn(r, n, generator=g) / n ** 0.5
        variants["LoRA (CLoQ)"][name] = bl.LoRALinear(base, A, torch.randn(m, r, generator=g) * 1e-3)
        variants[BASE][name] = base
    for mods in variants.values():
        for mod in mods.values():
            mod.to(cfg.device)
    return model, names, variants


_hooks = []


def attach(model, mods, frozen=False):
    """Put `mods` into the model; frozen: nothing trains, so make the embedding output require a gradient to
    keep the backward running through every block."""
    for name, mod in mods.items():
        modellib.set_module(model, name, mod)
    while _hooks:
        _hooks.pop().remove()
    if frozen:
        _hooks.append(model.model.embed_tokens.register_forward_hook(lambda m, i, o: o.detach().requires_grad_()))


def loss_of(model, ids, head, autocast: bool = False):
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(ids) if head == "full" else model.model(ids)       # (B, T, V) logits or (B, T, d) hidden
    if head == "full":
        return F.cross_entropy(out[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return out.float().square().mean()


def step(model, opt, ids, head, autocast: bool = False):
    loss = loss_of(model, ids, head, autocast)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss


def sync(cfg):
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()


def saved_bytes(model, ids, head, autocast: bool = False) -> int:
    """Bytes of the new tensors autograd saves for backward in one forward (parameters/buffers excluded)."""
    known = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    held = []     # the saved tensors' storages, alive until the graph goes (else freed memory gets reused and
                  # distinct tensors would share a data_ptr); storages, not tensors: a tensor would hold the graph

    def pack(t):
        if isinstance(t, torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in known:
                seen[ptr] = t.untyped_storage().nbytes()
            held.append(t.untyped_storage())
        # the graph keeps nothing: it never runs backward, and returning t would let a node hold its own output
        # (a reference cycle through C++ that Python's gc cannot see), so every activation of it would leak
        return None

    def unpack(_):
        raise RuntimeError("saved_bytes: the measuring forward pass cannot run backward")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss_of(model, ids, head, autocast)
    return sum(seen.values())


def alloc_peak_bytes(model, opt, ids, head, autocast: bool = False) -> int:
    """Peak of the bytes of live tensors allocated during one step above those live before it, from the
    profiler's allocation events (what torch.cuda.max_memory_allocated measures on a GPU): deterministic,
    unlike the resident set, which also reflects what the C allocator keeps or returns."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, opt, ids, head, autocast)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def _proc_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak_rss() -> int:
    """Return freed heap to the OS, reset VmHWM to the current RSS; returns the current RSS in kB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_kb("VmRSS")


def measure(cfg, model, names, variants, batch):
    ids = torch.randint(0, model.config.vocab_size, (batch, cfg.seq_len),
                        generator=torch.Generator().manual_seed(batch)).to(cfg.device)
    params = {v: [p for mod in mods.values() for p in mod.parameters() if p.requires_grad]
              for v, mods in variants.items()}
    opts = {v: torch.optim.AdamW(ps, lr=1e-4) if ps else None for v, ps in params.items()}
    counts = {v: sum(p.numel() for p in ps) for v, ps in params.items()}
    times = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    peak, act, alloc = {}, {}, {}
    ac = cfg.use_autocast()
    for v in VARIANTS:                                                  # warm-up, memory
        attach(model, variants[v], v == BASE)
        act[v] = saved_bytes(model, ids, cfg.head, ac)
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = reset_peak_rss() * 1024
        step(model, opts[v], ids, cfg.head, ac)
        sync(cfg)
        if cfg.device.startswith("cuda"):
            peak[v] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak[v] = (_proc_kb("VmHWM") * 1024 - base) / 2**20
        alloc[v] = (peak[v] if cfg.device.startswith("cuda")
                    else alloc_peak_bytes(model, opts[v], ids, cfg.head, ac) / 2**20)
    for rep in range(cfg.reps):
        order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[: rep % len(VARIANTS)]
        for v in order:
            attach(model, variants[v], v == BASE)
            sync(cfg)
            t0, c0 = time.perf_counter(), time.process_time()
            step(model, opts[v], ids, cfg.head, ac)
            sync(cfg)
            times[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
        log(cfg, f"\rbatch {batch} rep {rep + 1}/{cfg.reps} " + " ".join(
            f"{v.split(' (')[0]} {statistics.median(t):.2f}s" for v, t in times.items()), end="")
    log(cfg, "")
    return {v: {"step_s": statistics.median(times[v]), "steps_s": times[v], "trainable": counts[v],
                "cpu_s": statistics.median(cpu[v]), "cpus_s": cpu[v],
                "saved_mb": act[v] / 2**20, "peak_mb": peak[v], "alloc_mb": alloc[v]} for v in VARIANTS}


def ratio(a: float, b: float) -> float:
    """a / b, NaN where b is 0 (a peak that the resident set did not show on a tiny model)."""
    return a / b if b else float("nan")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = StepConfig()
    p.add_argument("--assets", default=d.assets)
    p.add_argument("--blocks", "--layers", type=int, default=d.blocks, dest="blocks",
                   help="decoder blocks (with --config, the only ones built)")
    p.add_argument("--head", choices=("full", "none"), default=d.head)
    p.add_argument("--batch", default=",".join(map(str, d.batches)), help="comma list of batch sizes")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--reps", type=int, default=d.reps)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--random-weights", action="store_true",
                   help="seeded random weights of the checkpoint's shape (only config.json is read; the timings do "
                        "not depend on the values: a GPU machine needs no copy of the weights)")
    p.add_argument("--config", default=d.config,
                   help="a LLaMA/Mistral config.json: seeded random weights of its shape instead of the demo model")
    p.add_argument("--base", choices=("auto", "packed", "dense"), default=d.base,
                   help="frozen base: packed QuantLinear (train.py on a GPU), dense nn.Linear, auto (packed on CUDA)")
    p.add_argument("--bits", type=int, default=d.bits, help="packed base: bits of its round-to-nearest codes")
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--autocast", choices=("auto", "on", "off"), default=d.autocast,
                   help="bf16 autocast around the forward (auto: on CUDA, as train.py)")
    a = p.parse_args(argv)
    try:
        batches = tuple(int(b) for b in a.batch.split(","))
    except ValueError:
        p.error(f"--batch {a.batch!r}: expected a comma list of positive ints")
    if min(batches) < 1 or a.blocks < 1 or a.reps < 1 or a.seq_len < 2:
        p.error("--batch, --blocks, --reps must be >= 1 and --seq-len >= 2")
    return StepConfig(a.assets, a.blocks, a.head, batches, a.seq_len, a.rank, a.reps, a.device, a.threads, a.seed,
                      a.quiet, a.random_weights, a.config, a.base, a.bits, a.group_size, a.autocast)


def main(argv=None):
    cfg = parse(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.config and not Path(cfg.config).is_file():
        raise FileNotFoundError(f"--config {cfg.config}: no such config.json")
    if not cfg.config and not (Path(cfg.assets) / "smollm2-135m" / "config.json").exists():
        raise FileNotFoundError(f"{cfg.assets}/smollm2-135m missing: "
                                f"run `python data.py fetch-demo --out {cfg.assets}`")
    model, names, variants = build(cfg)
    shapes = sorted({(modellib.get_module(model, n).out_features, modellib.get_module(model, n).in_features)
                     for n in names})
    res = {}
    for batch in cfg.batches:
        res[batch] = measure(cfg, model, names, variants, batch)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    mem_kind = "CUDA max allocated" if cfg.device.startswith("cuda") else "peak RSS; alloc = peak live tensor bytes"
    base_kind = f"packed {cfg.bits}-bit base" if cfg.packed() else "dense base"
    widths = ", ".join(f"{m}×{n}" for m, n in shapes)
    print(f"\nTraining step, {cfg.label()} with {cfg.blocks} block(s) (linears {widths}), "
          f"{base_kind}, {'bf16 autocast' if cfg.use_autocast() else 'no autocast'}, head {cfg.head}, "
          f"seq {cfg.seq_len}, "
          f"r = {cfg.rank} ({res[cfg.batches[0]]['QWHA']['trainable']} trainable parameters each), {cfg.device}, "
          f"{torch.get_num_threads()} threads, load average {' '.join(load)}; "
          f"peak = {mem_kind} during a step above before it")
    print(f"{'batch':>5} {'variant':<16} {'step s':>8} {'× LoRA':>7} {'QWHA ×':>7} {'adapter s':>9} {'CPU s':>8} "
          f"{'× LoRA':>7} {'alloc MB':>9} {'× LoRA':>7} {'peak MB':>9} {'× LoRA':>7} {'saved MB':>9} {'× LoRA':>7}")
    summary = {}
    for batch, r in res.items():
        lo, q, base = r["LoRA (CLoQ)"], r["QWHA"], r[BASE]
        for v in VARIANTS:
            x = r[v]
            x["adapter_s"] = x["step_s"] - base["step_s"]                 # the step minus the frozen base's
            pk = (f"{x['alloc_mb']:>9.1f} {ratio(x['alloc_mb'], lo['alloc_mb']):>7.3f} "
                  f"{x['peak_mb']:>9.1f} {ratio(x['peak_mb'], lo['peak_mb']):>7.3f}")
            print(f"{batch:>5} {v:<16} {x['step_s']:>8.3f} {ratio(x['step_s'], lo['step_s']):>7.3f} "
                  f"{ratio(q['step_s'], x['step_s']):>7.3f} {x['adapter_s']:>9.3f} {x['cpu_s']:>8.3f} "
                  f"{ratio(x['cpu_s'], lo['cpu_s']):>7.3f} {pk} {x['saved_mb']:>9.1f} "
                  f"{ratio(x['saved_mb'], lo['saved_mb']):>7.3f}")
        summary[batch] = {"qwha_over_lora_step": ratio(q["step_s"], lo["step_s"]),
                          "qwha_over_2d_dct_step": ratio(q["step_s"], r["2-D DCT (LoCA)"]["step_s"]),
                          "qwha_over_2d_dht_step": ratio(q["step_s"], r["2-D DHT (SSH)"]["step_s"]),
                          "qwha_over_shira_step": ratio(q["step_s"], r["SHiRA"]["step_s"]),
                          "qwha_over_lora_cpu": ratio(q["cpu_s"], lo["cpu_s"]),
                          "qwha_over_2d_dct_cpu": ratio(q["cpu_s"], r["2-D DCT (LoCA)"]["cpu_s"]),
                          "qwha_over_lora_saved": ratio(q["saved_mb"], lo["saved_mb"]),
                          "qwha_over_lora_peak": ratio(q["peak_mb"], lo["peak_mb"]),
                          "qwha_over_lora_alloc": ratio(q["alloc_mb"], lo["alloc_mb"]),
                          "qwha_keep_w_over_lora_cpu": ratio(r["QWHA keep W"]["cpu_s"], lo["cpu_s"]),
                          "qwha_keep_w_over_lora_alloc": ratio(r["QWHA keep W"]["alloc_mb"], lo["alloc_mb"]),
                          "frozen_base_step": base["step_s"],
                          "adapter_step": {v: r[v]["adapter_s"] for v in VARIANTS if v != BASE}}
    result = {"bench": "step", "config": asdict(cfg), "model": cfg.label(), "shapes": [list(s) for s in shapes],
              "packed_base": cfg.packed(), "autocast": cfg.use_autocast(), "load": load,
              "threads": torch.get_num_threads(),
              "results": {str(b): r for b, r in res.items()}, "summary": {str(b): s for b, s in summary.items()}}
    emit("bench_step", result)
    return result


if __name__ == "__main__":
    main()
