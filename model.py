"""LLaMA / Mistral decoder models from Hugging Face checkpoints, without `transformers`.

What is here: `ModelConfig` (read from `config.json`), the model with the checkpoint's module names
(`model.layers.{i}.self_attn.q_proj`, ...: every linear is an `nn.Linear` reachable by name, so quantizers and
adapters can swap them with `set_module`), loading from (sharded) safetensors tensor by tensor into an
uninitialized model, saving the same layout back, a `tokenizers`-based `Tokenizer` with the simple ChatML and
Llama-3 chat templates, and `generate` with a KV cache (greedy or temperature/top-p sampling).

The numerics follow the reference implementation (transformers' LlamaForCausalLM / MistralForCausalLM):
RMSNorm in fp32 then cast back, rotary embeddings in the "rotate half" layout with fp32 angles, SDPA attention.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

MODEL_TYPES = ("llama", "mistral")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


# ----------------------------------------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    """The fields of a LLaMA/Mistral `config.json` that change the computation (plus special token ids)."""
    model_type: str = "llama"            # "llama" or "mistral"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: = num_attention_heads (MHA); fewer: GQA/MQA
    head_dim: int | None = None          # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # {"rope_type": "llama3"|"linear"|"dynamic", "factor": ..., ...}
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None    # Mistral: a query sees the last `sliding_window` keys (itself included)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None       # the checkpoint's dtype, informative
    extra: dict = field(default_factory=dict, repr=False)  # other keys of config.json, written back on save

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"config field model_type={self.model_type!r}: expected one of {MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"config field {name}={v!r}: expected a positive integer")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"config field hidden_size={self.hidden_size} is not divisible by "
                                 f"num_attention_heads={self.num_attention_heads}; give head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config field num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act != "silu":
            raise ValueError(f"config field hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            kind = rs.get("rope_type", rs.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ValueError(f"config field rope_scaling.rope_type={kind!r}: expected one of {ROPE_TYPES}")
            need = {"linear": ["factor"], "dynamic": ["factor"],
                    "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}
            missing = [k for k in need.get(kind, []) if k not in rs]
            if missing:
                raise ValueError(f"config field rope_scaling ({kind}) lacks {missing}")
            rs["rope_type"] = kind
            self.rope_scaling = None if kind == "default" else rs
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"config field sliding_window={self.sliding_window}: expected a positive int or null")

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Build from a `config.json` dict (transformers 4.x layout, or 5.x with `rope_parameters` / `dtype`)."""
        d = dict(d)
        if "model_type" not in d:
            raise ValueError("config field model_type is missing: expected 'llama' or 'mistral'")
        rp = d.pop("rope_parameters", None)
        if isinstance(rp, dict):  # transformers >= 5 keeps rope_theta and the scaling together
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", rp.get("type", "default")) != "default":
                d.setdefault("rope_scaling", {k: v for k, v in rp.items() if k != "rope_theta"})
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        names = {f.name for f in fields(cls)} - {"extra"}
        if d["model_type"] != "mistral":
            names.discard("sliding_window")  # LlamaForCausalLM has no window: keep the key, ignore it
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if d["model_type"] == "mistral":
            known.setdefault("sliding_window", 4096)  # the reference's MistralConfig default when the key is absent
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:                   # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of model settings, found a {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:      # a field of the wrong type, or a bad value
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        d = dict(self.extra)
        for f in fields(self):
            if f.name != "extra" and not (f.name == "sliding_window" and self.model_type != "mistral"):
                d[f.name] = getattr(self, f.name)
        d.pop("rope_parameters", None)
        d["architectures"] = ["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"]
        return d


