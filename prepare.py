"""Block-streamed preparation: calibrate, quantize (GPTQ) and initialize the adapters one decoder block at a time.

Memory is bounded by one block. The checkpoint is read tensor by tensor (model.CheckpointReader); the calibration
windows' activations at the current block's input are one (N, T, D) tensor, carried from block to block (on the
device, or on the host with offload); a block's Hessians (one per distinct input: q/k/v share one, gate/up share
one), its original weights and its full-precision linears live only while that block is prepared. What stays is
the packed base and the adapters.

    for block i:   inputs --(block i, hooks collect H = XᵀX/N)--> outputs      (docs/method.md, "Calibration")
                   H, W -> GPTQ -> QuantLinear;  E = W - Q, H -> adapter init (AdaAlloc + refinement)
                   free H and W; the outputs are block i+1's inputs

block_inputs="fp" (the paper): the outputs are the full-precision block's, computed in the same pass as the
Hessians, so the result equals the all-at-once path (train.calibrate, quantize, init_adapters on the whole model):
the same per-batch products, the same GPTQ and init inputs, one generator across blocks.
block_inputs="quantized" (GPTQ's sequential mode): the outputs are the prepared block's (quantized base and
adapter at its initial values), one more pass per block.
"""
from __future__ import annotations

import hashlib
import os
import resource
import sys
import time
from pathlib import Path

import torch

import baselines
import calib
import checks
import data
import gptq
import model as model_lib
import qwha

BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHARED_INPUTS = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                 "mlp.up_proj": "mlp.gate_proj"}          # linears that read the very same input tensor
CALIB_BATCH = 4                                           # calibration windows per forward
QUANT_KEYS = ("magr", "act_order", "gptq_clip", "gptq_cd_passes", "gptq_refit",  # GPTQ settings in the file
              "gptq_fp16_exact")


# ---------------------------------------------------------------------------------------------- settings


def quant_settings(cfg) -> dict:
    """cfg's GPTQ settings {key: value} for QUANT_KEYS: what gptq_layer takes and the quantized file records."""
    return {k: getattr(cfg, k) for k in QUANT_KEYS}


def gptq_layer(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, settings: dict, name: str = "",
               measure: bool = True) -> gptq.QuantState:
    """One linear as train.py quantizes it: MagR first if settings["magr"], then GPTQ with the other settings."""
    Wf = W.float()
    Wq = gptq.magr(Wf, H, group_size=group_size) if settings["magr"] else Wf
    return gptq.gptq_quantize(Wq, H, bits, group_size, act_order=settings["act_order"], clip=settings["gptq_clip"],
                              cd_passes=settings["gptq_cd_passes"], refit=settings["gptq_refit"],
                              fp16_exact=settings.get("gptq_fp16_exact", False), name=name, measure=measure)


def adapter_config(cfg) -> baselines.AdapterConfig:
    return baselines.AdapterConfig(cfg.adapter, cfg.transform_dims, cfg.select, cfg.refine, cfg.qa_init, cfg.rank,
                                   cfg.temperature, seed=cfg.seed)


def is_qwha(cfg) -> bool:
    """The paper's method: WHA, 1-D, AdaAlloc, refined, quantization-aware (qwha.init_qwha)."""
    return (cfg.adapter, cfg.transform_dims, cfg.select, cfg.refine, cfg.qa_init in (None, True)) == \
        ("wha", 1, "adaalloc", True, True)


def init_workers(cfg) -> int:
    """--init-workers, 0 resolved: on a CPU one layer per torch thread (the init's small batched solves do not
    use more intra-op threads well, see qwha.wrap_layers), on a GPU one layer at a time."""
    if cfg.init_workers:
        return cfg.init_workers
    return 1 if cfg.device.startswith("cuda") else max(1, torch.get_num_threads())


def init_settings(cfg) -> qwha.InitSettings:
    """QWHA's init settings from train.py's flags (the rest at qwha.InitSettings' defaults)."""
    return qwha.InitSettings(budget_rank=cfg.rank, temperature=cfg.temperature, rule=cfg.rule,
                             greedy_steps=cfg.greedy_steps, swap_rounds=cfg.swap_rounds, seed=cfg.seed,
                             workers=init_workers(cfg))


