"""The paper's baselines and ablations at WHA's parameter budget: other kernels, 2-D transforms, LoRA/CLoQ,
and the other selection rules (docs/method.md, "Baselines the paper compares against").

Sparse-spectrum adapters (one module, one init, the kernel is a parameter):
  1-D   ΔW = s · F T_n            (WHA eq. 4 with T_n one of the kernels below)
  2-D   ΔW = s · T_mᵀ F T_n       (LoCA / SSH / FourierFT style: both dimensions transformed)
  kernels (orthonormal, rows are the basis functions, T Tᵀ = I):
    wht      Walsh–Hadamard (wht.py, fast transform)                         -> adapter 'wha'
    dct      DCT-II, T[k, j] = c_k cos(π (j + ½) k / n), c_0 = √(1/n), c_k = √(2/n)   -> 'dca' (LoCA in 2-D)
    dht      Hartley, T[k, j] = cas(2π k j / n) / √n, cas = cos + sin          -> 'dha' (SSH in 2-D)
    identity the weight domain itself (SHiRA)                                 -> 'sparse'
  F has B = r·(m + n) non-zeros. Init reduces to WHA's problem in the kernel's domain: with E_r = T_m E (2-D;
  E_r = E in 1-D; a left orthonormal factor leaves ‖·‖_F unchanged), ‖(E − ΔW) Rᵀ‖ = ‖(E_r − s F T_n) Rᵀ‖, so
  C = E_r T_nᵀ, G = T_n H T_nᵀ, P = C G and qwha's AdaAlloc / selection / refinement apply unchanged (eqs. 5–9).

Selection rules: adaalloc (eq. 7 + per-row top-k), magnitude (top-B |C| over the whole layer), random (B
positions, seeded), ssh (half top-|·| of the PRE-TRAINED weight's spectrum, half random among the rest), loca
(random positions with zero values: LoCA's initial state). Values: refined (eq. 9), C on the support
(refine off), or zero (qa-init off).

LoRA: ΔW = s · B A, A (r×n), B (m×r): plain (QLoRA: A ~ U(±1/√n) seeded, B = 0) or CLoQ (rank-r SVD of E Rᵀ
mapped back through R⁻ᵀ, split √Σ to each side). r·(m + n) parameters, the same count as the sparse budget.
"""
from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import adapter
import model as model_lib
import qwha
import wht

__all__ = [
    "KERNELS", "ADAPTERS", "SELECTS", "kernel_matrix", "Kernel", "init_sparse_layer", "select_ssh", "cloq_init",
    "lora_plain_init", "outlier_coverage", "SpectralLinear", "LoRALinear", "AdapterConfig", "init_adapters",
    "adapter_modules", "save_adapters", "load_adapters",
]

KERNELS = ("wht", "dct", "dht", "identity")
ADAPTERS = {"wha": "wht", "dca": "dct", "dha": "dht", "sparse": "identity", "lora": None}
SELECTS = ("adaalloc", "magnitude", "random", "ssh", "loca", "none")


# ---------------------------------------------------------------------------------------------- kernels


@functools.lru_cache(maxsize=32)
def _kernel_matrix64(kind: str, n: int) -> torch.Tensor:
    if kind == "wht":
        return wht.hadamard_matrix(n, dtype=torch.float64)
    if kind == "identity":
        return torch.eye(n, dtype=torch.float64)
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    if kind == "dct":
        T = torch.cos(math.pi * (j + 0.5) * k / n) * math.sqrt(2.0 / n)
        T[0] /= math.sqrt(2.0)
        return T
    if kind == "dht":
        a = 2 * math.pi * ((k * j) % n) / n                     # reduce k·j mod n: exact angles for large n
        return (torch.cos(a) + torch.sin(a)) / math.sqrt(n)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kind!r}")