# ------------------------------------------------------------------------------------------------ math (pure)
def rope_inv_freq(config: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies θ_j = base^(-2j/d) of the rotary embedding, with the config's scaling. (d/2,) fp32.

    linear: θ/factor. llama3: long wavelengths (> L/low) divided by factor, short ones (< L/high) kept, a smooth
    blend between. dynamic (NTK): for seq_len > max_position_embeddings the base grows to
    base·(factor·seq_len/max_pos − (factor−1))^(d/(d−2)), computed on every call from the current length.
    """
    dim, base = config.head_dim, config.rope_theta
    exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    kind = config.rope_type
    if kind == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        factor = config.rope_scaling["factor"]
        grown = factor * torch.tensor(seq_len) / config.max_position_embeddings - (factor - 1)  # fp32, as the ref
        base = base * grown ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** exps)
    if kind == "linear":
        inv_freq = inv_freq / config.rope_scaling["factor"]
    elif kind == "llama3":
        rs = config.rope_scaling
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of the angles p·θ in the "rotate half" layout: (B, T, d) each, angles in fp32, cast to dtype."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)                                # (B, T, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, d) rotated by the angles; cos/sin (B, T, d)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def attention_mask_4d(key_mask: torch.Tensor, q_len: int, window: int | None) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask, True = attend: causal, key padding, and the sliding window when set.

    key_mask (B, S) marks real tokens among all S keys (the cached ones and the T new ones, which come last).
    Query t sits at index S−T+t. A query that would see nothing (a left pad) is let see itself, so SDPA never
    meets an empty row; those positions are padding and nothing real attends to them.
    """
    S = key_mask.shape[1]
    q_idx = torch.arange(S - q_len, S, device=key_mask.device)[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=key_mask.device)[None, :]              # (1, S)
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (k_idx > q_idx - window)
    mask = allowed[None, None] & key_mask[:, None, None, :].bool()        # (B, 1, T, S)
    return mask | (k_idx == q_idx)[None, None]


# ------------------------------------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """w · x / sqrt(mean(x²) + eps), normalized in fp32 and cast back before the scale (as the reference)."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache:
    """Per-layer key/value buffers (B, n_kv, max_len, hd) and the padding mask of what they hold."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # (B, max_len)
        self.max_len, self.len = max_len, 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the new (B, n_kv, T, hd) keys/values after the cached ones; return all of them so far."""
        start, end = self.len, self.len + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx, self.n_heads, self.n_kv, self.head_dim = layer_idx, c.num_attention_heads, \
            c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)     # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                                # (B, n_kv, S, hd)
        if self.n_kv != self.n_heads:  # GQA: each KV head serves n_heads/n_kv query heads
            rep = self.n_heads // self.n_kv
            k = k[:, :, None].expand(B, self.n_kv, rep, *k.shape[2:]).reshape(B, self.n_heads, *k.shape[2:])
            v = v[:, :, None].expand(B, self.n_kv, rep, *v.shape[2:]).reshape(B, self.n_heads, *v.shape[2:])
        if isinstance(mask, str):  # "causal": no padding, no window that binds, no cache
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        """SwiGLU: down(silu(gate(x)) * up(x))."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, the decoder blocks and the final norm: input ids (B, T) -> hidden states (B, T, D)."""

    def __init__(self, config: ModelConfig, init: bool = True):
        super().__init__()
        self.config = config
        # init=False leaves the embedding uninitialized (for loading: normal_ on "meta" costs seconds of imports)
        empty = None if init else torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=empty)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self._inv_freq = None  # computed on first use (not a buffer: nothing to load, nothing on "meta")

    def inv_freq(self, seq_len: int) -> torch.Tensor:
        if self.config.rope_type == "dynamic":
            return rope_inv_freq(self.config, seq_len)
        if self._inv_freq is None:
            self._inv_freq = rope_inv_freq(self.config)
        return self._inv_freq

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, position_ids=None):
        B, T = input_ids.shape
        past = cache.len if cache is not None else 0
        dev = input_ids.device
        if attention_mask is None:
            key_mask = torch.ones(B, past + T, dtype=torch.bool, device=dev)
            if cache is not None:
                key_mask[:, :past] = cache.mask[:, :past]
        elif attention_mask.shape[1] == past + T:
            key_mask = attention_mask.to(dev).bool()
        elif cache is not None and attention_mask.shape[1] == T:
            key_mask = torch.cat([cache.mask[:, :past], attention_mask.to(dev).bool()], dim=1)
        else:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}: expected (B, {past + T}) "
                             f"(cached + new tokens) or (B, {T})")
        if cache is not None:
            if past + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions; {past} cached + {T} new exceed it")
            cache.mask[:, :past + T] = key_mask
        if position_ids is None:  # count real tokens only: a left-padded row gets the positions of its unpadded self
            position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        x = self.embed_tokens(input_ids)                                            # (B, T, D)
        inv_freq = self.inv_freq(int(position_ids.max()) + 1)
        cos, sin = rope_cos_sin(inv_freq, position_ids, x.dtype)
        window = self.config.sliding_window
        binding = window is not None and window < past + T
        if cache is None and not binding and bool(key_mask.all()):
            mask = "causal"
        elif T == 1 and not binding and bool(key_mask.all()):  # one new token that may see every key
            mask = None
        else:
            mask = attention_mask_4d(key_mask, T, window if binding else None)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for layer in self.layers:
            if use_ckpt:
                x = checkpoint(layer, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.len = past + T
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """The decoder plus the LM head (tied: `lm_head.weight is model.embed_tokens.weight`)."""

    def __init__(self, config: ModelConfig, init: bool = True):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, init)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool):
        self.model.gradient_checkpointing = bool(on)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, position_ids=None,
                last_only: bool = False):
        """Logits (B, T, V) in the model's dtype ((B, 1, V) with last_only).

        attention_mask (B, T) or, with a cache, (B, cached + T): 1 for real tokens, 0 for (left) padding.
        Positions count real tokens only unless position_ids (B, T) are given.
        """
        h = self.model(input_ids, attention_mask, cache, position_ids)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)