def init_layers(model, hessians, originals, cfg, names=None, generator=None, quiet=None) -> list[dict]:
    """Adapters for `names` (default: every Hessian's layer): QWHA's init (qwha.init_qwha) or the baseline of
    cfg's adapter settings (baselines.init_adapters). Returns the report rows."""
    quiet = cfg.quiet if quiet is None else quiet
    if is_qwha(cfg):
        return qwha.init_qwha(model, hessians, originals, settings=init_settings(cfg), names=names, quiet=quiet,
                              generator=generator)
    return baselines.init_adapters(model, originals, hessians, adapter_config(cfg), names=names, quiet=quiet,
                                   generator=generator)


def init_summary(rows: list[dict], seconds: float) -> dict:
    """Mean layer-output errors over the layers (bare quantization, after selection, after refinement)."""
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {"err_before": mean("err_before"), "err_select": mean("err_select"), "err_refined": mean("err_refined"),
            "rel_refined": mean("rel_refined"), "seconds": seconds, "layers": rows}


def calibration_windows(tok, cfg) -> torch.Tensor:
    """(n_calib, calib_len) token ids: seeded random windows of the --calib text."""
    stream = data.text_token_stream(tok, data.read_text(cfg.calib))
    if len(stream) < cfg.calib_len:
        raise ValueError(f"--calib {cfg.calib}: {len(stream)} tokens, fewer than one window of --calib-len "
                         f"{cfg.calib_len} (--n-calib {cfg.n_calib} windows are drawn from it): give more text or "
                         f"a smaller --calib-len")
    gen = torch.Generator().manual_seed(cfg.seed)
    return calib.calibration_windows(stream, cfg.n_calib, cfg.calib_len, gen)


def load_quantized_checked(path, names: list[str], cfg, mc: model_lib.ModelConfig) -> dict[str, gptq.QuantLinear]:
    """--quantized's layers (our file, or a GPTQ checkpoint folder of any tool), refused when a layer is missing or
    from other bits, group size or GPTQ settings."""
    if Path(path).is_dir():
        return load_gptq_folder(path, names, cfg, mc)
    loaded, meta = gptq.load_quantized(path)
    wrong = [n for n in names
             if n not in loaded or loaded[n].bits != cfg.bits or loaded[n].group_size != cfg.group_size]
    if wrong:
        raise ValueError(f"--quantized {path}: layer {wrong[0]} missing or not {cfg.bits}-bit with "
                         f"group size {cfg.group_size}")
    for key in QUANT_KEYS:  # a file from other GPTQ settings must not be reused silently (older files lack keys)
        if key in meta and meta[key] != getattr(cfg, key):
            raise ValueError(f"--quantized {path} was made with {key}={meta[key]!r}, but this run has "
                             f"{key}={getattr(cfg, key)!r}: pass the same setting or another --quantized path")
    return loaded


def load_gptq_folder(path, names: list[str], cfg, mc: model_lib.ModelConfig) -> dict[str, gptq.QuantLinear]:
    """The QuantLinears of a GPTQ checkpoint folder given as --quantized, checked against the model and the flags."""
    import gptq_format
    if not gptq_format.is_gptq_folder(path):
        raise ValueError(f"--quantized {path}: a folder without a config.json quantization_config "
                         f"(expected a GPTQ checkpoint folder or a quantized.safetensors file)")
    shapes = {}
    for i in range(mc.num_hidden_layers):
        for local, (m, n) in block_shapes(mc).items():
            shapes[f"model.layers.{i}.{local}"] = (m, n)
    layers, qc = gptq_format.load_gptq(path, shapes={n: shapes[n] for n in names})
    if qc["bits"] != cfg.bits or qc["group_size"] not in (cfg.group_size, -1):
        raise ValueError(f"--quantized {path} is {qc['bits']}-bit with group size {qc['group_size']} "
                         f"(its quantization_config): pass --bits {qc['bits']} --group-size {qc['group_size']}")
    return layers