@functools.lru_cache(maxsize=64)
def _kernel_matrix_cast(kind: str, n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return _kernel_matrix64(kind, n).to(device=device, dtype=dtype)


def kernel_matrix(kind: str, n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The orthonormal n×n kernel T (rows = basis functions, T Tᵀ = I), cached per (kind, n, dtype, device)."""
    return _kernel_matrix_cast(kind, int(n), dtype, str(torch.device(device or "cpu")))


@dataclass(frozen=True)
class Kernel:
    """An orthonormal transform along the last dimension: forward x ↦ x Tᵀ (coefficients), inverse x ↦ x T."""
    kind: str
    n: int

    def __post_init__(self):
        if self.kind not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kind!r}")
        if self.kind == "wht":
            wht.factorize(self.n)                               # ValueError for widths without a Hadamard order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return x
        if self.kind == "wht":
            return wht.wht(x)
        return x @ kernel_matrix(self.kind, self.n, x.dtype, x.device).T

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return x
        if self.kind == "wht":
            return wht.wht(x, inverse=True)
        return x @ kernel_matrix(self.kind, self.n, x.dtype, x.device)

    def cost(self) -> float:
        """Multiply-adds per transformed vector (for choosing a forward path)."""
        return {"identity": 0.0, "wht": self.n * math.log2(max(self.n, 2))}.get(self.kind, float(self.n * self.n))


def _rows_then_cols(k_out: Kernel | None, M: torch.Tensor) -> torch.Tensor:
    """T_m M (the output-dimension transform) or M when k_out is None."""
    return M if k_out is None else k_out.forward(M.T.contiguous()).T


# ---------------------------------------------------------------------------------------------- init (pure)


def select_ssh(W_spec: torch.Tensor, budget: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """SSH's support (2, B): ⌊B/2⌋ largest |W_spec| over the layer (spectrum of the pre-trained weight), the
    rest uniform over the remaining positions (seeded). CSR order, no duplicates."""
    m, n = W_spec.shape
    if not 0 <= budget <= m * n:
        raise ValueError(f"select_ssh: budget {budget} outside [0, m·n = {m * n}]")
    half = budget // 2
    top = W_spec.abs().reshape(-1).topk(half).indices.cpu()
    taken = torch.zeros(m * n, dtype=torch.bool)
    taken[top] = True
    rest = torch.nonzero(~taken).flatten()
    pick = rest[torch.randperm(rest.numel(), generator=generator)[: budget - half]]
    flat = torch.sort(torch.cat([top, pick])).values.to(W_spec.device)
    return torch.stack([flat // n, flat % n])


def init_sparse_layer(E: torch.Tensor, H: torch.Tensor, budget: int, kernel: str = "wht", dims: int = 1, *,
                      select: str = "adaalloc", refine: bool = True, qa_init: bool = True,
                      W: torch.Tensor | None = None, temperature: float = 1.0, score: str = "output",
                      rule: str = "output", damp: float = 1e-4, min_per_row: int = 2,
                      generator: torch.Generator | None = None) -> qwha.LayerInit:
    """Init of a sparse-spectrum adapter (1-D ΔW = F T_n, 2-D ΔW = T_mᵀ F T_n) on E = W − Q (eqs. 5–9).

    In the kernel's domain this is WHA's problem: set up by qwha.layer_problem with the kernel as its transform
    (E_r = T_m E in 2-D), solved with qwha.select_support / qwha.refine; H is damped by λ·mean(diag H) for the
    solve (as qwha.init_layer_full), errors are reported with the undamped H. W (the pre-trained weight) is
    needed by select='ssh'. Returns qwha.LayerInit (values unscaled).
    """
    t0 = time.perf_counter()
    m, n = E.shape
    if dims not in (1, 2):
        raise ValueError(f"init_sparse_layer: dims must be 1 or 2, got {dims}")
    if select not in SELECTS:
        raise ValueError(f"init_sparse_layer: select must be one of {SELECTS}, got {select!r}")
    k_in, k_out = Kernel(kernel, n), (Kernel(kernel, m) if dims == 2 else None)
    pb = qwha.layer_problem(_rows_then_cols(k_out, E.to(torch.float64)), H, damp, transform=k_in.forward)
    if select == "ssh":
        if W is None:
            raise ValueError("init_sparse_layer: select='ssh' needs the pre-trained weight W")
        support = select_ssh(k_in.forward(_rows_then_cols(k_out, W.to(torch.float64))), budget, generator)
    else:
        mode = "random" if select == "loca" else select
        support = qwha.select_support(pb.C, pb.G, budget, select=mode, scores=pb.scores(score),
                                      temperature=temperature, rule="magnitude" if select == "magnitude" else rule,
                                      min_per_row=min_per_row, generator=generator)
    rows, cols = support
    f_sel = pb.C[rows, cols]
    err_select = pb.error(support, f_sel, pb.quad(support, f_sel))
    if not qa_init or select == "loca":
        f = torch.zeros_like(f_sel)
        err_final = math.sqrt(pb.e0sq)
    elif refine and rows.numel():
        f = qwha.refine(pb.P, pb.G, support)
        err_final = pb.error(support, f, pb.quad(support, f))
    else:
        f, err_final = f_sel, err_select
    k = torch.bincount(rows, minlength=m)
    return qwha.LayerInit(support, f.to(torch.float32), k, math.sqrt(pb.e0sq), err_select, err_final,
                          time.perf_counter() - t0, {"kernel": kernel, "dims": dims, "select": select})


def cloq_init(E: torch.Tensor, H: torch.Tensor, rank: int, damp: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """CLoQ: the optimal rank-r ΔW = B A for min ‖(E − B A) Rᵀ‖ (RᵀR = H damped by λ·mean diag).

    E Rᵀ = U Σ Vᵀ; B = U_r Σ_r^{1/2} (m×r), A = Σ_r^{1/2} V_rᵀ R⁻ᵀ (r×n); the error is √(Σ_{i>r} σ_i²).
    With H = U_h Λ U_hᵀ: Rᵀ = U_h Λ^{1/2}, R⁻ᵀ = Λ^{-1/2} U_hᵀ. Returns (A, B) float32.
    """
    m, n = E.shape
    if H.shape != (n, n):
        raise ValueError(f"cloq_init: H has shape {tuple(H.shape)}, expected ({n}, {n})")
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"cloq_init: rank must be in [1, {min(m, n)}], got {rank}")
    H64 = H.to(torch.float64)
    H64 = (H64 + H64.T) / 2
    mu = float(H64.diagonal().mean())
    H64 = H64 + damp * (mu if mu > 0 else 1.0) * torch.eye(n, dtype=torch.float64, device=H.device)
    lam, Uh = torch.linalg.eigh(H64)
    lam = lam.clamp_min(lam.max() * 1e-12)
    M = (E.to(torch.float64) @ Uh) * lam.sqrt()                        # (m, n) E Rᵀ
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    sq = S[:rank].sqrt()
    B = U[:, :rank] * sq                                               # (m, r)
    A = (sq[:, None] * Vh[:rank]) / lam.sqrt() @ Uh.T                  # (r, n) Σ^{1/2} V_rᵀ Λ^{-1/2} U_hᵀ
    return A.to(torch.float32), B.to(torch.float32)


def lora_plain_init(m: int, n: int, rank: int, generator: torch.Generator | None = None):
    """QLoRA's init: A ~ U(−1/√n, 1/√n) (kaiming-uniform with a = √5), B = 0. Returns (A (r,n), B (m,r))."""
    bound = 1.0 / math.sqrt(n)
    A = (torch.rand(rank, n, generator=generator) * 2 - 1) * bound
    return A, torch.zeros(m, rank)


def outlier_coverage(E: torch.Tensor, support: torch.Tensor, kernel: str, top: float = 0.10) -> dict:
    """Paper App. B.3 / Fig. 3(a): the share of the outliers' coefficients captured by the support.

    Outliers: the top `top` fraction of |E| over the layer; E_o = E on them, 0 elsewhere; their coefficients
    C_o = E_o T_nᵀ. Coverage = Σ_Ω C_o² / Σ C_o² ('energy', the paper's sense of energy, App. B.3) and
    Σ_Ω |C_o| / Σ |C_o| ('abs'); the support fraction B/(m·n) is what a random support would get in expectation.
    """
    m, n = E.shape
    a = E.abs().reshape(-1).to(torch.float64)
    kth = max(1, int(round(top * a.numel())))
    mask = torch.zeros_like(a, dtype=torch.bool)
    mask[a.topk(kth).indices] = True
    Eo = torch.where(mask.view(m, n), E.to(torch.float64), torch.zeros((), dtype=torch.float64))
    Co = Kernel(kernel, n).forward(Eo)
    sel = Co[support[0], support[1]]
    return {"energy": float(sel.square().sum() / Co.square().sum().clamp_min(1e-300)),
            "abs": float(sel.abs().sum() / Co.abs().sum().clamp_min(1e-300)),
            "density": support.shape[1] / (m * n)}


# ---------------------------------------------------------------------------------------------- modules


class SpectralLinear(qwha.SparseAdapter):
    """y = base(x) + s·x ΔWᵀ with ΔW = T_mᵀ F T_n (dims=2) or F T_n (dims=1), F sparse with trainable values.

    The dca / dha / sparse adapters, and WHA in 2-D; 1-D WHA is qwha.WHALinear. Same conventions as WHALinear:
    frozen base (QuantLinear or nn.Linear, bias kept), flat `indices` buffer (row·n + col), fp32 `values`
    Parameter (unscaled), path 'auto' | 'activations' | 'merged' (auto: the cheaper by multiply-adds).
    """

    def __init__(self, base: nn.Module, indices: torch.Tensor, values: torch.Tensor | None = None,
                 kernel: str = "dct", dims: int = 1, scale: float = 1.0, path: str = "auto"):
        if dims not in (1, 2):
            raise ValueError(f"SpectralLinear: dims must be 1 or 2, got {dims}")
        super().__init__(base, indices, values, scale, path)
        self.kernel, self.dims = kernel, dims
        self.k_in = Kernel(kernel, self.in_features)
        self.k_out = Kernel(kernel, self.out_features) if dims == 2 else None

    def delta_weight(self, dtype=torch.float32) -> torch.Tensor:
        """ΔW = s·T_mᵀ F T_n (m, n), differentiable in values."""
        D = self.k_in.inverse(self.dense_F(dtype))                     # (m, n) F T_n
        if self.k_out is not None:
            D = self.k_out.inverse(D.T.contiguous()).T                 # T_mᵀ F T_n
        return self.scale * D

    def choose_path(self, tokens: int) -> str:
        if self.path != "auto":
            return self.path
        m, n = self.out_features, self.in_features
        c_out = self.k_out.cost() if self.k_out is not None else 0.0
        act = tokens * (self.k_in.cost() + m * n + c_out)
        merged = m * self.k_in.cost() + n * c_out + m * n
        return "activations" if act < merged else "merged"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        if self.choose_path(x.numel() // self.in_features) == "activations":
            y = self.k_in.forward(x) @ self.dense_F(x.dtype).T         # (..., m) x T_nᵀ Fᵀ
            if self.k_out is not None:
                y = self.k_out.inverse(y)                              # · T_m
            return self.base(x) + self.scale * y
        return self._merged_forward(x)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}, dims={self.dims}, "
                f"nnz={self.indices.numel()}, scale={self.scale}, path={self.path}")


class LoRALinear(qwha.FrozenBaseAdapter):
    """y = base(x) + s·(x Aᵀ) Bᵀ, A (r, n), B (m, r) trainable fp32; frozen base with its bias (as WHALinear)."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0):
        super().__init__(base)
        r = A.shape[0]
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
            raise ValueError(f"LoRALinear: A {tuple(A.shape)} / B {tuple(B.shape)} do not fit a "
                             f"({self.out_features}, {self.in_features}) layer at rank {r}")
        dev = self._device()
        self.A = nn.Parameter(A.detach().to(device=dev, dtype=torch.float32).clone())
        self.B = nn.Parameter(B.detach().to(device=dev, dtype=torch.float32).clone())
        self.scale = float(scale)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_weight(self, dtype=torch.float32) -> torch.Tensor:
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.scale * ((x @ self.A.to(x.dtype).T) @ self.B.to(x.dtype).T)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale}"


ADAPTER_TYPES = (qwha.WHALinear, SpectralLinear, LoRALinear)


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of every WHALinear / SpectralLinear / LoRALinear in the model."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, ADAPTER_TYPES)}


# ---------------------------------------------------------------------------------------------- whole model


@dataclass
class AdapterConfig:
    adapter: str = "wha"            # wha | dca | dha | sparse | lora
    transform_dims: int = 1         # spectral adapters: 1 (ΔW = F T_n, as WHA) or 2 (T_mᵀ F T_n, as LoCA/SSH)
    select: str = "adaalloc"        # adaalloc | magnitude | random | ssh | loca (sparse adapters; LoRA ignores it)
    refine: bool = True             # least-squares values on the support (eq. 9) instead of C there
    qa_init: bool | None = None     # quantization-aware values (LoRA: CLoQ) or zero (LoRA: A random, B = 0);
                                    # None: on, except select='loca' (LoCA starts from zero values)
    rank: int = 64                  # budget r·(m + n) per layer (LoRA: rank r)
    temperature: float = 1.0        # AdaAlloc temperature t
    scale: float = 1.0              # s in ΔW = s·(...); values are stored divided by s
    damp: float = 1e-4              # λ of the H damping used by the init solves
    score: str = "output"           # AdaAlloc's channel score: output ‖e_i Rᵀ‖ | weight ‖e_i‖
    rule: str = "output"            # AdaAlloc's per-row ranking: output C²·G_jj | magnitude |C|
    seed: int = 0                   # random / ssh / loca positions, plain LoRA's A

    def __post_init__(self):
        if self.adapter not in ADAPTERS:
            raise ValueError(f"--adapter must be one of {tuple(ADAPTERS)}, got {self.adapter!r}")
        if self.transform_dims not in (1, 2):
            raise ValueError(f"--transform-dims must be 1 or 2, got {self.transform_dims}")
        if self.adapter in ("lora", "sparse") and self.transform_dims != 1:
            raise ValueError(f"--transform-dims 2 needs a spectral adapter (wha, dca, dha), not {self.adapter!r}")
        if self.select not in SELECTS[:-1]:
            raise ValueError(f"--select must be one of {SELECTS[:-1]}, got {self.select!r}")
        if self.select == "loca" and self.qa_init:
            raise ValueError("--select loca starts from zero values (LoCA's initial state); with --qa-init use "
                             "--select random (the same random positions with quantization-aware values)")
        if self.rank < 1:
            raise ValueError(f"--rank must be >= 1, got {self.rank}")

    @property
    def use_qa_init(self) -> bool:
        return self.select != "loca" if self.qa_init is None else bool(self.qa_init)


def init_layer_adapter(base: nn.Module, W: torch.Tensor, H: torch.Tensor, cfg: AdapterConfig,
                       generator: torch.Generator, device=None) -> tuple[nn.Module, dict]:
    """One layer: the adapter module around `base` (Q = its dequantized weight, E = W − Q) and its report row."""
    t0 = time.perf_counter()
    Q = qwha._base_weight(base).detach()
    if W.shape != Q.shape:
        raise ValueError(f"original weight {tuple(W.shape)} vs base {tuple(Q.shape)}")
    dev = torch.device(device) if device is not None else H.device
    m, n = Q.shape
    E = W.to(dev, torch.float64) - Q.to(dev, torch.float64)
    H = H.to(dev)
    row = {"shape": [m, n]}
    if cfg.adapter == "lora":
        r = min(cfg.rank, m, n)
        if cfg.use_qa_init:
            A, B = cloq_init(E, H, r, cfg.damp)
        else:
            A, B = lora_plain_init(m, n, r, generator)
        mod = LoRALinear(base, A, B / cfg.scale, scale=cfg.scale)
        err0 = float(qwha.layer_error(E, H))
        err = float(qwha.layer_error(E, H, (B.double() @ A.double()).to(dev)))
        row.update(budget=r * (m + n), err_before=err0, err_select=err, err_refined=err, k_min=r, k_max=r)
    else:
        budget = min(cfg.rank * (m + n), m * n)
        li = init_sparse_layer(E, H, budget, ADAPTERS[cfg.adapter], cfg.transform_dims, select=cfg.select,
                               refine=cfg.refine, qa_init=cfg.use_qa_init, W=W.to(dev), temperature=cfg.temperature,
                               score=cfg.score, rule=cfg.rule, damp=cfg.damp, generator=generator)
        vals = li.values / cfg.scale
        if cfg.adapter == "wha" and cfg.transform_dims == 1:
            mod = qwha.WHALinear(base, li.indices, vals, scale=cfg.scale)
        else:
            mod = SpectralLinear(base, li.indices, vals, ADAPTERS[cfg.adapter], cfg.transform_dims, cfg.scale)
        row.update(budget=int(li.values.numel()), err_before=li.err_before, err_select=li.err_select,
                   err_refined=li.err_refined, k_min=int(li.k.min()), k_max=int(li.k.max()))
    row["rel_select"] = row["err_select"] / max(row["err_before"], 1e-30)
    row["rel_refined"] = row["err_refined"] / max(row["err_before"], 1e-30)
    row["seconds"] = time.perf_counter() - t0
    return mod, row


def init_adapters(model: nn.Module, weights: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor],
                  cfg: AdapterConfig, names: list[str] | None = None, device=None, quiet: bool = False,
                  generator: torch.Generator | None = None) -> list[dict]:
    """Wrap every target linear in the adapter of `cfg`, initialized at WHA's budget (the counterpart of
    qwha.init_qwha). weights: the ORIGINAL full-precision weights {name: W}; hessians: {name: H} undamped.
    Returns one report row per layer (the keys of qwha.init_qwha's, plus adapter), a table on stderr unless quiet.
    generator: drawn from for random supports (default one seeded with cfg.seed; reuse it across blocks)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)

    def init_one(base, W, H):
        new, row = init_layer_adapter(base, W, H, cfg, gen, device)
        return new, {"adapter": cfg.adapter, **row}

    return qwha.wrap_layers(model, hessians, weights, init_one, names=names, adapter_types=ADAPTER_TYPES,
                            who="init_adapters", label=f"{cfg.adapter} ", quiet=quiet)


