"""Standard GPTQ checkpoints in and out: the layout that transformers (+ gptqmodel/optimum), vLLM, SGLang and
ExLlama read, next to our own bit-plane `quantized.safetensors` (gptq.py).

Per quantized linear W (m, n) = (out_features, in_features), with G = n / g groups:

    qweight int32 (⌈n·b/32⌉, m)  codes q[i, o] packed little-endian along the input dimension,
    qzeros  int32 (G, ⌈m·b/32⌉)  zero points z[a, o] packed the same way along the output dimension,
    scales  fp16  (G, m),         g_idx int32 (n,): the group of input column i (i // g for static groups),
    W[o, i] = scales[g_idx[i], o] · (q[i, o] − z[g_idx[i], o]).

Packing (`pack_rows`): 32 consecutive codes form a 32·b-bit little-endian stream, code k at bits [b·k, b·k + b),
cut into b words; at 2 and 4 bits no code crosses a word, at 3 bits codes 10 and 21 straddle two words.
The rest of the model (embeddings, norms, an untied head) is dense; config.json carries `quantization_config`.

Zero points: `checkpoint_format: "gptq_v2"` stores them as they are (what we write). The older `"gptq"` (v1)
stores z − 1, as GPTQModel converts it: at 2 and 4 bits by subtracting 0x55555555 / 0x11111111 from whole int32
words (so a zero point of 0 borrows from its neighbour and the conversion stays invertible), at 3 bits field by
field modulo 8 (its fields straddle words). Reading v1 adds the same back.

Exactness: our scales are already fp16 (gptq.py rounds with the stored fp16 scale), and both sides dequantize
s·(q − z) with s widened from fp16, so an export read back gives our dequantized weights bitwise.
Act order: our GPTQ fits static groups of consecutive columns in the original order, so it exports as
`desc_act: false` with g_idx = i // g. A `desc_act` checkpoint (groups spread over the columns by g_idx) is read
into a QuantLinear with `in_perm`, the columns sorted by group.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

import gptq
import model as model_lib

FORMATS = ("gptq", "gptq_v2")         # checkpoint_format values read; v2 is written by default
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
_V1_WORD = {2: 0x55555555, 4: 0x11111111}   # one 1 in every field of an int32 word
_U32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------- packing (pure)
def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bits as int32 (two's complement)."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack b-bit codes (k, c) along dim 0 into int32 words (⌈k·b/32⌉, c): every 32 codes form a little-endian
    32·b-bit stream, code j at bits [b·j, b·j + b), cut into b words (at 3 bits, codes 10 and 21 straddle)."""
    gptq._check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_rows: expected 2-D codes, got shape {tuple(codes.shape)}")
    k, c = codes.shape
    x = codes.to(torch.int64)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= 2 ** bits):
        raise ValueError(f"pack_rows: codes must lie in [0, {2 ** bits - 1}] for bits={bits}")
    x = torch.cat([x, x.new_zeros((-k) % 32, c)]).reshape(-1, 32, c)            # (B, 32, c)
    words = x.new_zeros(x.shape[0], bits, c)                                     # (B, b, c) as uint32 in int64
    for j in range(32):
        w, sh = divmod(bits * j, 32)
        words[:, w] |= (x[:, j] << sh) & _U32
        if sh + bits > 32:                                                       # the straddling code's high bits
            words[:, w + 1] |= x[:, j] >> (32 - sh)
    return _to_int32(words.reshape(-1, c)[:math.ceil(k * bits / 32)])