@torch.no_grad()
def init_weights(model: LlamaForCausalLM, generator: torch.Generator, std: float = 0.02) -> LlamaForCausalLM:
    """Seeded random weights as the reference initializes them: N(0, std) for linears and embeddings, zero
    biases, unit norms. For tests and tiny random models."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)
    return model


# ------------------------------------------------------------------------------------------------- module access
def linear_names(model: nn.Module) -> list[str]:
    """The 7 linears of every block in order: q, k, v, o, gate, up, down."""
    names = []
    for i in range(len(model.model.layers)):
        names += [f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return names


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"module {name!r} not found in the model") from e


def set_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise ValueError(f"module {name!r} not found in the model")
    setattr(parent, child, new_module)



# ---------------------------------------------------------------------------------------------- checkpoint I/O
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # old conversions saved this buffer; we recompute it
INDEX_NAME, SINGLE_NAME = "model.safetensors.index.json", "model.safetensors"


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a .safetensors file ({name: {dtype, shape, data_offsets}}) and where the data starts."""
    from checks import safetensors_header  # ValueError naming the file for random bytes or a truncated file
    header, _meta, start = safetensors_header(path)
    return header, start


def _read_tensor(f, info: dict, data_start: int) -> torch.Tensor:
    """One tensor read straight from the file into its own buffer (no mapping that would double the RSS)."""
    if info["dtype"] not in _ST_DTYPES:
        raise ValueError(f"safetensors dtype {info['dtype']} not supported")
    t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    if end - begin != t.numel() * t.element_size():
        raise ValueError(f"safetensors entry of {end - begin} bytes does not match {info}")
    buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    f.seek(data_start + begin)
    done = 0
    while done < len(buf):
        got = f.readinto(buf[done:])
        if not got:
            raise ValueError(f"{f.name}: file ends inside a tensor")
        done += got
    return t


def _entry_problem(info: dict, data_start: int, file_size: int) -> str | None:
    """What is wrong with one weight's header entry (dtype, byte count, past the file's end), or None."""
    dtype = _ST_DTYPES.get(info.get("dtype"))
    if dtype is None or not dtype.is_floating_point:
        return f"dtype {info.get('dtype')}, expected a floating point type (F32, F16, BF16, F64)"
    begin, end = info["data_offsets"]
    numel = math.prod(info["shape"])
    if end - begin != numel * dtype.itemsize:
        return f"{end - begin} bytes for {numel} {info['dtype']} values"
    if data_start + end > file_size:
        return f"the file ends at byte {file_size}, before the tensor's end ({data_start + end}): truncated?"
    return None