# ---------------------------------------------------------------------------------------------- files


FORMAT = "qwha-baselines/1"


def save_adapters(path: str | Path, model: nn.Module, metadata: dict | None = None) -> None:
    """Every adapter module (WHALinear, SpectralLinear, LoRALinear) to safetensors, keyed by module name, with
    its kind, kernel, dims, scale and shape in the header. Bitwise round trip with load_adapters."""
    from safetensors.torch import save_file
    mods = adapter_modules(model)
    if not mods:
        raise ValueError("save_adapters: the model has no adapter module")
    tensors, layers = {}, {}
    for name, mod in mods.items():
        info = {"out_features": mod.out_features, "in_features": mod.in_features, "scale": mod.scale}
        if isinstance(mod, LoRALinear):
            info["kind"] = "lora"
            tensors[f"{name}.A"], tensors[f"{name}.B"] = mod.A.detach().cpu(), mod.B.detach().cpu()
        else:
            info.update(kind="sparse", kernel=getattr(mod, "kernel", "wht"), dims=getattr(mod, "dims", 1))
            tensors[f"{name}.indices"] = mod.indices.detach().cpu()
            tensors[f"{name}.values"] = mod.values.detach().cpu()
        layers[name] = info
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": FORMAT, "layers": json.dumps(layers), "settings": json.dumps(metadata or {})})