def block_shapes(mc: model_lib.ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of a block's seven linears, by their names in the block."""
    D, Im, hd = mc.hidden_size, mc.intermediate_size, mc.head_dim
    q, kv = mc.num_attention_heads * hd, mc.num_key_value_heads * hd
    return {"self_attn.q_proj": (q, D), "self_attn.k_proj": (kv, D), "self_attn.v_proj": (kv, D),
            "self_attn.o_proj": (D, q), "mlp.gate_proj": (Im, D), "mlp.up_proj": (Im, D), "mlp.down_proj": (D, Im)}


def load_model(path, quantized=None, adapter=None, device="cpu", dtype=torch.float32):
    """A prepared model read back (eval.py, --resume, the ranks under torchrun): the model of an HF folder, its block
    linears replaced by the QuantLinears of `quantized` (our quantized.safetensors or a standard GPTQ checkpoint
    folder) and wrapped by the adapters of `adapter` when given. Returns (model, tokenizer)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: no config.json there (expected an HF-style model folder)")
    if quantized is None:
        m = model_lib.from_pretrained(path, dtype=dtype, device=device)
    else:                                   # the linears' full-precision weights are never read
        reader = model_lib.CheckpointReader(path)
        with torch.device("meta"):
            m = model_lib.LlamaForCausalLM(reader.config, init=False)
        if Path(quantized).is_dir():
            import gptq_format
            if not gptq_format.is_gptq_folder(quantized):
                raise ValueError(f"--quantized {quantized}: a folder without a config.json quantization_config "
                                 f"(expected a GPTQ checkpoint folder or a quantized.safetensors file)")
            gptq_format.apply_gptq(m, quantized, device=device)
        else:
            layers, _meta = gptq.load_quantized(quantized)
            for name, ql in layers.items():
                model_lib.set_module(m, name, ql.to(device))
        reader.load(m, "", dtype, device)
    if adapter is not None:                 # every adapter kind; QWHA's own files go to qwha.load_adapters
        baselines.load_adapters(adapter, m)
        m.to(device)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m, model_lib.Tokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------- the pipeline


def check_finite(model, prefix: str, cfg) -> None:
    """ValueError naming the first weight read so far under `prefix` that holds NaN or Inf."""
    checks.check_finite(((n, p) for n, p in model.named_parameters() if n.startswith(prefix) and not p.is_meta),
                        f"--model {cfg.model}")


def _rope(model, batch: int, length: int, device, dtype):
    """cos, sin of positions 0..length-1 for `batch` rows, as the model's forward computes them (no padding)."""
    key_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)                      # (B, T)
    inv_freq = model.model.inv_freq(int(position_ids.max()) + 1)
    return model_lib.rope_cos_sin(inv_freq, position_ids, dtype)


class _Stage:
    """Seconds per stage and the peak host / device memory, with one progress line on stderr."""

    def __init__(self, n_blocks: int, device: str, quiet: bool):
        self.n, self.device, self.quiet, self.t0 = n_blocks, device, quiet, time.time()
        self.seconds = {"calibrate_s": 0.0, "quantize_s": 0.0, "init_s": 0.0}
        self.peak_host = 0.0

    def add(self, key: str, since: float) -> float:
        now = time.time()
        self.seconds[key] += now - since
        self.peak_host = max(self.peak_host, host_rss_gb())
        return now

    def show(self, block: int, stage: str) -> None:
        if self.quiet:
            return
        el = time.time() - self.t0
        eta = f", ETA {el / block * (self.n - block):.0f}s" if block else ""
        dev = f", device {torch.cuda.max_memory_allocated() / 2**30:.1f} GB" if self.device.startswith("cuda") else ""
        print(f"\rprepare block {block + 1}/{self.n} {stage} ({el:.0f}s{eta}, host {host_rss_gb():.1f} GB{dev})"
              "\033[K", end="", file=sys.stderr, flush=True)


def _glibc():
    """The C library when it is glibc (for mallopt / malloc_trim), else None."""
    global _libc
    if _libc is None:
        try:
            import ctypes
            lib = ctypes.CDLL("libc.so.6")
            _libc = lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


_libc = None
M_MMAP_THRESHOLD = -3                                     # glibc's mallopt parameter


