"""WHA, the Walsh–Hadamard adapter (docs/method.md eq. 4): y = base(x) + s·(x Tᵀ) Fᵀ = x (Q + s·F T)ᵀ + b.

F (m×n) is sparse: `indices` (flat positions i·n + j, a buffer) and `values` (an fp32 nn.Parameter, the only thing
that trains); T = wht.hadamard_matrix(n), applied as a transform (as a dense matrix only where the training path
forms W through a CSR F).
In reading order:

    reference_forward        eq. 4 as written: F scattered dense, x Tᵀ by wht.wht_reference, plain autograd
    FrozenBaseAdapter, SparseAdapter, WHALinear   the module around a frozen base (gptq.QuantLinear or nn.Linear,
                             bias kept), with the forward paths 'reference', 'activations' and 'merged'
    adapters, save_adapters, load_adapters        every WHALinear of a model to safetensors and back (bitwise)
    fast training path       _WHAMerged, the merged path's hand-written forward and backward, tested equal to
                             reference_forward

Depends on torch, wht.py and model.set_module; qwha.py (the initialization: AdaAlloc, selection, refinement)
builds these modules and re-exports the names.
"""
from __future__ import annotations

import functools
import json
import math
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as Fn
from torch import nn

import wht
from model import set_module

__all__ = ["reference_forward", "FrozenBaseAdapter", "SparseAdapter", "WHALinear", "adapters", "save_adapters",
           "load_adapters"]


# ----------------------------------------------------------------------------------------------------
# The reference (eq. 4)


def reference_forward(x: torch.Tensor, base: nn.Module, indices: torch.Tensor, values: torch.Tensor,
                      scale: float = 1.0) -> torch.Tensor:
    """y = base(x) + s·(x Tᵀ) Fᵀ (eq. 4) as written, in x's dtype: F (m, n) dense, scattered from the flat `indices`
    (row·n + col; repeated positions add) and `values`, x Tᵀ by wht.wht_reference; plain autograd, so values and x
    get their gradients from torch. The reference WHALinear's faster paths are tested against (path='reference')."""
    m, n = base.out_features, base.in_features
    F = torch.zeros(m * n, dtype=x.dtype, device=x.device)
    F = F.index_add(0, indices.long(), values.to(x.dtype)).view(m, n)  # (m, n) dense F
    return base(x) + scale * (wht.wht_reference(x) @ F.T)              # (..., m)


# ----------------------------------------------------------------------------------------------------
# The modules


def _base_weight(base: nn.Module) -> torch.Tensor:
    """The dense (m, n) weight of a frozen base: QuantLinear.dequantize() or nn.Linear.weight."""
    if hasattr(base, "dequantize"):
        return base.dequantize()
    if isinstance(base, nn.Linear):
        return base.weight
    raise ValueError(f"WHALinear: base {type(base).__name__} is neither nn.Linear nor QuantLinear (no .dequantize())")


class FrozenBaseAdapter(nn.Module):
    """What every adapter here shares: a frozen base (QuantLinear or nn.Linear, bias kept), an `enabled` switch,
    and the merged weight base + delta_weight(). Subclasses define delta_weight(dtype) and forward."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.enabled = True

    def _device(self) -> torch.device:
        return next((t.device for t in list(self.base.parameters()) + list(self.base.buffers())), torch.device("cpu"))

    @property
    def bias(self):
        return getattr(self.base, "bias", None)

    def delta_weight(self, dtype=torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def _merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (base + ΔW)ᵀ + b with one dense GEMM (differentiable in the adapter's parameters)."""
        W = _base_weight(self.base).to(torch.float32) + self.delta_weight(torch.float32)
        b = self.bias
        return Fn.linear(x, W.to(x.dtype), None if b is None else b.to(x.dtype))

    @torch.no_grad()
    def merge(self) -> torch.Tensor:
        """The dense merged weight base + ΔW (m, n) fp32 (the base is not modified)."""
        return _base_weight(self.base).to(torch.float32) + self.delta_weight(torch.float32)

    def merged_linear(self) -> nn.Linear:
        """An nn.Linear holding the merged weight and the base bias."""
        b = self.bias
        W = self.merge()
        lin = nn.Linear(self.in_features, self.out_features, bias=b is not None, device=W.device)
        with torch.no_grad():
            lin.weight.copy_(W)
            if b is not None:
                lin.bias.copy_(b)
        return lin

    def disable(self):
        self.enabled = False
        return self

    def enable(self):
        self.enabled = True
        return self