def load_adapters(path: str | Path, model: nn.Module) -> dict:
    """Load save_adapters' file (or qwha.save_adapters', delegated) into `model`, wrapping the bare linears or
    replacing existing adapters of the same names. Returns the saved settings."""
    from safetensors import safe_open
    path = adapter.checked_adapter_file(path, "baselines.save_adapters")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") == "qwha-adapters/1":
            return qwha.load_adapters(path, model)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an adapter file (format {meta.get('format')!r}, expected {FORMAT!r})")
        for name, info in json.loads(meta["layers"]).items():
            try:
                mod = model.get_submodule(name)
            except AttributeError as e:
                raise ValueError(f"{path}: adapter for {name}, which the model does not have") from e
            base = mod.base if isinstance(mod, ADAPTER_TYPES) else mod
            if (base.out_features, base.in_features) != (info["out_features"], info["in_features"]):
                raise ValueError(f"{path}: {name} is ({info['out_features']}, {info['in_features']}), "
                                 f"the model's is ({base.out_features}, {base.in_features})")
            if info["kind"] == "lora":
                new = LoRALinear(base, f.get_tensor(f"{name}.A"), f.get_tensor(f"{name}.B"), info["scale"])
            else:
                idx, val = f.get_tensor(f"{name}.indices"), f.get_tensor(f"{name}.values")
                if info["kernel"] == "wht" and info["dims"] == 1:
                    new = qwha.WHALinear(base, idx.long(), val, scale=info["scale"])
                else:
                    new = SpectralLinear(base, idx.long(), val, info["kernel"], info["dims"], info["scale"])
                new.indices = idx.to(new.indices.device)           # the stored dtype, bit for bit
            model_lib.set_module(model, name, new)
    return json.loads(meta.get("settings", "{}"))