def bound_host_memory() -> None:
    """Serve host allocations of 1 MiB and more with their own mappings, returned to the OS when freed. glibc's
    default raises that threshold to the largest block freed so far (up to 32 MiB), after which a block's
    tensors come from heaps that fragment: resident memory then grows block after block. Skipped where the
    user set MALLOC_MMAP_THRESHOLD_ or the C library is not glibc."""
    libc = _glibc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def release_memory() -> None:
    """Hand the memory freed with a block back to the OS (glibc keeps freed chunks in its heaps and per-thread
    arenas; the init's worker threads each have one)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def host_rss_gb() -> float:
    """This process's resident memory now (Linux /proc), else its peak."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@torch.no_grad()
def prepare(cfg, tok, log) -> tuple[model_lib.LlamaForCausalLM, dict, dict]:
    """The model of cfg.model with every block linear quantized and wrapped in its initialized adapter, prepared
    block by block. Returns (model, init summary, {seconds per stage and peak memory}). Reuses and writes
    cfg.hessians / cfg.quantized as train.py documents."""
    bound_host_memory()
    dtype, dev = getattr(torch, cfg.dtype), torch.device(cfg.device)
    reader = model_lib.CheckpointReader(cfg.model)
    mc = reader.config
    with torch.device("meta"):
        model = model_lib.LlamaForCausalLM(mc, init=False)
    reader.load(model, "model.embed_tokens.", dtype, dev)
    reader.load(model, "model.norm.", dtype, dev)
    if not mc.tie_word_embeddings:
        reader.load(model, "lm_head.", dtype, dev)
    check_finite(model, "model.", cfg)
    model.requires_grad_(False)                          # only the adapters' values will train
    n_blocks = mc.num_hidden_layers
    block_names = lambda i: [f"model.layers.{i}.{n}" for n in BLOCK_LINEARS]  # noqa: E731
    names = [n for i in range(n_blocks) for n in block_names(i)]

    h_file = cfg.hessians if cfg.hessians and Path(cfg.hessians).exists() else None
    loaded = load_quantized_checked(cfg.quantized, names, cfg, mc) \
        if cfg.quantized and Path(cfg.quantized).exists() else None
    acts = None
    if h_file is None:                                   # the embeddings of the calibration windows: block 0's input
        windows = calibration_windows(tok, cfg)                                            # (N, T)
        home = torch.device("cpu") if cfg.offload_activations else dev
        acts = model.model.embed_tokens(windows.to(dev)).to(home)                         # (N, T, D)
        spans = [(b, min(b + CALIB_BATCH, len(acts))) for b in range(0, len(acts), CALIB_BATCH)]
    ropes = {}                                           # cos, sin per batch size (all full but the last)

    def rope_of(span):
        b = span[1] - span[0]
        if b not in ropes:
            ropes[b] = _rope(model, b, acts.shape[1], dev, dtype)
        return ropes[b]

    def run_block(block, span, keep: bool):
        x = acts[span[0]:span[1]].to(dev)                                                  # (B, T, D)
        cos, sin = rope_of(span)
        y = block(x, cos, sin, "causal")
        if keep:
            acts[span[0]:span[1]] = y.to(acts.device)

    writer = None
    if cfg.hessians and h_file is None:
        shapes = block_shapes(mc)
        widths = {n: shapes[n][1] for n in BLOCK_LINEARS if n not in SHARED_INPUTS}   # one Hessian per input
        entries = [(f"model.layers.{i}.{n}", widths[n]) for i in range(n_blocks) for n in widths]
        aliases = {f"model.layers.{i}.{a}": f"model.layers.{i}.{b}" for i in range(n_blocks)
                   for a, b in SHARED_INPUTS.items()}
        writer = calib.HessianWriter(cfg.hessians, entries, aliases, {"calib": cfg.calib, "n_calib": cfg.n_calib,
                                                                      "calib_len": cfg.calib_len, "seed": cfg.seed})
    gen = torch.Generator().manual_seed(cfg.seed)        # one generator over all blocks, as one init call
    rows, st = [], _Stage(n_blocks, cfg.device, cfg.quiet)
    try:
        for i in range(n_blocks):
            t = time.time()
            st.show(i, "loading")
            reader.load(model, f"model.layers.{i}.", dtype, dev)
            block = model.model.layers[i]
            check_finite(model, f"model.layers.{i}.", cfg)
            block.requires_grad_(False)
            st.show(i, "calibration")
            if h_file is not None:
                H, _ = calib.load_hessians(h_file, block_names(i))
                H = {n: h.to(dev) for n, h in H.items()}
            else:
                keep = cfg.block_inputs == "fp" and i + 1 < n_blocks
                local = calib.block_hessians(block, spans, lambda s: run_block(block, s, keep), list(BLOCK_LINEARS),
                                             SHARED_INPUTS)
                H = {f"model.layers.{i}.{n}": h for n, h in local.items()}
                if writer is not None:
                    for n in BLOCK_LINEARS:
                        if n not in SHARED_INPUTS:
                            writer.write(f"model.layers.{i}.{n}", local[n])
            t = st.add("calibrate_s", t)
            originals = {}
            for j, name in enumerate(block_names(i)):
                st.show(i, f"gptq {j + 1}/{len(BLOCK_LINEARS)}")
                lin = model_lib.get_module(model, name)
                W = lin.weight.detach()                                                    # (m, n)
                if loaded is not None:
                    ql = loaded[name].to(W.device)
                else:
                    state = gptq_layer(W, H[name], cfg.bits, cfg.group_size, quant_settings(cfg), name=name)
                    ql = gptq.QuantLinear.from_state(state, bias=lin.bias)
                    del state
                originals[name] = W
                model_lib.set_module(model, name, ql)
            t = st.add("quantize_s", t)
            st.show(i, "init")
            rows += init_layers(model, H, originals, cfg, names=block_names(i), generator=gen, quiet=True)
            t = st.add("init_s", t)
            if acts is not None and cfg.block_inputs == "quantized" and i + 1 < n_blocks:
                st.show(i, "outputs")
                for s in spans:
                    run_block(block, s, True)
                t = st.add("calibrate_s", t)
            H = local = originals = W = lin = ql = None      # nothing of this block's fp weights or Hessians stays
            release_memory()
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if not cfg.quiet:
        print(file=sys.stderr)
        print(qwha.format_report(rows), file=sys.stderr)
    if loaded is None and cfg.quantized:
        save_quantized(model, Path(cfg.quantized), cfg)
    src = f"loaded from {cfg.quantized}" if loaded is not None else f"GPTQ{' + MagR' if cfg.magr else ''}"
    hsrc = f"loaded from {h_file}" if h_file else f"{cfg.n_calib}x{cfg.calib_len} tokens of {cfg.calib}"
    sec = st.seconds
    log(f"prepared {n_blocks} blocks: Hessians {hsrc} ({sec['calibrate_s']:.1f}s), {len(names)} linears to "
        f"{cfg.bits} bits, group {cfg.group_size}, {src} ({sec['quantize_s']:.1f}s)")
    summary = init_summary(rows, sec["init_s"])
    log(f"{cfg.adapter} init: {len(rows)} adapters, rank-equivalent {cfg.rank}, mean layer output error "
        f"{summary['err_before']:.4g} -> {summary['err_refined']:.4g} ({summary['seconds']:.1f}s)")
    stats = {**sec, "peak_host_gb": st.peak_host}
    if dev.type == "cuda":
        stats["peak_device_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return model, summary, stats


def base_layers(model) -> dict:
    """{name: QuantLinear} of every block linear (under its adapter, if wrapped)."""
    layers = {n: model_lib.get_module(model, n) for n in model_lib.linear_names(model)}
    return {n: getattr(m, "base", m) for n, m in layers.items()}


def packed_sha256(model) -> str:
    """sha256 of the packed tensors of every block linear's base (codes, scales, zeros, bias)."""
    h = hashlib.sha256()
    for name, q in base_layers(model).items():
        for t in (q.qweight, q.scale_bits, q.qzeros, q.bias):
            if t is not None:
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def base_record(model, cfg) -> dict:
    """What the quantized base is: model, bits, group size, GPTQ settings and the sha256 of its packed tensors.
    The quantized file and every adapter initialized on it record it, so eval.py can tell a mismatched pair."""
    return {"model": cfg.model, "bits": cfg.bits, "group_size": cfg.group_size, **quant_settings(cfg),
            "sha256": packed_sha256(model)}


def save_quantized(model, path: Path, cfg) -> None:
    """The packed base of every block linear (the adapters' bases) to `path`, atomically, with its base_record."""
    data.atomic_write(path, lambda p: gptq.save_quantized(p, base_layers(model), base_record(model, cfg)))


# ---------------------------------------------------------------------------------------------- merge and re-quantize


def requant_settings(cfg) -> dict:
    """The run's GPTQ settings for re-quantizing merged weights: fp16-exact scales, as the result is only exported."""
    return {**quant_settings(cfg), "gptq_fp16_exact": True}


@torch.no_grad()
def adapted_block_hessians(model, windows: torch.Tensor, offload: bool = False):
    """Yields (i, {name: H}) for every block i: the Hessians of its seven linears' inputs over the calibration
    windows (N, T), each block run as it is (adapters included), its outputs feeding block i + 1."""
    p = next(model.parameters())
    home = torch.device("cpu") if offload else p.device
    acts = model.model.embed_tokens(windows.to(p.device)).to(home)                   # (N, T, D)
    spans = [(b, min(b + CALIB_BATCH, len(acts))) for b in range(0, len(acts), CALIB_BATCH)]
    ropes = {}

    def run_block(block, span):
        x = acts[span[0]:span[1]].to(p.device)                                        # (B, T, D)
        if x.shape[0] not in ropes:
            ropes[x.shape[0]] = _rope(model, x.shape[0], acts.shape[1], p.device, p.dtype)
        acts[span[0]:span[1]] = block(x, *ropes[x.shape[0]], "causal").to(home)

    for i, block in enumerate(model.model.layers):
        local = calib.block_hessians(block, spans, lambda s, b=block: run_block(b, s), list(BLOCK_LINEARS),
                                     SHARED_INPUTS)
        yield i, {f"model.layers.{i}.{n}": h for n, h in local.items()}


def file_block_hessians(path, n_blocks: int):
    """Yields (i, {name: H}) for every block i from a Hessian file (calib.load_hessians), one block at a time."""
    for i in range(n_blocks):
        yield i, calib.load_hessians(path, [f"model.layers.{i}.{n}" for n in BLOCK_LINEARS])[0]


@torch.no_grad()
def merge_requant(model, hessian_blocks, bits: int, group_size: int, settings: dict, quiet: bool = True
                  ) -> tuple[dict[str, gptq.QuantLinear], list[dict]]:
    """Every adapted linear's merged weight W' = Q + ΔW re-quantized by gptq_layer against its Hessian, block by
    block from hessian_blocks ((i, {name: H}) pairs): one low-bit base that holds the adapter. Returns
    ({name: QuantLinear}, per layer {name, err_q, err_requant}: the output errors ‖(W' − ·)Rᵀ‖ of Q and of the
    re-quantized weight)."""
    adapters = baselines.adapter_modules(model)
    layers, rows, t0 = {}, [], time.time()
    n_blocks = model.config.num_hidden_layers
    for i, H in hessian_blocks:
        for local in BLOCK_LINEARS:
            name = f"model.layers.{i}.{local}"
            if name not in adapters:
                raise ValueError(f"merge_requant: {name} has no adapter to merge")
            mod = adapters[name]
            target = mod.merge()                                                       # (m, n) fp32 Q + ΔW
            h = H[name].to(target.device)
            state = gptq_layer(target, h, bits, group_size, settings, name=name, measure=False)
            layers[name] = gptq.QuantLinear.from_state(state, bias=mod.bias)
            delta = mod.delta_weight(torch.float32)                                    # W' − Q
            rows.append({"name": name, "err_q": gptq.output_error(delta, torch.zeros_like(delta), h)[0],
                         "err_requant": gptq.output_error(target, state.dequantize(), h)[0]})
        if not quiet:
            el = time.time() - t0
            print(f"\rmerge + GPTQ block {i + 1}/{n_blocks} ({el:.0f}s, ETA {el / (i + 1) * (n_blocks - i - 1):.0f}s)"
                  "\033[K", end="", file=sys.stderr, flush=True)
    if not quiet:
        print(file=sys.stderr)
    return layers, rows