class SparseAdapter(FrozenBaseAdapter):
    """A frozen base plus ΔW built from a sparse F: the support as the flat buffer `indices` (row·n + col, int32
    when m·n < 2³¹; given as (2, B) [row, col] or flat) and its (B,) fp32 Parameter `values` (unscaled), a scale s,
    and a forward path from PATHS. Subclasses (WHALinear here, baselines.SpectralLinear) say which transform maps F
    to ΔW."""

    PATHS = ("auto", "activations", "merged")

    def __init__(self, base: nn.Module, indices: torch.Tensor, values: torch.Tensor | None = None,
                 scale: float = 1.0, path: str = "auto"):
        super().__init__(base)
        m, n = self.out_features, self.in_features
        who = type(self).__name__
        idx = torch.as_tensor(indices)
        flat = idx[0].long() * n + idx[1].long() if idx.dim() == 2 else idx.long()
        if flat.numel() and (flat.min() < 0 or flat.max() >= m * n):
            raise ValueError(f"{who}: indices outside the ({m}, {n}) weight")
        dev = self._device()
        self.register_buffer("indices", flat.to(torch.int32 if m * n < 2**31 else torch.int64).to(dev))
        if values is None:
            values = torch.zeros(flat.numel())
        if values.shape != (flat.numel(),):
            raise ValueError(f"{who}: values shape {tuple(values.shape)}, expected ({flat.numel()},)")
        self.values = nn.Parameter(values.detach().to(device=dev, dtype=torch.float32).clone())
        self.scale = float(scale)
        if path not in self.PATHS:
            raise ValueError(f"{who}: path must be one of {', '.join(map(repr, self.PATHS))}, got {path!r}")
        self.path = path

    def support(self) -> torch.Tensor:
        """(2, B) long [row, col]."""
        flat = self.indices.long()
        return torch.stack([flat // self.in_features, flat % self.in_features])

    def dense_F(self, dtype=torch.float32) -> torch.Tensor:
        """F as a dense (m, n) tensor (differentiable in values)."""
        m, n = self.out_features, self.in_features
        F = torch.zeros(m * n, dtype=dtype, device=self.values.device)
        return F.index_add(0, self.indices, self.values.to(dtype)).view(m, n)


class WHALinear(SparseAdapter):
    """y = base(x) + s·(x Tᵀ) Fᵀ  or  y = x (Q + s·F T)ᵀ + b  (eq. 4), F sparse with trainable values.

    base: a frozen QuantLinear or nn.Linear (bias kept). indices: the support, (2, B) [row, col] or flat
    row·n + col; stored flat (int32 when m·n < 2³¹) as the buffer `indices`. values: (B,) fp32 Parameter,
    unscaled (ΔW = scale·dense(values) T). path: 'reference' runs reference_forward (eq. 4 as written, plain
    autograd); 'activations' the same sum with the fast wht; 'merged' x (Q + s·F T)ᵀ through _WHAMerged, a
    hand-written forward and backward (the fast training path below), which caches the support's block layout
    (4 bytes per entry, plus 4 more for the CSR columns where the sampled value gradient is used) while `indices`
    is unchanged; 'auto' (default) the cheaper of 'activations' and 'merged' for the token count (transforming
    activations costs N·(n log n + m·n) extra, forming ΔW costs m·n·log n). All give the same y up to rounding.
    keep_weight: save W = Q + s·F T for the backward (True) or re-form it there (False); None (default): save it
    when it is small next to the layer's activations (_keep_weight).
    """

    PATHS = ("auto", "activations", "merged", "reference")

    def delta_weight(self, dtype=torch.float32) -> torch.Tensor:
        """ΔW = s·F T (m, n): F T = wht(F, inverse=True) (rows of F times T)."""
        return self.scale * wht.wht(self.dense_F(dtype), inverse=True)

    def choose_path(self, tokens: int) -> str:
        if self.path != "auto":
            return self.path
        m, n = self.out_features, self.in_features
        logn = math.log2(max(n, 2))
        return "activations" if tokens * (n * logn + m * n) < m * n * logn else "merged"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        path = self.choose_path(x.numel() // self.in_features)
        if path == "reference":
            return reference_forward(x, self.base, self.indices, self.values, self.scale)
        if path == "activations":
            F = self.dense_F(x.dtype)                                  # (m, n)
            return self.base(x) + self.scale * (wht.wht(x) @ F.T)
        grad_values = torch.is_grad_enabled() and self.values.requires_grad
        return _WHAMerged.apply(x, self.values, self, _shared_input(x) if grad_values else None)

    keep_weight: bool | None = None   # merged path: save W for backward (True), re-form it there (False), or
    #                                   decide by the token count (None, _keep_weight)

    def support_layout(self) -> _SupportLayout:
        """The merged path's view of the support (_support_layout), cached while `indices` is the same
        unmodified tensor."""
        m, n = self.out_features, self.in_features
        rows = m if self.indices.is_cuda else _block_rows(m, n)
        key = (self.indices.data_ptr(), self.indices._version, self.indices.device, self.indices.numel(), rows)
        if getattr(self, "_layout_key", None) != key:
            self._layout, self._layout_key = _support_layout(self.indices, m, n, rows), key
        return self._layout

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, nnz={self.indices.numel()}, "
                f"scale={self.scale}, path={self.path}")



# ----------------------------------------------------------------------------------------------------
# Adapter files


def adapters(model: nn.Module) -> dict[str, WHALinear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, WHALinear)}


def save_adapters(path: str | Path, model: nn.Module, metadata: dict | None = None) -> None:
    """Every WHALinear's indices and values to safetensors, keyed by module name; shapes, scale and
    `metadata` (the init settings) in the header. Bitwise round trip with load_adapters."""
    from safetensors.torch import save_file
    mods = adapters(model)
    if not mods:
        raise ValueError("save_adapters: the model has no WHALinear")
    tensors, layers = {}, {}
    for name, mod in mods.items():
        tensors[f"{name}.indices"] = mod.indices.detach().cpu().contiguous()
        tensors[f"{name}.values"] = mod.values.detach().cpu().contiguous()
        layers[name] = {"out_features": mod.out_features, "in_features": mod.in_features, "scale": mod.scale}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "qwha-adapters/1", "layers": json.dumps(layers),
                                            "settings": json.dumps(metadata or {})})