def checkpoint_files(path) -> dict[str, Path]:
    """{tensor name: file} of a checkpoint folder: the sharded index if present, else model.safetensors."""
    path = Path(path)
    if (path / INDEX_NAME).is_file():
        try:
            index = json.loads((path / INDEX_NAME).read_text(encoding="utf-8"))
            files = {name: path / fname for name, fname in index["weight_map"].items()}
        except (ValueError, TypeError, KeyError, AttributeError):
            raise ValueError(f"{path / INDEX_NAME}: not a safetensors index (a JSON object with a "
                             f"'weight_map' of tensor -> file)") from None
        absent = sorted({str(p) for p in files.values() if not p.is_file()})
        if absent:
            raise FileNotFoundError(f"{path / INDEX_NAME} names shards that are missing: {absent}")
        return files
    if (path / SINGLE_NAME).is_file():
        return {name: path / SINGLE_NAME for name in _safetensors_header(path / SINGLE_NAME)[0]}
    raise FileNotFoundError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints are read)")


class CheckpointReader:
    """The tensors of a LLaMA/Mistral checkpoint folder, read one at a time from its (sharded) safetensors files.

    Every file's header is read and checked against config.json up front (missing, unexpected or mis-shaped
    tensors listed in one ValueError), before any weight is read; `load(model, prefix)` then reads only the
    tensors under `prefix` into a model built on the meta device, so the whole model is never materialized.
    """

    def __init__(self, path, config: ModelConfig | None = None):
        self.path = Path(path)
        self.config = config or ModelConfig.from_json(self.path / "config.json")
        with torch.device("meta"):
            expected = {n: tuple(p.shape) for n, p in
                        LlamaForCausalLM(self.config, init=False).named_parameters(remove_duplicate=False)}
        tied = self.config.tie_word_embeddings
        files = checkpoint_files(self.path)
        self.headers = {f: _safetensors_header(f) for f in set(files.values())}
        self.plan, problems = {}, []                  # {tensor name: file}
        for name, f in files.items():
            if _IGNORED.search(name) or (tied and name == "lm_head.weight"):
                continue
            if name not in self.headers[f][0]:
                problems.append(f"{name}: listed for {f.name} but not in it")
            elif name not in expected:
                problems.append(f"unexpected tensor {name}")
            elif tuple(self.headers[f][0][name]["shape"]) != expected[name]:
                problems.append(f"{name} in {f.name}: shape {tuple(self.headers[f][0][name]['shape'])}, config "
                                f"expects {expected[name]}")
            else:
                problem = _entry_problem(self.headers[f][0][name], self.headers[f][1], f.stat().st_size)
                if problem:
                    problems.append(f"{name} in {f.name}: {problem}")
                self.plan[name] = f
        for name in expected:
            if name not in files and not (tied and name == "lm_head.weight"):
                problems.append(f"missing tensor {name} (shape {expected[name]})")
        if problems:
            more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            raise ValueError(f"checkpoint {self.path} does not match its config.json: " + "; ".join(problems[:5])
                             + more)

    def load(self, model: LlamaForCausalLM, prefix: str = "", dtype: torch.dtype = torch.float32,
             device="cpu") -> None:
        """Read every tensor whose name starts with `prefix` into `model` (as an nn.Parameter of `dtype` on
        `device`), file by file in on-disk order; tensors of modules already replaced (no such parameter) are
        not read."""
        todo = [n for n in self.plan if n.startswith(prefix)]
        for f in sorted({self.plan[n] for n in todo}):
            header, start = self.headers[f]
            with open(f, "rb", buffering=0) as fh:
                for name in sorted((n for n in todo if self.plan[n] == f), key=lambda n: header[n]["data_offsets"][0]):
                    owner, _, pname = name.rpartition(".")
                    mod = get_module(model, owner)
                    if pname not in mod._parameters:          # replaced already (e.g. by a QuantLinear)
                        continue
                    t = _read_tensor(fh, header[name], start).to(device=device, dtype=dtype)
                    mod._parameters[pname] = nn.Parameter(t)
        if self.config.tie_word_embeddings and ("lm_head.weight".startswith(prefix) or
                                                "model.embed_tokens.weight".startswith(prefix)):
            model.lm_head.weight = model.model.embed_tokens.weight