def unpack_rows(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 words (⌈k·b/32⌉, c) -> uint8 codes (k, c)."""
    gptq._check_bits(bits)
    if words.dim() != 2 or words.dtype != torch.int32 or words.shape[0] != math.ceil(k * bits / 32):
        raise ValueError(f"unpack_rows: expected int32 words ({math.ceil(k * bits / 32)}, c) for {k} codes at "
                         f"{bits} bits, got {words.dtype} {tuple(words.shape)}")
    c = words.shape[1]
    u = words.to(torch.int64) & _U32
    nb = math.ceil(k / 32)
    u = torch.cat([u, u.new_zeros(nb * bits - u.shape[0], c)]).reshape(nb, bits, c)   # (B, b, c)
    mask = 2 ** bits - 1
    codes = u.new_empty(nb, 32, c)
    for j in range(32):
        w, sh = divmod(bits * j, 32)
        v = u[:, w] >> sh
        if sh + bits > 32:
            v = v | (u[:, w + 1] << (32 - sh))
        codes[:, j] = v & mask
    return codes.reshape(-1, c)[:k].to(torch.uint8)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (r, k) along dim 1 -> (r, ⌈k·b/32⌉) int32 (the qzeros layout)."""
    return pack_rows(codes.T, bits).T.contiguous()


def unpack_cols(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_cols -> uint8 (r, k)."""
    return unpack_rows(words.T.contiguous(), bits, k).T.contiguous()


def zeros_v2_to_v1(qzeros: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Packed zero points as stored (v2) -> v1's z − 1 (see the module docstring). m: output features."""
    return _shift_zeros(qzeros, bits, m, -1)


def zeros_v1_to_v2(qzeros: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """v1's packed z − 1 -> the zero points as stored (v2); the exact inverse of zeros_v2_to_v1."""
    return _shift_zeros(qzeros, bits, m, +1)


def _shift_zeros(qzeros: torch.Tensor, bits: int, m: int, delta: int) -> torch.Tensor:
    if bits in _V1_WORD:                                                         # whole words, with carry/borrow
        return _to_int32(((qzeros.to(torch.int64) & _U32) + delta * _V1_WORD[bits]) & _U32)
    z = unpack_cols(qzeros, bits, m).to(torch.int64)                             # 3 bits: field by field, mod 8
    return pack_cols((z + delta) & (2 ** bits - 1), bits)


# --------------------------------------------------------------------------------------------- one layer
def layer_tensors(ql: gptq.QuantLinear, checkpoint_format: str = "gptq_v2", bias_dtype: torch.dtype = torch.float16
                  ) -> dict[str, torch.Tensor]:
    """The GPTQ tensors {qweight, qzeros, scales, g_idx[, bias]} of a QuantLinear (its in_perm gives g_idx)."""
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r}: expected one of {FORMATS}")
    st = ql.state()                                          # codes (m, n), scales/zeros (m, G), stored order
    m, n = st.shape
    g, b = st.group_size, st.bits
    codes = st.codes if ql.in_perm is None else st.codes[:, torch.argsort(ql.in_perm)]
    group = torch.arange(n) // g                             # group of stored column j
    g_idx = group if ql.in_perm is None else torch.empty_like(group).scatter_(0, ql.in_perm.cpu(), group)
    qzeros = pack_cols(st.zeros.T.cpu(), b)                  # (G, ⌈m·b/32⌉)
    out = {"qweight": pack_rows(codes.T.cpu(), b),           # (⌈n·b/32⌉, m)
           "qzeros": zeros_v2_to_v1(qzeros, b, m) if checkpoint_format == "gptq" else qzeros,
           "scales": st.scales.T.contiguous().cpu().to(torch.float16),
           "g_idx": g_idx.to(torch.int32)}
    if ql.bias is not None:
        out["bias"] = ql.bias.detach().cpu().to(bias_dtype)
    return out


def _fail(name: str, field: str, msg: str):
    raise ValueError(f"GPTQ tensor {name}.{field}: {msg}")


def layer_from_tensors(name: str, t: dict[str, torch.Tensor], bits: int, group_size: int,
                       checkpoint_format: str, in_features: int | None = None) -> gptq.QuantLinear:
    """A QuantLinear from one layer's GPTQ tensors {qweight, qzeros, scales[, g_idx][, bias]} (see the module
    docstring); group_size −1 means one group per row. ValueError naming the tensor and field on any mismatch."""
    for field in ("qweight", "qzeros", "scales"):
        if field not in t:
            _fail(name, field, "missing")
    qw, qz, sc = t["qweight"], t["qzeros"], t["scales"]
    for field, x in (("qweight", qw), ("qzeros", qz)):
        if x.dtype != torch.int32 or x.dim() != 2:
            _fail(name, field, f"{x.dtype} {tuple(x.shape)}; expected 2-D int32 (pack_dtype int32)")
    if sc.dim() != 2:
        _fail(name, "scales", f"shape {tuple(sc.shape)}; expected (groups, out_features)")
    G, m = sc.shape
    n = in_features if in_features is not None else (
        int(t["g_idx"].numel()) if "g_idx" in t else qw.shape[0] * 32 // bits)
    if qw.shape != (math.ceil(n * bits / 32), m):
        _fail(name, "qweight", f"shape {tuple(qw.shape)}; expected ({math.ceil(n * bits / 32)}, {m}) for "
                               f"in_features={n}, out_features={m} at bits={bits}")
    if qz.shape != (G, math.ceil(m * bits / 32)):
        _fail(name, "qzeros", f"shape {tuple(qz.shape)}; expected ({G}, {math.ceil(m * bits / 32)})")
    g = n if group_size == -1 else group_size
    if g <= 0 or n % g or n // g != G:
        _fail(name, "scales", f"{G} groups; expected in_features={n} / group_size={group_size} (a divisor)")
    scales = sc.to(torch.float16)
    if not torch.equal(scales.to(sc.dtype), sc):
        _fail(name, "scales", f"{sc.dtype} values that fp16 does not hold exactly")
    zeros = unpack_cols(zeros_v1_to_v2(qz, bits, m) if checkpoint_format == "gptq" else qz, bits, m)  # (G, m)
    codes = unpack_rows(qw, bits, n)                                             # (n, m)
    static = torch.arange(n) // g
    perm = None
    if "g_idx" in t:
        g_idx = t["g_idx"].to(torch.int64).reshape(-1)
        if g_idx.numel() != n or (n and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G)):
            _fail(name, "g_idx", f"{g_idx.numel()} entries in [{int(g_idx.min())}, {int(g_idx.max())}]; "
                                 f"expected {n} group indices in [0, {G})")
        if not torch.equal(g_idx, static):
            if not bool((torch.bincount(g_idx, minlength=G) == g).all()):
                _fail(name, "g_idx", f"groups of unequal sizes; expected {g} columns in each of the {G} groups")
            perm = torch.argsort(g_idx, stable=True)                             # columns sorted by group
            codes = codes[perm]
    bias = t.get("bias")
    if bias is not None and tuple(bias.shape) != (m,):
        _fail(name, "bias", f"shape {tuple(bias.shape)}; expected ({m},)")
    state = gptq.QuantState(codes.T.contiguous(), scales.T.contiguous(), zeros.T.contiguous(), bits, g)
    ql = gptq.QuantLinear.from_state(state, bias=None if bias is None else bias.float())
    if perm is not None:
        ql.in_perm = perm
    return ql


# --------------------------------------------------------------------------------------------- folders
def quant_config(folder) -> dict:
    """config.json's quantization_config of a GPTQ folder, checked: gptq, 2/3/4 bits, a format we read."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a GPTQ checkpoint folder)")
    qc = json.loads(path.read_text()).get("quantization_config")
    if not isinstance(qc, dict):
        raise ValueError(f"{path}: no quantization_config (expected a GPTQ checkpoint)")
    where = f"{path} quantization_config"
    if str(qc.get("quant_method", "")).lower() != "gptq":
        raise ValueError(f"{where}.quant_method={qc.get('quant_method')!r}: expected 'gptq'")
    if qc.get("bits") not in gptq.SUPPORTED_BITS:
        raise ValueError(f"{where}.bits={qc.get('bits')!r}: expected one of {gptq.SUPPORTED_BITS}")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in FORMATS:
        raise ValueError(f"{where}.checkpoint_format={fmt!r}: expected one of {FORMATS} (repacked kernel layouts "
                         f"such as marlin or bitblas are not read)")
    if str(qc.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise ValueError(f"{where}.pack_dtype={qc.get('pack_dtype')!r}: expected int32")
    g = qc.get("group_size", -1)
    if not isinstance(g, int) or (g <= 0 and g != -1):
        raise ValueError(f"{where}.group_size={g!r}: expected a positive int or -1")
    return {**qc, "checkpoint_format": fmt, "group_size": g}


def is_gptq_folder(path) -> bool:
    """A folder whose config.json has a quantization_config (what --quantized takes besides our own file)."""
    p = Path(path) / "config.json"
    return Path(path).is_dir() and p.is_file() and "quantization_config" in json.loads(p.read_text())


def load_gptq(folder, device="cpu", shapes: dict[str, tuple[int, int]] | None = None
              ) -> tuple[dict[str, gptq.QuantLinear], dict]:
    """Read every quantized linear of a GPTQ folder (v1 or v2) -> ({name: QuantLinear}, quantization_config).

    shapes {name: (out_features, in_features)}: the layers wanted and their shapes (missing ones fail)."""
    qc = quant_config(folder)
    files = model_lib.checkpoint_files(folder)
    names = sorted({k.rsplit(".", 1)[0] for k in files if k.endswith(".qweight")})
    if shapes is not None:
        missing = [n for n in shapes if n not in names]
        if missing:
            _fail(missing[0], "qweight", f"missing from {folder} ({len(missing)} of the model's linears lack it)")
        names = list(shapes)
    from safetensors import safe_open
    handles = {}
    layers = {}
    try:
        for name in names:
            t = {}
            for field in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                key = f"{name}.{field}"
                if key in files:
                    f = files[key]
                    if f not in handles:
                        handles[f] = safe_open(str(f), framework="pt", device="cpu")
                    t[field] = handles[f].get_tensor(key)
            m, n = shapes[name] if shapes is not None else (None, None)
            ql = layer_from_tensors(name, t, qc["bits"], qc["group_size"], qc["checkpoint_format"], n)
            if m is not None and ql.out_features != m:
                _fail(name, "scales", f"out_features {ql.out_features}; the model expects {m}")
            layers[name] = ql.to(device)
    finally:
        handles.clear()
    return layers, qc


def quantized_linears(model) -> dict[str, gptq.QuantLinear]:
    """{name: QuantLinear} of every block linear of a model (an adapter's frozen base where wrapped)."""
    out = {}
    for name in model_lib.linear_names(model):
        mod = model_lib.get_module(model, name)
        base = getattr(mod, "base", mod)
        if not isinstance(base, gptq.QuantLinear):
            raise ValueError(f"export_gptq: {name} is {type(base).__name__}, not a QuantLinear (quantize it first)")
        out[name] = base
    return out


def fp16_inexact(layers: dict[str, gptq.QuantLinear]) -> list[str]:
    """The layers with a weight s·(q − z) that fp16 does not hold: readers that dequantize in fp16 round those,
    ours and fp32 readers do not (gptq's fp16_exact fits scales for which every weight is exact in fp16)."""
    out = []
    for name, ql in layers.items():
        w = ql.dequantize(torch.float32)                      # exact: 11-bit scales times b-bit integers
        if not torch.equal(w.half().float(), w):
            out.append(name)
    return out


DENSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)   # dense_dtype's candidates, the most widely run first


def dense_dtype(model) -> torch.dtype:
    """The first of fp16, bf16, fp32 that holds every tensor export_gptq writes densely (embeddings, norms, an untied
    head, biases) exactly: the export then computes what the model does (a bf16 checkpoint stays bf16)."""
    layers = quantized_linears(model)
    dense = [t for k, t in model.state_dict().items() if t.is_floating_point() and not k.startswith(tuple(
        n + "." for n in layers))] + [ql.bias for ql in layers.values() if ql.bias is not None]
    for dtype in DENSE_DTYPES:
        if all(torch.equal(t.detach().to(dtype).to(t.dtype), t.detach()) for t in dense):
            return dtype
    return torch.float32


def export_gptq(folder, model, tokenizer_src=None, checkpoint_format: str = "gptq_v2",
                dtype: torch.dtype = torch.float16, max_shard_size: int = 5 * 2 ** 30, extra: dict | None = None
                ) -> list[Path]:
    """Write a model whose block linears are QuantLinears (or adapters over them) as a standard GPTQ folder:
    config.json with quantization_config, the GPTQ tensors of every linear, the rest and the biases in `dtype` (a tied
    head is not written; dense_dtype(model) gives the one that keeps them exact), the tokenizer files of
    tokenizer_src copied. The folder appears whole (written aside, renamed).
    extra: more quantization_config fields. Returns the weight files."""
    folder = Path(folder)
    layers = quantized_linears(model)
    bits = {ql.bits for ql in layers.values()}
    groups = {ql.group_size for ql in layers.values()}
    if len(bits) != 1 or len(groups) != 1:
        raise ValueError(f"export_gptq: one bit width and group size for all layers, got bits {sorted(bits)}, "
                         f"group sizes {sorted(groups)}")
    desc_act = any(ql.in_perm is not None for ql in layers.values())
    tensors = {}
    for name, ql in layers.items():
        for field, t in layer_tensors(ql, checkpoint_format, dtype).items():
            tensors[f"{name}.{field}"] = t
    prefixes = tuple(n + "." for n in layers)
    for key, t in model.state_dict().items():
        if key.startswith(prefixes) or (model.config.tie_word_embeddings and key == "lm_head.weight"):
            continue
        if t.is_floating_point():
            t = t.detach().cpu()
            if not torch.isfinite(t.to(dtype)).all():
                raise ValueError(f"export_gptq: {key} does not fit {dtype} (values beyond its range)")
            t = t.to(dtype)
        tensors[key] = t.contiguous()
    qc = {"quant_method": "gptq", "bits": bits.pop(), "group_size": groups.pop(), "desc_act": desc_act,
          "sym": False, "checkpoint_format": checkpoint_format, "pack_dtype": "int32", "static_groups": False,
          "true_sequential": True, **(extra or {})}
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    cfg["quantization_config"] = qc
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written = model_lib.save_shards(tensors, tmp, max_shard_size)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer_src is not None:
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_src) / f).is_file():
                shutil.copy2(Path(tokenizer_src) / f, tmp / f)
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)                          # safetensors creates 0600 files
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return [folder / p.name for p in written]