def checked_adapter_file(path: str | Path, writer: str) -> Path:
    """`path` as a Path once it exists and is a whole safetensors file; else FileNotFoundError (naming `writer`,
    the function that writes such files) or ValueError, naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter file {path} not found (write it with {writer})")
    from checks import safetensors_header
    safetensors_header(path)
    return path


def load_adapters(path: str | Path, model: nn.Module) -> dict:
    """Load save_adapters' file into `model`: existing WHALinear get the stored indices/values/scale, bare
    linears (QuantLinear / nn.Linear) of the same names are wrapped. Returns the saved settings."""
    from safetensors import safe_open
    path = checked_adapter_file(path, "qwha.save_adapters")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "qwha-adapters/1":
            raise ValueError(f"{path}: not a qwha adapter file (format {meta.get('format')!r})")
        layers = json.loads(meta["layers"])
        for name, info in layers.items():
            try:
                mod = model.get_submodule(name)
            except AttributeError as e:
                raise ValueError(f"{path}: adapter for {name}, which the model does not have") from e
            idx, val = f.get_tensor(f"{name}.indices"), f.get_tensor(f"{name}.values")
            base = mod.base if isinstance(mod, WHALinear) else mod
            if (base.out_features, base.in_features) != (info["out_features"], info["in_features"]):
                raise ValueError(f"{path}: {name} is ({info['out_features']}, {info['in_features']}), "
                                 f"the model's is ({base.out_features}, {base.in_features})")
            new = WHALinear(base, idx.long(), val, scale=info["scale"],
                            path=mod.path if isinstance(mod, WHALinear) else "auto")
            new.indices = idx.to(new.indices.device)            # keep the stored dtype bit for bit
            set_module(model, name, new)
    return json.loads(meta.get("settings", "{}"))


# ----------------------------------------------------------------------------------------------------
# Fast training path: WHALinear's merged path, _WHAMerged, y = x (Q + s·F T)ᵀ + b with a hand-written backward so
# that nothing of the (m, n) F or ΔW goes to autograd (only x, the values, and W where kept). Tested equal to
# reference_forward in its output, value and input gradients. Three pieces:
# - W = Q + s·F T formed in row blocks that fit a CPU's L2 cache: a block of s·F scattered into a small zeroed
#   buffer, transformed by wht.wht_from_t, the base added by its last GEMM (_form_rows); or, on a CPU where F has
#   few entries per row and T is small (_csr_form), as a CSR F times the dense T in one sparse product.
# - the value gradient s·(gyᵀ x Tᵀ) at the support, by the cheapest exact route (_wha_value_grad): a sampled
#   product at the support only (torch.sparse.sampled_addmm, on a CPU where F is sparse enough: _use_sampled), a
#   dense product with x Tᵀ (tokens N < m), or the dense gyᵀ x transformed block by block (N ≥ m); on a CPU, x Tᵀ
#   in cache-sized token chunks. The layers that read one input (q/k/v, gate/up) share its x Tᵀ (_SharedInput):
#   the first of their backward passes computes it, the last drops it.
# - the input gradient gy W, with W saved by the forward where it is small next to the layer's activations
#   (_keep_weight), else re-formed a few blocks at a time and used at once (_wha_input_grad).
# Which route runs changes only the rounding. The timings behind the thresholds are in docs/performance.md.
_BLOCK_ELEMS = 1 << 17      # elements per row block (512 KB in fp32)
_GROUP_ELEMS = 1 << 19      # elements of W re-formed at a time for the input gradient (2 MB)
_SDDMM_COST = 6             # CPU, torch's sampled_addmm vs MKL sgemm + gather, per multiply-add: the sampled
#                             product wins below density 1/6 with x Tᵀ in cache-sized token chunks
_SDDMM_CHUNK = 512          # CPU: tokens per chunk of the value gradient (x Tᵀ of 512 × 576 is 1.2 MB)
_CSR_MAX_K = 20             # CPU: form W with a CSR F and a dense T at ≤ this many entries per row on average,
_CSR_MAX_N = 1024           # and n ≤ this (T: 4 MB in fp32 at 1024)



def _block_rows(m: int, n: int) -> int:
    return max(1, min(m, _BLOCK_ELEMS // n))


@dataclass
class _SupportLayout:
    """The support sorted by row (`order`: values[order] is that order; None when the support already is, as
    qwha.init_layer's CSR order is), cut into blocks of `rows` rows: entries ptr[c]:ptr[c+1] lie in block c, at
    t = col·r_c + (row − c·rows) in the block's (n, r_c) transpose (int32). crow, col: CSR pointers and columns
    (int32), made on first use by the sampled product."""
    rows: int
    ptr: list
    order: torch.Tensor | None
    t: torch.Tensor
    flat: torch.Tensor
    csr: tuple | None = None

    def crow_col(self, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.csr is None:
            counts = torch.bincount(self.flat // n, minlength=m)
            crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
            self.csr = (crow, (self.flat % n).to(torch.int32))
        return self.csr


def _support_layout(indices: torch.Tensor, m: int, n: int, rows: int) -> _SupportLayout:
    flat = indices
    order = None
    if flat.numel() > 1 and bool((flat[1:] < flat[:-1]).any()):
        order = torch.argsort(flat, stable=True)
        flat = flat[order]
    flat64 = flat.long()
    i, j = flat64 // n, flat64 % n
    c = i // rows
    ptr = [0] + torch.bincount(c, minlength=-(-m // rows)).cumsum(0).tolist()
    r, r_c = i - c * rows, (m - c * rows).clamp(max=rows)           # row within the block, rows in the block
    return _SupportLayout(rows, ptr, order, (j * r_c + r).to(torch.int32), flat)


@functools.lru_cache(maxsize=8)
def _dense_T(n: int, device: torch.device) -> torch.Tensor:
    """T = wht.hadamard_matrix(n) (n, n) fp32, cached (the CSR formation's right factor; n ≤ _CSR_MAX_N)."""
    return wht.hadamard_matrix(n, torch.float32, device)


def _csr_form(mod: WHALinear, device: torch.device) -> bool:
    """Whether W is formed as Q + s·F T with a CSR F and a dense T (see the note above _BLOCK_ELEMS)."""
    m, n = mod.out_features, mod.in_features
    return device.type == "cpu" and n <= _CSR_MAX_N and mod.indices.numel() <= _CSR_MAX_K * m


def _form_rows(mod: WHALinear, values: torch.Tensor, W: torch.Tensor, row0: int = 0) -> torch.Tensor:
    """Rows row0 ... row0 + len(W) of Q + s·F T into W (fp32, no autograd; eq. 4). Block by block: s·F's block
    scattered into a zeroed (n, r) buffer and transformed by wht.wht_from_t, the base added by the last GEMM;
    or (_csr_form) all rows at once, F's rows as a CSR matrix times the dense T, added to Q by one addmm.
    row0 and row0 + len(W) are block boundaries (multiples of the layout's rows, or m)."""
    m, n = mod.out_features, mod.in_features
    lay = mod.support_layout()
    v = values.detach().to(torch.float32)
    if lay.order is not None:
        v = v[lay.order]
    Q = _base_weight(mod.base)
    if _csr_form(mod, values.device):
        crow, col = lay.crow_col(m, n)                                 # CSR of the sorted support, int32
        r1 = row0 + W.shape[0]
        p, q = int(crow[row0]), int(crow[r1])
        with warnings.catch_warnings():                                # "beta state" notice
            warnings.simplefilter("ignore", UserWarning)
            Fs = torch.sparse_csr_tensor(crow[row0:r1 + 1] - p, col[p:q], v[p:q], (r1 - row0, n),
                                         check_invariants=False)     # F[row0:r1] (unscaled)
            return torch.addmm(Q[row0:r1].to(torch.float32), Fs, _dense_T(n, values.device), alpha=mod.scale,
                               out=W)
    buf = torch.empty(min(m, lay.rows) * n, dtype=torch.float32, device=values.device)
    for a in range(row0, row0 + W.shape[0], lay.rows):
        e, (p, q) = min(m, a + lay.rows), lay.ptr[a // lay.rows: a // lay.rows + 2]
        blk = buf[: (e - a) * n].zero_()
        blk.index_add_(0, lay.t[p:q], v[p:q], alpha=mod.scale)                         # (s·F)[a:e]ᵀ
        wht.wht_from_t(blk.view(n, e - a), inverse=True, clobber=True, out=W[a - row0:e - row0], add=Q[a:e])
    return W


def _wha_merged_weight(mod: WHALinear, values: torch.Tensor) -> torch.Tensor:
    """Q + s·F T (m, n) fp32, no autograd."""
    W = torch.empty(mod.out_features, mod.in_features, dtype=torch.float32, device=values.device)
    return _form_rows(mod, values, W)


def _wha_input_grad(mod: WHALinear, values: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """gy (Q + s·F T) (N, n) without the whole W: rows of W re-formed a group of blocks (≤ _GROUP_ELEMS) at a
    time, each group adding its product at once (gx += gy[:, a:e] W[a:e])."""
    m, n = mod.out_features, mod.in_features
    rows = mod.support_layout().rows
    group = rows * max(1, _GROUP_ELEMS // (rows * n))
    buf = torch.empty(min(m, group) * n, dtype=torch.float32, device=values.device)
    gx = None
    for a in range(0, m, group):
        e = min(m, a + group)
        Wg = _form_rows(mod, values, buf[: (e - a) * n].view(e - a, n), a).to(g2.dtype)
        gx = g2[:, a:e] @ Wg if gx is None else gx.addmm_(g2[:, a:e], Wg)
    return gx


def _use_sampled(mod: WHALinear, device: torch.device) -> bool:
    m, n, B = mod.out_features, mod.in_features, mod.indices.numel()
    return device.type == "cpu" and B * _SDDMM_COST < m * n


def _token_chunk(N: int, device: torch.device) -> int:
    return max(1, _SDDMM_CHUNK) if device.type == "cpu" else max(1, N)


def _transform_chunks(x2: torch.Tensor) -> list[torch.Tensor]:
    """(x Tᵀ)ᵀ of x2 (N, n), _token_chunk tokens at a time: [(n, N_c) contiguous fp32]."""
    c = _token_chunk(x2.shape[0], x2.device)
    return [wht.wht_to_t(x2[a:a + c].to(torch.float32)) for a in range(0, x2.shape[0], c)]


class _SharedInput:
    """(x Tᵀ)ᵀ of one input x (in token chunks, _transform_chunks) for the merged layers that read that same tensor
    (q/k/v, gate/up). Each forward that will need a value gradient joins (`_shared_input`); the first backward to
    need the transform computes it and keeps it while other users remain, `release` drops it after the last. It
    belongs to the tensor object x at its version at forward time: autograd refuses a backward whose saved x was
    modified in place since, so every user's saved x holds the same values."""

    def __init__(self, x: torch.Tensor):
        key = id(x)
        self.ref = weakref.ref(x, lambda _, reg=_SHARED: reg.pop(key, None))   # forget the entry when x goes
        self.version = x._version
        self.users = 0
        self.xTt: list[torch.Tensor] | None = None

    def get(self, x2: torch.Tensor) -> list[torch.Tensor]:
        xTt = self.xTt
        if xTt is None:
            xTt = _transform_chunks(x2)
            if self.users > 1:
                self.xTt = xTt
        return xTt

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.xTt = None


_SHARED: dict[int, _SharedInput] = {}


def _shared_input(x: torch.Tensor) -> _SharedInput:
    """The _SharedInput of the tensor object x at its current version, joined by one more user."""
    sh = _SHARED.get(id(x))
    if sh is None or sh.ref() is not x or sh.version != x._version:
        sh = _SHARED[id(x)] = _SharedInput(x)
    sh.users += 1
    return sh


def _wha_value_grad(mod: WHALinear, x2: torch.Tensor, g2: torch.Tensor,
                    shared: _SharedInput | None = None) -> torch.Tensor:
    """∂L/∂values = s·(gyᵀ x Tᵀ) at the support, x2 (N, n), g2 (N, m) (see the note above _BLOCK_ELEMS);
    shared: where x Tᵀ comes from when other layers read the same x."""
    m, n, N = g2.shape[1], x2.shape[1], x2.shape[0]
    if N == 0:
        return torch.zeros(mod.indices.numel(), dtype=torch.float32, device=x2.device)
    sampled = _use_sampled(mod, x2.device)
    if N < m or sampled:
        chunks = shared.get(x2) if shared is not None else _transform_chunks(x2)       # [(n, N_c) (x Tᵀ)ᵀ]
        starts = range(0, N, _token_chunk(N, x2.device))
        if not sampled:
            G = None                                                                     # (m, n) dense gyᵀ x Tᵀ
            for a, xt in zip(starts, chunks):
                gT = g2[a:a + xt.shape[1]].T.to(torch.float32)                           # (m, N_c)
                G = gT @ xt.T if G is None else G.addmm_(gT, xt.T)
            return G.view(-1).index_select(0, mod.indices).mul_(mod.scale)
        lay = mod.support_layout()
        crow, col = lay.crow_col(m, n)
        with warnings.catch_warnings():                                                  # "beta state" notice
            warnings.simplefilter("ignore", UserWarning)
            S = torch.sparse_csr_tensor(crow, col, x2.new_zeros(col.numel(), dtype=torch.float32), (m, n),
                                        check_invariants=False)
            g = None                                                                     # CSR (row-sorted) order
            for a, xt in zip(starts, chunks):
                gT = g2[a:a + xt.shape[1]].T.to(torch.float32).contiguous()              # (m, N_c)
                v = torch.sparse.sampled_addmm(S, gT, xt.T, beta=0.0).values()
                g = v if g is None else g.add_(v)
    else:
        lay = mod.support_layout()
        gW = (g2.T @ x2).to(torch.float32)                                               # (m, n) gyᵀ x
        g = torch.empty(lay.ptr[-1], dtype=torch.float32, device=x2.device)
        buf = torch.empty(min(m, lay.rows) * n, dtype=torch.float32, device=x2.device)
        for c, a in enumerate(range(0, m, lay.rows)):
            e, (p, q) = min(m, a + lay.rows), lay.ptr[c:c + 2]
            blk = wht.wht_to_t(gW[a:e], clobber=True, out=buf[: (e - a) * n].view(n, e - a))  # (gW Tᵀ)[a:e]ᵀ
            torch.index_select(blk.view(-1), 0, lay.t[p:q], out=g[p:q])
    g.mul_(mod.scale)
    return g if lay.order is None else torch.empty_like(g).index_copy_(0, lay.order, g)


def _keep_weight(mod: WHALinear, tokens: int) -> bool:
    """Whether the merged path saves W for the backward: mod.keep_weight if set, else when W is at most an
    eighth of the layer's input and output activations, 8·m·n ≤ N·(m + n) (SmolLM2 at 512 tokens per sequence:
    batch 8 keeps every W, batch 4 the k/v ones only, batch 1 none)."""
    if mod.keep_weight is not None:
        return bool(mod.keep_weight)
    return 8 * mod.out_features * mod.in_features <= tokens * (mod.out_features + mod.in_features)


class _WHAMerged(torch.autograd.Function):
    """y = x (Q + s·F T)ᵀ + b, WHALinear's merged path, with a hand-written backward (the value gradient of
    _wha_value_grad; gx = gy W with W saved by the forward or re-formed block by block, _keep_weight); nothing
    of the (m, n) F or ΔW goes to autograd but a kept W."""

    @staticmethod
    def forward(ctx, x, values, mod, shared):
        W = _wha_merged_weight(mod, values).to(x.dtype)                 # (m, n)
        b = mod.bias
        ctx.mod, ctx.shared = mod, shared
        ctx.save_for_backward(x, values, W if _keep_weight(mod, x.numel() // mod.in_features) else None)
        return Fn.linear(x, W, None if b is None else b.to(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        x, values, W = ctx.saved_tensors
        mod = ctx.mod
        m, n = mod.out_features, mod.in_features
        g2 = gy.reshape(-1, m).to(x.dtype)       # (N, m); under CUDA autocast gy comes back bf16 for an fp32 x
        gvalues = None
        if ctx.needs_input_grad[1]:
            gvalues = _wha_value_grad(mod, x.reshape(-1, n), g2, ctx.shared)
        if ctx.shared is not None:
            ctx.shared.release()
        gx = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ W if W is not None else _wha_input_grad(mod, values, g2)).view(x.shape)
        return gx, gvalues, None, None