def from_pretrained(path, dtype: torch.dtype = torch.float32, device="cpu") -> LlamaForCausalLM:
    """Load config.json and the (sharded) safetensors weights of a LLaMA/Mistral folder.

    The model is built on the meta device (no init, no memory) and every tensor is read from disk, converted
    to `dtype` and assigned in place, one at a time: peak memory ≈ one copy of the model. Missing, unexpected
    or mis-shaped tensors are all listed in one ValueError before any weight is read (CheckpointReader).
    """
    reader = CheckpointReader(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(reader.config, init=False)
    reader.load(model, "", dtype, device)
    return model


def save_pretrained(model: LlamaForCausalLM, path, max_shard_size: int = 5 * 2**30) -> list[Path]:
    """Write config.json and the weights as HF does: one model.safetensors, or shards of at most max_shard_size
    bytes plus model.safetensors.index.json. A tied head is not written. Returns the weight files written."""
    path = Path(path)
    for name in linear_names(model):
        if not isinstance(get_module(model, name), nn.Linear):
            raise ValueError(f"save_pretrained writes dense checkpoints: {name} is "
                             f"{type(get_module(model, name)).__name__}, not nn.Linear (merge it first)")
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    path.mkdir(parents=True, exist_ok=True)
    for old in [path / SINGLE_NAME, path / INDEX_NAME, *path.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)  # a stale index or shard would shadow what we write
    written = save_shards(sd, path, max_shard_size)
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return written


def save_shards(tensors: dict[str, torch.Tensor], path: Path, max_shard_size: int) -> list[Path]:
    """{name: tensor} as HF lays a checkpoint out: one model.safetensors, or shards of at most max_shard_size bytes
    plus model.safetensors.index.json; files get the usual permissions (safetensors creates them 0600)."""
    from safetensors.torch import save_file
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    umask = os.umask(0o022)
    os.umask(umask)
    for fname, shard in zip(names, shards):
        save_file({k: tensors[k] for k in shard}, str(path / fname), metadata={"format": "pt"})
        os.chmod(path / fname, 0o666 & ~umask)
    if n > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: fname for fname, shard in zip(names, shards) for k in shard}}
        (path / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return [path / f for f in names]


# ------------------------------------------------------------------------------------------------------ tokenizer
def _token_text(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def detect_chat_template(template: str | None) -> str | None:
    """'chatml' (<|im_start|>role ... <|im_end|>), 'llama3' (<|start_header_id|>), or None when there is none."""
    if not template:
        return None
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    raise ValueError("tokenizer_config.json chat_template is neither ChatML (<|im_start|>) nor Llama-3 "
                     "(<|start_header_id|>); only those two simple forms are supported (no Jinja)")


def render_chatml(messages: list[dict], add_generation_prompt: bool, default_system: str | None) -> str:
    """<|im_start|>{role}\\n{content}<|im_end|>\\n per message; a default system turn when the template has one."""
    out = []
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def render_llama3(messages: list[dict], add_generation_prompt: bool, bos: str, date: str | None) -> str:
    """bos, then <|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|> per message.

    Llama-3.1/3.2 templates (date given) always open with a system turn "Cutting Knowledge Date: ...".
    """
    out = [bos]
    if date is not None:
        system = messages[0]["content"].strip() if messages and messages[0]["role"] == "system" else ""
        if messages and messages[0]["role"] == "system":
            messages = messages[1:]
        out.append("<|start_header_id|>system<|end_header_id|>\n\n"
                   f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}<|eot_id|>")
    out += [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages]
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


class Tokenizer:
    """tokenizer.json through the `tokenizers` library, with the special ids and the chat template of the folder."""

    def __init__(self, tok, bos_id=None, eos_id=None, pad_id=None, chat_template: str | None = None,
                 eos_ids: list[int] | None = None):
        self.tok, self.bos_id, self.eos_id, self.pad_id = tok, bos_id, eos_id, pad_id
        self.eos_ids = eos_ids if eos_ids is not None else ([] if eos_id is None else [eos_id])
        self.chat_template = chat_template
        self.chat_format = detect_chat_template(chat_template)

    @classmethod
    def from_pretrained(cls, path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path / 'tokenizer.json'} not found (only fast tokenizer.json is read)")
        try:
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:                    # the tokenizers library raises a bare Exception
            raise ValueError(f"{path / 'tokenizer.json'}: not a tokenizer the tokenizers library reads "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None

        def read(name):
            if not (path / name).is_file():
                return {}
            try:
                d = json.loads((path / name).read_text(encoding="utf-8"))
            except ValueError as e:
                raise ValueError(f"{path / name}: not valid JSON ({e})") from None
            if not isinstance(d, dict):
                raise ValueError(f"{path / name}: expected a JSON object, found a {type(d).__name__}")
            return d
        tcfg, gcfg, mcfg = read("tokenizer_config.json"), read("generation_config.json"), read("config.json")
        ids = {}
        for key in ("bos", "eos", "pad"):
            found = []
            text = _token_text(tcfg.get(f"{key}_token"))
            if text is not None:
                tid = tok.token_to_id(text)
                if tid is None:
                    raise ValueError(f"tokenizer_config.json {key}_token={text!r} is not in tokenizer.json's vocab")
                found.append(tid)
            for cfg in (gcfg, mcfg):
                v = cfg.get(f"{key}_token_id")
                found += v if isinstance(v, list) else ([] if v is None else [v])
            ids[key] = list(dict.fromkeys(found))  # ordered, unique
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        first = lambda xs: xs[0] if xs else None  # noqa: E731
        return cls(tok, first(ids["bos"]), first(ids["eos"]), first(ids["pad"]), template, ids["eos"])

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but the tokenizer has no bos token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat as text in the folder's template (ChatML or Llama-3), ready for encode(add_bos=False)."""
        if self.chat_format is None:
            raise ValueError("tokenizer_config.json has no chat_template: this tokenizer has no chat format")
        if self.chat_format == "chatml":
            m = re.search(r"<\|im_start\|>system(?:\\n|\n)([^{}]*?)<\|im_end\|>", self.chat_template)
            system = m.group(1).replace("\\n", "\n") if m else None
            return render_chatml(messages, add_generation_prompt, system)
        bos = self.tok.id_to_token(self.bos_id) if self.bos_id is not None else "<|begin_of_text|>"
        date = None
        if "Cutting Knowledge Date" in self.chat_template:
            import time
            m = re.search(r'date_string = "([^"]+)"', self.chat_template)
            date = time.strftime("%d %b %Y") if "strftime_now" in self.chat_template or not m else m.group(1)
        return render_llama3(messages, add_generation_prompt, bos, date)


# ----------------------------------------------------------------------------------------------------- generation
def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): argmax at temperature 0, else softmax(logits/T) restricted to the
    smallest set of most likely tokens whose mass reaches top_p (nucleus sampling)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p   # mass before this token already reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: LlamaForCausalLM, prompts: list[list[int]], max_new_tokens: int, eos_id=None,
             temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
             pad_id: int | None = None, use_cache: bool = True, on_token=None) -> list[list[int]]:
    """Continue each prompt (left-padded into one batch) by up to max_new_tokens; a row stops at its first
    eos (eos_id: an id or a list of ids; the eos is not returned). Returns the new tokens of each prompt.
    Sampling (temperature > 0) draws from `generator`, which must live on the model's device.
    on_token(t), if given, is called after the t-th new token of the batch (for a progress line)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    eos_list = [] if eos_id is None else [int(e) for e in torch.as_tensor(eos_id).reshape(-1).tolist()]
    eos = torch.tensor(eos_list, dtype=torch.long, device=model.device)
    pad = pad_id if pad_id is not None else (int(eos[0]) if len(eos) else 0)
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, L - len(p):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    cache = KVCache(model.config, B, L + max_new_tokens, model.dtype, model.device) if use_cache else None
    logits = model(ids, mask, cache, last_only=True)[:, -1]          # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    out = []
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator).masked_fill(done, pad)  # (B,)
        out.append(nxt)
        done |= torch.isin(nxt, eos)
        if on_token is not None:
            on_token(len(out))
        if bool(done.all()) or len(out) == max_new_tokens:
            break
        if use_cache:
            logits = model(nxt[:, None], torch.ones(B, 1, dtype=torch.long, device=model.device), cache,
                           last_only=True)[:, -1]
        else:
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(ids, mask, last_only=True)[:, -1]
    rows = torch.stack(out, dim=1).tolist() if out else [[] for _ in prompts]
    eos_set = set(eos.tolist())
    result = []
    for row in rows:
        cut = next((j for j, t in enumerate(row) if t in eos_set), len(row))
        result.append(row[:cut])
    return result