def apply_gptq(model, folder, device=None) -> dict:
    """Replace every block linear of `model` by the QuantLinear of the GPTQ folder (shapes checked against the
    model), on `device` (default: where the replaced linear's weight is). Returns the quantization_config."""
    names = model_lib.linear_names(model)
    shapes = {n: (model_lib.get_module(model, n).out_features, model_lib.get_module(model, n).in_features)
              for n in names}
    layers, qc = load_gptq(folder, shapes=shapes)
    for name, ql in layers.items():
        lin = model_lib.get_module(model, name)
        dev = device if device is not None else lin.weight.device if hasattr(lin, "weight") else "cpu"
        model_lib.set_module(model, name, ql.to(dev))
    return qc


# --------------------------------------------------------------------------------------------- the adapter beside it
def adapter_config(model, settings: dict) -> dict:
    """adapter_config.json: what a reader needs besides adapter.safetensors (docs/adapter_format.md): the method,
    budget rank, scale, transform, target modules and every layer's shape and trained values.
    settings: the run's adapter settings (train.save_adapter's metadata)."""
    import baselines
    mods = baselines.adapter_modules(model)
    if not mods:
        raise ValueError("adapter_config: the model has no adapter module")
    layers, scales, transforms = {}, set(), set()
    for name, mod in mods.items():
        lora = isinstance(mod, baselines.LoRALinear)
        kernel = "none" if lora else getattr(mod, "kernel", "wht")
        dims = 0 if lora else getattr(mod, "dims", 1)
        n_values = mod.A.numel() + mod.B.numel() if lora else mod.values.numel()
        layers[name] = {"shape": [mod.out_features, mod.in_features], "values": int(n_values),
                        "scale": float(mod.scale), "transform": kernel, "transform_dims": dims}
        scales.add(float(mod.scale))
        transforms.add((kernel, dims))
    kernel, dims = transforms.pop() if len(transforms) == 1 else ("mixed", None)
    return {"format": "qwha-adapter", "method": settings.get("adapter", "wha"), "budget_rank": settings.get("rank"),
            "scale": scales.pop() if len(scales) == 1 else None, "transform": kernel, "transform_dims": dims,
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n in mods}),
            "delta": {"none": "scale * B @ A", "mixed": None}.get(
                kernel, "scale * F @ T_in" if dims == 1 else "scale * T_out.T @ F @ T_in"),
            "base": {k: settings.get(k) for k in ("model", "bits", "group_size", "quantized")},
            "settings": settings, "layers": layers}
