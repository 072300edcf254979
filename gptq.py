"""Quantizers for the base weight (docs/method.md "Quantization"): the grid, RTN, GPTQ, MagR, GPTQ's polish;
packed 2/3/4-bit storage; QuantLinear.

Orientation follows PyTorch: a weight W is (m, n) = (out_features, in_features) and a layer computes y = x Wᵀ.
In reading order:

    fit_groups, quantize_rtn     the grid (eq. 1) and round to nearest on it
    gptq_reference               classic GPTQ as the ~40-line column loop (Frantar et al. 2023)
    magr                         MagR's proximal gradient (Zhang et al. 2024), the optional preprocessing
    gptq_quantize                the fast GPTQ: blocked, lazy updates, in the LDLQ form; tested equal to the reference
    polish                       beyond the paper, after GPTQ: coordinate descent over the codes, scale refit (the
                                 grid's clip option, fit_groups_clipped, is the third refinement)
    pack_codes, QuantLinear, save_quantized / load_quantized    storage

The grid, asymmetric min–max per group of `group_size` consecutive input columns (eq. 1):

    s = (max − min) / (2^b − 1)   (the range always includes 0),  z = round(−min / s),
    q = clamp(round(w / s) + z, 0, 2^b − 1),                       ŵ = s · (q − z).

Scales are stored in fp16 and every quantizer rounds with the *stored* fp16 scale (converted back to fp32), so
what is saved is exactly what was optimized and `QuantState.dequantize()` reproduces the quantizer's ŵ bitwise.
The refinements keep that format and only choose its numbers better.
With `fp16_exact` every scale keeps 11 − b significant bits (`fp16_exact_scales`), so each ŵ is an fp16 value and
readers that dequantize in fp16 agree.

Packing (`pack_codes`): the codes of a tensor are flattened row-major and cut into chunks of 32 (the last chunk
zero-padded); a chunk of b-bit codes becomes b int32 words, word k holding bit k of the 32 codes (bit plane k,
code j at bit j). That is exactly b bits per code for every b (2, 3 and 4 alike), with no fields straddling
words. Zero points are packed the same way; scales stay fp16.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from checks import QUANTIZED_FORMAT

SUPPORTED_BITS = (2, 3, 4)
FORMAT = QUANTIZED_FORMAT     # safetensors metadata "format" (checks.py validates files without importing gptq)
FORMAT_VERSION = "1"
_FP16_MAX = 65504.0
_FP16_TINY = 2.0 ** -24       # smallest positive fp16 (subnormal)
_SUB = 32                     # GPTQ: columns per sub-block inside a block (bounds the per-column work to 32·m)


# --------------------------------------------------------------------------------------------- checks
def _check_bits(bits) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r}: expected one of {SUPPORTED_BITS}")
    return bits


def _check_weight(W: torch.Tensor, bits, group_size, what: str = "W") -> None:
    _check_bits(bits)
    if W.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D weight (out_features, in_features), got shape {tuple(W.shape)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size={group_size!r}: expected a positive int")
    if W.shape[1] % group_size != 0:
        raise ValueError(f"{what}: in_features={W.shape[1]} is not divisible by group_size={group_size}")
    if not torch.isfinite(W).all():
        raise ValueError(f"{what}: weight has NaN or Inf entries")


# --------------------------------------------------------------------------------------------- grid (eq. 1)
CLIP_SHRINK = tuple(1.0 - k / 20 for k in range(11))   # clip: shrink factors of the min–max range, 1 first


def fp16_exact_scales(s16: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 scales rounded to 11 − b significant bits, so that every s·(q − z) (|q − z| ≤ 2^b − 1, b bits) has at
    most fp16's 11: readers that dequantize in fp16 then get exactly the weights computed in fp32."""
    p = 11 - _check_bits(bits)
    m, e = torch.frexp(s16.double())                                   # s = m·2^e, m in [0.5, 1)
    s = torch.ldexp(torch.round(torch.ldexp(m, torch.full_like(e, p))), e - p)
    return s.clamp(max=(2 ** p - 1) * 2.0 ** (16 - p)).half()          # the largest p-bit value below fp16's max


def _store_scales(s: torch.Tensor, maxq: int, fp16_exact: bool = False) -> torch.Tensor:
    """Scales as stored: fp16 within its positive range, with fp16_exact at 11 − b significant bits."""
    s16 = s.clamp(_FP16_TINY, _FP16_MAX).half()
    return fp16_exact_scales(s16, maxq.bit_length()) if fp16_exact else s16


def _grid(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, fp16_exact: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1's (scale, zero) of the range [xmin, xmax] ∋ 0: fp16 scale (1 for a zero-width range), float zero."""
    s = (xmax - xmin) / maxq
    s = torch.where(s == 0, torch.ones_like(s), s)
    s16 = _store_scales(s, maxq, fp16_exact)                            # stored scale
    return s16, torch.round(-xmin / s16.float()).clamp(0, maxq)


def fit_groups(W: torch.Tensor, bits: int, group_size: int, fp16_exact: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Min–max (scale, zero) per group of columns (eq. 1); range includes 0; all-zero groups get scale 1.
    fp16_exact: scales from fp16_exact_scales.

    Returns scales (m, n//g) fp16 and zeros (m, n//g) uint8.
    """
    m, n = W.shape
    Wg = W.detach().float().reshape(m, n // group_size, group_size)
    s16, z = _grid(Wg.amin(-1).clamp(max=0.0), Wg.amax(-1).clamp(min=0.0), 2 ** bits - 1, fp16_exact)
    return s16, z.to(torch.uint8)


def fit_groups_clipped(W: torch.Tensor, bits: int, group_size: int, weight: torch.Tensor | None = None,
                       shrink: tuple = CLIP_SHRINK, polish: int = 1, fp16_exact: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the (scale, zero) with the least weighted rounding error Σ_i weight_i·(w_i − ŵ_i)² of the
    group's own weights, found in two steps:
      1. eq. 1's grid on the shrunk range p·[min, max] for p in `shrink`: the grid search of the GPTQ authors'
         code (`Quantizer(mse=True)`: a clipped range trades a few clamped outliers for a finer step), weighted;
      2. `polish` rounds of Lloyd's update on the uniform grid: for the codes q of the best grid, with its zero z
         or z ± 1, the weighted least-squares scale s = Σ weight·w·u / Σ weight·u² (u = q − z).
    A candidate replaces the best one only where it is strictly better. shrink[0] must be 1: that candidate is
    fit_groups' grid, bit for bit, so no group's weighted error exceeds min–max's. weight: (n,) ≥ 0 per column
    (None: all 1); gptq_quantize passes GPTQ's own error weights d_i (see there). fp16_exact: every candidate's
    scales from fp16_exact_scales. Returns scales fp16, zeros uint8, (m, n//g).
    """
    m, n = W.shape
    if not shrink or shrink[0] != 1.0:
        raise ValueError(f"fit_groups_clipped: shrink={shrink!r} must start with 1.0 (the min–max grid)")
    if weight is not None and (tuple(weight.shape) != (n,) or not bool((weight >= 0).all())):
        raise ValueError(f"fit_groups_clipped: weight must be ({n},) and >= 0, got shape {tuple(weight.shape)}")
    maxq = 2 ** bits - 1
    G = n // group_size
    Wg = W.detach().float().reshape(m, G, group_size)                   # (m, G, g)
    wt = (torch.ones(n, device=W.device) if weight is None else weight.to(W.device, torch.float32)
          ).reshape(1, G, group_size)
    xmin, xmax = Wg.amin(-1).clamp(max=0.0), Wg.amax(-1).clamp(min=0.0)  # (m, G)

    def codes(s16, z):                                                # u = q − z (m, G, g); _round_codes in place
        s, zz = s16.float().unsqueeze(-1), z.unsqueeze(-1)
        return torch.div(Wg, s).round_().add_(zz).clamp_(0.0, float(maxq)).sub_(zz), s

    def err(u, s):                                                    # (m, G); ŵ = (q − z)·s as _dequant
        return (u * s).sub_(Wg).square_().mul_(wt).sum(-1)

    best = scales = zeros = None

    def keep(s16, z):
        nonlocal best, scales, zeros
        e = err(*codes(s16, z))
        if best is None:
            best, scales, zeros = e, s16, z
        else:
            better = e < best
            best = torch.where(better, e, best)
            scales, zeros = torch.where(better, s16, scales), torch.where(better, z, zeros)

    for p in shrink:
        keep(*_grid(xmin * p, xmax * p, maxq, fp16_exact))
    wW = Wg * wt
    for _ in range(polish):
        for dz in (0.0, -1.0, 1.0):
            z = (zeros + dz).clamp(0, maxq)
            u = codes(scales, z)[0]
            s = (u * wW).sum(-1) / u.square().mul_(wt).sum(-1)       # (m, G); 0/0 = nan fails s > 0
            keep(_store_scales(torch.where(s > 0, s, scales.float()), maxq, fp16_exact), z)
    return scales, zeros.to(torch.uint8)


def _round_codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes (as float) of w on the grid (s, z): clamp(round(w/s) + z, 0, maxq). The one rounding rule."""
    return torch.clamp(torch.round(w / s) + z, 0.0, float(maxq))


def _dequant(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
             dtype=torch.float32) -> torch.Tensor:
    """ŵ = s·(q − z), computed in fp32 from the fp16 scales, then cast to dtype. (m, n)."""
    m, n = codes.shape
    q = codes.float().reshape(m, n // group_size, group_size)
    w = (q - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.reshape(m, n).to(dtype)


@dataclass
class QuantState:
    """A quantized weight: codes (m, n) uint8 in [0, 2^b − 1], scales (m, n//g) fp16, zeros (m, n//g) uint8."""
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    stats: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """ŵ = scale·(q − z) in fp32 from the stored fp16 scales (eq. 1), cast to dtype. (m, n)."""
        return _dequant(self.codes, self.scales, self.zeros, self.group_size, dtype)


def quantize_rtn(W: torch.Tensor, bits: int, group_size: int = 64, fp16_exact: bool = False) -> QuantState:
    """Round-to-nearest on the per-group min–max grid (eq. 1); fp16_exact: scales from fp16_exact_scales."""
    _check_weight(W, bits, group_size)
    m, n = W.shape
    maxq = 2 ** bits - 1
    scales, zeros = fit_groups(W, bits, group_size, fp16_exact)
    Wg = W.detach().float().reshape(m, n // group_size, group_size)
    q = _round_codes(Wg, scales.float().unsqueeze(-1), zeros.float().unsqueeze(-1), maxq)
    return QuantState(q.reshape(m, n).to(torch.uint8), scales, zeros, bits, group_size, {"method": "rtn"})


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """Layer output error ‖(W − Q)Rᵀ‖_F with RᵀR = H, and its ratio to ‖W Rᵀ‖_F (trace forms, no root needed)."""
    Hf = H.to(W.device, torch.float32)
    W = W.float()
    E = W - Q.float()
    err = float(((E @ Hf) * E).sum().clamp(min=0).sqrt())
    ref = float(((W @ Hf) * W).sum().clamp(min=0).sqrt())
    return err, (err / ref if ref > 0 else 0.0)


# --------------------------------------------------------------------------------------------- GPTQ, the reference
def gptq_reference(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 64, damp: float = 0.01,
                   static_groups: bool = True) -> QuantState:
    """Classic GPTQ (Frantar et al. 2023) as docs/method.md "GPTQ" states it, one column at a time in fp64: with U
    the upper Cholesky factor of the damped H⁻¹ (H⁻¹ = UᵀU), column i is rounded on the grid (eq. 1) and its
    error err = (w_i − ŵ_i)/U_ii moves onto the columns not yet rounded, W[:, j] −= err·U[i, j] for j > i.
    static_groups: every group's (scale, zero) fitted once on W; else on the updated columns as the group starts.
    Dead inputs (diag H = 0) get H_ii = 1 and a zero weight column. The reference gptq_quantize is tested against.
    """
    _check_weight(W, bits, group_size)
    m, n = W.shape
    maxq = 2 ** bits - 1
    H = H.detach().to(W.device, torch.float64).clone()
    W = W.detach().to(torch.float64).clone()                          # (m, n), updated column by column
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diagonal(H).mean() * torch.eye(n, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)        # (n, n) upper, H⁻¹ = UᵀU
    scales, zeros = fit_groups(W.float(), bits, group_size)           # (m, n/g) the static grid, on W
    codes = torch.zeros(m, n, dtype=torch.uint8, device=W.device)
    for i in range(n):
        a = i // group_size
        if not static_groups and i % group_size == 0:                 # the group's grid on its updated columns
            s16, z8 = fit_groups(W[:, i:i + group_size].float(), bits, group_size)
            scales[:, a], zeros[:, a] = s16[:, 0], z8[:, 0]
        s, z = scales[:, a].double(), zeros[:, a].double()            # (m,)
        q = torch.clamp(torch.round(W[:, i] / s) + z, 0, maxq)        # eq. 1
        codes[:, i] = q.to(torch.uint8)
        err = (W[:, i] - (q - z) * s) / U[i, i]                       # (m,)
        W[:, i + 1:] -= torch.outer(err, U[i, i + 1:])
    return QuantState(codes, scales, zeros, bits, group_size, {"method": "gptq_reference"})


# --------------------------------------------------------------------------------------------- MagR
def magr(W: torch.Tensor, H: torch.Tensor, alpha: float = 1e-4, group_size: int = 64, iters: int = 200) -> torch.Tensor:
    """MagR (Zhang et al. 2024; docs/method.md "MagR"): proximal gradient on ½‖(Ŵ − W)R̃ᵀ‖² + α Σ_group ‖ŵ_group‖_∞,
    R̃ᵀR̃ = H/λmax(H), shrinking each group's largest weight while keeping the layer's output.

    As in the MagR authors' code, H is normalized to λmax = 1, so the step is 1 (= 1/λmax) and the prox scale per
    step is α (in weight units). Gradient (Ŵ − W)H̃; uses the full accumulated H. Returns W' (m, n), W's dtype.
    """
    if W.dim() != 2 or W.shape[1] % group_size != 0:
        raise ValueError(f"magr: W of shape {tuple(W.shape)} needs in_features divisible by group_size={group_size}")
    n = W.shape[1]
    if tuple(H.shape) != (n, n):
        raise ValueError(f"magr: H has shape {tuple(H.shape)}; expected ({n}, {n})")
    if alpha <= 0 or iters < 0:
        raise ValueError(f"magr: alpha={alpha} must be > 0 and iters={iters} >= 0")
    Hd = H.detach().to(W.device, torch.float64)
    Hd = (Hd + Hd.T) / 2
    lmax = float(torch.linalg.eigvalsh(Hd)[-1])
    if not lmax > 0:
        return W.clone()
    Hn = (Hd / lmax).to(torch.float32)                                # (n, n), λmax = 1
    W0 = W.detach().float()
    Wh = W0.clone()
    for _ in range(iters):
        V = Wh - (Wh - W0) @ Hn                                       # gradient step, η = 1
        Wh = prox_linf_groups(V, alpha, group_size)
    return Wh.to(W.dtype)


def prox_linf_groups(V: torch.Tensor, tau: float, group_size: int) -> torch.Tensor:
    """prox of τ·Σ_group ‖v_group‖_∞ on V (m, n), per group of columns.

    Moreau: prox_{τ‖·‖∞}(v) = v − P_{ℓ1 ball of radius τ}(v); with P(v) = sign(v)·max(|v| − θ, 0) this is
    clamp(v, −θ, θ), θ the ℓ1-ball threshold (0 when ‖v‖₁ ≤ τ). Batched over all groups.
    """
    m, n = V.shape
    Vg = V.reshape(m * (n // group_size), group_size)                 # (B, g)
    theta = _linf_prox_threshold(Vg.abs(), tau)                       # (B, 1)
    return torch.maximum(torch.minimum(Vg, theta), -theta).reshape(m, n)


def project_l1_ball(V: torch.Tensor, radius: float) -> torch.Tensor:
    """Euclidean projection of every row of V (B, g) onto the ℓ1 ball of the given radius (Duchi et al. 2008)."""
    a = V.abs()
    u = torch.sort(a, dim=-1, descending=True).values                 # (B, g)
    c = u.cumsum(-1) - radius
    j = torch.arange(1, V.shape[-1] + 1, device=V.device, dtype=V.dtype)
    rho = (u * j > c).sum(-1, keepdim=True).clamp(min=1)              # (B, 1), support size of the projection
    theta = c.gather(-1, rho - 1) / rho.to(V.dtype)
    proj = torch.sign(V) * (a - theta).clamp(min=0)
    inside = a.sum(-1, keepdim=True) <= radius
    return torch.where(inside, V, proj)


def _linf_prox_threshold(a: torch.Tensor, tau: float, k: int = 8) -> torch.Tensor:
    """θ per row of a = |V| (B, g) with Σ_j max(a_j − θ, 0) = τ (θ = 0 where Σ a ≤ τ): the ℓ1-ball threshold.

    Duchi's sort-based rule (project_l1_ball's) on the top-k entries only, a fast path: rows whose support may extend
    past k are redone with a full sort, so the result is exact. (B, 1).
    """
    B, g = a.shape
    k = min(k, g)
    u = torch.topk(a, k, dim=-1, sorted=True).values if k < g else torch.sort(a, -1, descending=True).values
    c = u.cumsum(-1) - tau                                            # (B, k)
    j = torch.arange(1, k + 1, device=a.device, dtype=a.dtype)
    rho = (u * j > c).sum(-1, keepdim=True).clamp(min=1)              # support size of the projection
    theta = c.gather(-1, rho - 1) / rho.to(a.dtype)
    if k < g:
        redo = (rho[:, 0] == k).nonzero()[:, 0]                       # support may be larger than k
        if redo.numel():
            theta[redo] = _linf_prox_threshold(a[redo], tau, g)
    return torch.where(a.sum(-1, keepdim=True) <= tau, torch.zeros_like(theta), theta.clamp(min=0))


# --------------------------------------------------------------------------------------------- GPTQ, the fast path
def _prepare(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W0, Hd, dead) as GPTQ and its polish use them: W in fp32 with dead input columns (diag H = 0) zeroed, H
    symmetrized in fp64 (for fp64 H) or fp32 on W's device, with H_ii = 1 at dead inputs."""
    Hd = H.detach().to(W.device, torch.float64 if H.dtype == torch.float64 else torch.float32)
    Hd = (Hd + Hd.T) / 2                                              # (n, n), symmetric, undamped
    W0 = W.detach().to(torch.float32).clone()                         # (m, n), original order
    dead = torch.diagonal(Hd) == 0
    if bool(dead.any()):
        Hd[dead, dead] = 1.0
        W0[:, dead] = 0.0
    return W0, Hd, dead


def _act_order(Hd: torch.Tensor) -> torch.Tensor:
    """GPTQ's act-order: the columns by decreasing diag H (stable)."""
    return torch.argsort(torch.diagonal(Hd), descending=True, stable=True)


def _upper_factor(H: torch.Tensor, damp: float, name: str, max_retries: int = 3):
    """Upper V with H + λ·mean(diag H)·I = V Vᵀ, i.e. V = U⁻¹ for GPTQ's upper Cholesky factor U of the damped
    H⁻¹ = UᵀU. One Cholesky of the reversed matrix: J H J = L Lᵀ gives V = J L J. Retries with λ ×10 when H is
    not positive definite. Computed in H's dtype. Returns (V, λ used, retries).
    """
    n = H.shape[0]
    mean_diag = float(torch.diagonal(H).mean())
    if not mean_diag > 0:
        raise ValueError(f"gptq_quantize({name!r}): Hessian has mean diagonal {mean_diag:g}; expected > 0 "
                         "(H = XᵀX/N is positive semi-definite)")
    idx = torch.arange(n, device=H.device)
    Hr = H.flip(0, 1)                                                 # J H J
    lam = damp
    for retry in range(max_retries + 1):
        Hd = Hr.clone()
        Hd[idx, idx] += lam * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0 and torch.isfinite(torch.diagonal(L)).all():
            return L.flip(0, 1), lam, retry
        lam *= 10.0
    raise ValueError(f"gptq_quantize({name!r}): Hessian is not positive definite even with damping "
                     f"{lam / 10:g}·mean(diag H) after {max_retries} retries (×10 each); check its calibration")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 64, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, static_groups: bool = True, *,
                  clip: bool = False, cd_passes: int = 0, refit: bool = False, fp16_exact: bool = False,
                  name: str = "", measure: bool = True) -> QuantState:
    """GPTQ (Frantar et al. 2023) on the eq. 1 grid, the fast form of gptq_reference; H = XᵀX/N (n, n).

    Columns go in blocks of `block_size` with lazy updates of the columns right of the block, in QuIP's LDLQ form
    (Chee et al. 2023, Thm. 6): with V = U⁻¹ (upper, H = V Vᵀ, one Cholesky, no inverse), the column about to be
    rounded is w̃_i = w_i + Σ_{k<i} (w_k − ŵ_k)·V[k, i]/V_ii, w the original weights: the same numbers as the
    reference's err·U updates (E U = W − Q). Dead inputs (diag H = 0) get H_ii = 1 and W[:, i] = 0. With
    `static_groups` every group's (scale, zero) is fitted once on the original weight in the original column order,
    so `act_order` (columns by decreasing diag H) keeps the grid of the original order and needs no g_idx. stats:
    damp, retries, dead, time_s, and with `measure` out_err = ‖(W − Q)Rᵀ‖ and rel_err = out_err/‖W Rᵀ‖ (RᵀR = H
    undamped; two m·n² products, more than the quantization's own arithmetic: measure=False skips them).

    Refinements (all off by default, which is classic GPTQ); each keeps the format (codes, fp16 scales, zeros):
      clip       the grid option: grids from fit_groups_clipped instead of min–max, weighted by GPTQ's own error
                 weights d_i = V_ii²: from (E V)_i = V_ii (w̃_i − ŵ_i), ‖(W − Q)Rᵀ‖² = Σ_i d_i ‖w̃_i − ŵ_i‖² (damped
                 H), so a group's d-weighted rounding error is its share of GPTQ's error (taken on w for w̃).
      cd_passes, refit   then `polish` (coordinate descent over the codes, scale refit) on the result, in GPTQ's
                 column order: the same bits as polish(W, gptq_quantize(... clip ...), H, cd_passes=..., refit=...,
                 act_order=...).
      fp16_exact every scale (grid fits, refits) at 11 − b significant bits (fp16_exact_scales), chosen before the
                 codes are rounded so GPTQ compensates on the final grid: fp16-dequantizing readers are exact.
    stats also hold clip, cd_passes, refit, fp16_exact and cd_changed (codes changed per pass).
    """
    t0 = time.perf_counter()
    _check_weight(W, bits, group_size, what=f"W of {name!r}" if name else "W")
    m, n = W.shape
    if tuple(H.shape) != (n, n):
        raise ValueError(f"gptq_quantize({name!r}): H has shape {tuple(H.shape)}; expected ({n}, {n})")
    if not torch.isfinite(H).all():
        raise ValueError(f"gptq_quantize({name!r}): H has NaN or Inf entries")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r}: expected a positive int")
    if not isinstance(cd_passes, int) or isinstance(cd_passes, bool) or cd_passes < 0:
        raise ValueError(f"cd_passes={cd_passes!r}: expected an int >= 0")
    if act_order and not static_groups:
        raise ValueError("act_order=True needs static_groups=True (dynamic groups in permuted order need a g_idx)")
    if not static_groups and block_size % group_size != 0:
        raise ValueError(f"static_groups=False needs block_size ({block_size}) divisible by group_size ({group_size})")
    maxq = 2 ** bits - 1
    fmaxq = float(maxq)
    dev = W.device

    W0, Hd, dead = _prepare(W, H)                                     # W0 (m, n), Hd (n, n) undamped

    G = n // group_size
    perm = _act_order(Hd) if act_order else None
    Hp = Hd if perm is None else Hd[perm][:, perm]                   # (n, n), GPTQ's column order
    V, lam, retries = _upper_factor(Hp, damp, name)
    d = torch.diagonal(V).to(torch.float32) ** 2                      # (n,) GPTQ's error weight per column (clip)
    if clip:
        fit = lambda A, w: fit_groups_clipped(A, bits, group_size, w, fp16_exact=fp16_exact)    # noqa: E731
    else:
        fit = lambda A, w: fit_groups(A, bits, group_size, fp16_exact)                          # noqa: E731
    if static_groups:                                                 # static grid, original order
        scales, zeros = fit(W0, d if perm is None else d[torch.argsort(perm)])
    # Column i is rounded at w̃_i = base_i + Σ_{k<i} r_k C[k, i] with r_k = base_k − ŵ_k, where either
    #  LDLQ form (static grid): base = the original w, C[k, i] = V[k, i]/V_ii;
    #  GPTQ form (dynamic grid, whose groups are fitted on GPTQ's partially updated columns, which the LDLQ form
    #  does not produce): base = the updated w̃, C[k, i] = −U[k, i]/U_kk with U = V⁻¹.
    ldlq = static_groups
    if ldlq:
        C = V / torch.diagonal(V)[None, :]
    else:
        U = torch.linalg.solve_triangular(V, torch.eye(n, dtype=V.dtype, device=dev), upper=True)
        C = -U / torch.diagonal(U)[:, None]
    C = C.to(torch.float32)                                           # (n, n) upper, diagonal unused

    # Work transposed: column i of W is the contiguous row Wt[i] (m,).
    Wt = (W0 if perm is None else W0[:, perm]).T.contiguous()         # (n, m), updated in place
    W0t = Wt.clone() if static_groups else Wt                         # (n, m), the original (LDLQ form)
    Qt = torch.empty_like(Wt)                                         # codes, as float
    if static_groups:
        per_col = lambda t: t.float().T.repeat_interleave(group_size, dim=0)                    # noqa: E731
        St, Zt = per_col(scales), per_col(zeros)                      # (n, m) scale and zero of each column
        if perm is not None:
            St, Zt = St[perm], Zt[perm]
    else:
        St = torch.empty_like(Wt)
        Zt = torch.empty_like(Wt)
        scales = torch.empty(m, G, dtype=torch.float16, device=dev)
        zeros = torch.empty(m, G, dtype=torch.uint8, device=dev)

    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = Wt[i1:i2]                                                # (c, m): carries all updates from earlier blocks
        L1 = C[i1:i2, i1:i2].T.contiguous()                           # (c, c) lower: L1[i, k] = C[k, i]
        R1 = torch.zeros_like(W1)                                     # (c, m) residuals r_k
        RT = R1.T                                                     # (m, c) view for the matrix-vector products
        rows = list(zip(W1.unbind(0), W0t[i1:i2].unbind(0), St[i1:i2].unbind(0), Zt[i1:i2].unbind(0),
                        Qt[i1:i2].unbind(0), R1.unbind(0)))         # per-column views, one call each
        for j1 in range(0, i2 - i1, _SUB):                            # sub-blocks: W1[j1:] has all updates < j1
            j2 = min(j1 + _SUB, i2 - i1)
            RTs = RT[:, j1:j2]                                        # (m, k) the sub-block's r_k, 0 until computed
            Ls = L1[j1:j2, j1:j2].unbind(0)                           # row i − j1: C[j1:j2, i], 0 below the diagonal
            for i in range(j1, j2):
                w, w0, s, z, q, r = rows[i]
                col = i1 + i
                if not static_groups and col % group_size == 0:       # fit the group on the updated weights
                    Wg = W1[i:i + group_size] + L1[i:i + group_size, j1:i] @ R1[j1:i]      # (g, m) GPTQ form
                    s16, z8 = fit(Wg.T, d[col:col + group_size])
                    gi = col // group_size
                    scales[:, gi], zeros[:, gi] = s16[:, 0], z8[:, 0]
                    St[col:col + group_size] = s16.float().T          # s, z are views of these rows
                    Zt[col:col + group_size] = z8.float().T
                if i > j1:                                            # (m,) column i after the in-block updates:
                    w = torch.addmv(w, RTs, Ls[i - j1])               #   w̃_i += Σ_{j1<=k<i} r_k C[k, i] (no slices:
                                                                      #   the terms k >= i are 0 as r_k is still 0)
                torch.div(w, s, out=q)                                # q = clamp(round(w/s) + z, 0, maxq):
                q.round_().add_(z).clamp_(0.0, fmaxq)                 #   _round_codes, in place
                torch.sub(q, z, out=r)
                r.mul_(s)                                             # ŵ_i = (q − z)·s, as _dequant computes it
                torch.sub(w0 if ldlq else w, r, out=r)                # r_i = base_i − ŵ_i
            if j2 < i2 - i1:                                          # lazy update inside the block
                W1[j2:].addmm_(L1[j2:, j1:j2], R1[j1:j2])
        if i2 < n:                                                    # lazy update: W[:, i2:] += R · C[i1:i2, i2:]
            Wt[i2:].addmm_(C[i1:i2, i2:].T, R1)

    codes = Qt.T                                                      # (m, n), permuted order
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    state = QuantState(codes.to(torch.uint8).contiguous(), scales, zeros, bits, group_size)
    state, changed = _polish(W0, state, Hd, cd_passes, refit, perm, block_size, fp16_exact)
    state.stats = {"method": "gptq", "name": name, "damp": lam, "retries": retries, "dead": int(dead.sum()),
                   "act_order": act_order, "static_groups": static_groups, "clip": clip, "cd_passes": cd_passes,
                   "refit": refit, "fp16_exact": fp16_exact, "cd_changed": changed,
                   "time_s": time.perf_counter() - t0}
    if measure:
        state.stats["out_err"], state.stats["rel_err"] = output_error(W.detach(), state.dequantize(), H.detach())
    return state


# --------------------------------------------------------------------------------------------- polish
# Beyond the paper (docs/method.md "GPTQ"), each keeping the grid format: clip, the grid option (fit_groups_clipped,
# with the grid above), then, after classic GPTQ, `polish`: coordinate descent over the codes (QuantEase) and
# least-squares group scales for the codes, alternately, so that the error never rises from GPTQ's.
def polish(W: torch.Tensor, state: QuantState, H: torch.Tensor, *, cd_passes: int = 0, refit: bool = False,
           act_order: bool = False, block_size: int = 128, fp16_exact: bool = False) -> QuantState:
    """GPTQ's polish: `cd_passes` passes of coordinate_descent over the codes of `state`, each followed by
    refit_scales when `refit` (one refit alone when cd_passes = 0), on ‖(W − Q)Rᵀ‖ with RᵀR = H undamped; no step
    raises it. Columns in GPTQ's order (act_order: by decreasing diag H) and dead inputs (diag H = 0) as
    gptq_quantize treats them, which runs exactly this after GPTQ. fp16_exact: refitted scales from
    fp16_exact_scales. stats: cd_passes, refit, cd_changed."""
    _check_weight(W, state.bits, state.group_size)
    m, n = W.shape
    if state.shape != (m, n) or tuple(H.shape) != (n, n):
        raise ValueError(f"polish: W {tuple(W.shape)} and H {tuple(H.shape)} do not match the state's {state.shape}")
    if not isinstance(cd_passes, int) or isinstance(cd_passes, bool) or cd_passes < 0:
        raise ValueError(f"cd_passes={cd_passes!r}: expected an int >= 0")
    W0, Hd, _ = _prepare(W, H)
    out, changed = _polish(W0, state, Hd, cd_passes, refit, _act_order(Hd) if act_order else None, block_size,
                           fp16_exact)
    return QuantState(out.codes, out.scales, out.zeros, out.bits, out.group_size,
                      {"method": "polish", "cd_passes": cd_passes, "refit": refit, "cd_changed": changed})


def _polish(W0: torch.Tensor, state: QuantState, Hd: torch.Tensor, cd_passes: int, refit: bool,
            perm: torch.Tensor | None, block_size: int, fp16_exact: bool = False) -> tuple[QuantState, list[int]]:
    """polish on _prepare's (W0, Hd), columns in the order `perm` (None: 0..n−1); returns (state, cd_changed)."""
    changed = []
    if cd_passes or refit:
        H32 = Hd.to(torch.float32)                                    # (n, n) undamped, symmetric, original order
        Hp32 = H32 if perm is None else Hd[perm][:, perm].to(torch.float32)   # the same in GPTQ's column order
    for _ in range(cd_passes):                                        # codes (CD), then scales (refit)
        state = _coordinate_descent(W0, state, Hp32, 1, perm, block_size)
        changed += state.stats["cd_changed"]
        if refit:
            state = refit_scales(W0, state, H32, fp16_exact)
    if refit and cd_passes == 0:
        state = refit_scales(W0, state, H32, fp16_exact)
    return state, changed


def coordinate_descent(W: torch.Tensor, state: QuantState, H: torch.Tensor, passes: int = 1,
                       order: torch.Tensor | None = None, block_size: int = 128) -> QuantState:
    """QuantEase (Behdin et al. 2023): cyclic coordinate descent over the codes of `state` on ‖(W − Q)Rᵀ‖², RᵀR = H.

    With all other columns fixed, the error is a parabola in column j (every row at once) with vertex
    t_j = ŵ_j + (E H)_j / H_jj, E = W − Q. The grid point nearest to t_j (round in code units, clamp to
    [0, 2^b − 1]) is the exact minimizer over that column's grid, so no step can raise the error (in exact
    arithmetic; the gradient E H is recomputed from scratch at every pass, so fp32 drift cannot build up).
    Blocked like GPTQ's lazy updates: inside a block of `block_size` columns each column's gradient takes the
    changes of the block's earlier columns, and after the block the columns still to come take one (n − i2, c)·(c, m)
    product: about 1.5 m·n² multiply-adds per pass. Columns in `order` (a permutation; default 0..n−1). Scales
    and zeros are kept. Needs diag H > 0. stats: cd_changed (codes changed in each pass); stops early after a
    pass that changes nothing.
    """
    m, n = state.shape
    if tuple(W.shape) != (m, n) or tuple(H.shape) != (n, n):
        raise ValueError(f"coordinate_descent: W {tuple(W.shape)} and H {tuple(H.shape)} do not match the "
                         f"state's ({m}, {n})")
    Hf = H.detach().to(state.codes.device, torch.float32)
    Hf = (Hf + Hf.T) / 2
    if order is not None:
        Hf = Hf[order][:, order]                                       # (n, n) in visiting order
    if not bool((torch.diagonal(Hf) > 0).all()):
        raise ValueError("coordinate_descent: H has a diagonal entry <= 0 (give dead inputs H_ii = 1)")
    return _coordinate_descent(W, state, Hf, passes, order, block_size)


def _coordinate_descent(W, state: QuantState, Hf: torch.Tensor, passes: int, order, block_size: int) -> QuantState:
    """coordinate_descent with Hf already float32, symmetric, with a positive diagonal and in visiting order."""
    g, maxq = state.group_size, float(2 ** state.bits - 1)
    rowed = lambda t: (t.T if order is None else t.T[order]).contiguous()                        # noqa: E731
    St = rowed(state.scales.float().repeat_interleave(g, 1))          # (n, m), column j's scales as row j
    Zt = rowed(state.zeros.float().repeat_interleave(g, 1))
    Ut = rowed(state.codes.float()) - Zt                              # (n, m) u = q − z, updated in place
    W0t = rowed(W.detach().float())
    lo, hi = -Zt, maxq - Zt                                           # code range in u units
    inv = 1.0 / (torch.diagonal(Hf)[:, None] * St)                    # (n, m) 1/(H_jj·s): gradient -> code units
    changed = []
    for _ in range(passes):
        Gt = Hf @ (W0t - Ut * St)                                     # (n, m) = ((W − Q) H)ᵀ, ŵ as _dequant
        changed.append(_cd_pass(Ut, St, lo, hi, inv, Gt, Hf, block_size))
        if changed[-1] == 0:
            break
    codes = Ut + Zt
    if order is not None:
        codes = codes[torch.argsort(order)]
    return QuantState(codes.T.round().to(torch.uint8).contiguous(), state.scales, state.zeros, state.bits, g,
                      {"method": "cd", "cd_changed": changed})


def _cd_pass(Ut, St, lo, hi, inv, Gt, Hf, block_size: int) -> int:
    """One coordinate-descent pass over the rows of Ut (n, m) in place (see coordinate_descent); Gt (n, m) is the
    gradient (E H)ᵀ on entry, kept current for the columns not yet visited. Returns the number of codes changed."""
    n = Ut.shape[0]
    changed = 0
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        Gb = Gt[i1:i2].clone()                                        # (c, m) the block's gradient, kept current
        Db = torch.zeros_like(Gb)                                     # (c, m) changes ŵ_new − ŵ_old
        DT = Db.T                                                     # (m, c) view for the matrix-vector products
        Hb = Hf[i1:i2, i1:i2]
        HbN = -Hb                                                     # (c, c) symmetric: row j is −H[:, j]
        rows = list(zip(Gb.unbind(0), Db.unbind(0), Ut[i1:i2].unbind(0), inv[i1:i2].unbind(0),
                        St[i1:i2].unbind(0), lo[i1:i2].unbind(0), hi[i1:i2].unbind(0)))
        for j1 in range(0, i2 - i1, _SUB):
            j2 = min(j1 + _SUB, i2 - i1)
            DTs = DT[:, j1:j2]                                        # (m, k) the sub-block's δ_k, 0 until computed
            Hs = HbN[j1:j2, j1:j2].unbind(0)
            for j in range(j1, j2):
                gj, dj, u, iv, s, lj, hj = rows[j]
                if j > j1:                                            # E_k −= δ_k  =>  (EH)_j −= Σ_{k<j} δ_k H_kj
                    gj = torch.addmv(gj, DTs, Hs[j - j1])             #   (no slices: δ_k = 0 for k >= j)
                x = torch.addcmul(u, gj, iv)                          # vertex t_j in code units: u + (EH)_j/(H_jj s)
                x.round_().clamp_(lj, hj)                             # nearest grid point
                torch.sub(x, u, out=dj)                               # Δu
                dj.mul_(s)                                            # δ_j = ŵ_new − ŵ_old = Δu·s (exact)
            if j2 < i2 - i1:
                Gb[j2:].addmm_(Hb[j2:, j1:j2], Db[j1:j2], alpha=-1.0)
        Ut[i1:i2] += Db / St[i1:i2]                                   # Δu = δ/s, exact: δ is an exact product
        if i2 < n:                                                    # the pass's later columns take the changes
            Gt[i2:].addmm_(Hf[i2:, i1:i2], Db, alpha=-1.0)            # (earlier ones: next pass recomputes Gt)
        changed += int(torch.count_nonzero(Db))
    return changed


def refit_scales(W: torch.Tensor, state: QuantState, H: torch.Tensor, fp16_exact: bool = False) -> QuantState:
    """Least-squares group scales for fixed codes: per output row, the scales s (G,) minimizing ‖(w − ŵ)Rᵀ‖² with
    ŵ = s_a·u on group a, u = q − z (RᵀR = H): the G×G normal equations M s = b, M_ab = u_a H_ab u_bᵀ,
    b_a = u_a H_a: wᵀ (the grid step of alternating minimization, Lloyd's update for a uniform grid, here under
    the layer's output metric instead of the weights'). The scales are stored in fp16; a row takes its new scales
    only where that lowers its error, so the error never rises (groups with u = 0, or a non-positive solution,
    keep theirs; fp16_exact: the new scales from fp16_exact_scales). Codes and zeros are kept. About one m·n² product.
    """
    m, n = state.shape
    g = state.group_size
    G = n // g
    dev = state.codes.device
    Hf = H.detach().to(dev, torch.float32)
    Wf = W.detach().to(dev, torch.float32)
    Uf = state.codes.float() - state.zeros.float().repeat_interleave(g, 1)          # (m, n) u = q − z
    b = (Uf * (Wf @ Hf)).reshape(m, G, g).sum(-1)                     # (m, G) b_a = u_a·(H wᵀ)_a
    M = torch.zeros(m, G, G, device=dev)
    for a in range(G):                                                # upper triangle, then mirrored
        P = Uf[:, a * g:(a + 1) * g] @ Hf[a * g:(a + 1) * g, a * g:]  # (m, n − a·g) u_a H_ab for b >= a
        M[:, a, a:] = P.mul_(Uf[:, a * g:]).reshape(m, G - a, g).sum(-1)
    M, b = M.double(), b.double()
    M = M + M.triu(1).transpose(1, 2)                                 # (m, G, G) symmetric
    active = torch.diagonal(M, dim1=1, dim2=2) > 0                    # (m, G) groups with some u != 0
    eye = torch.diag_embed((~active).double())
    s, info = torch.linalg.solve_ex(M + eye, b.unsqueeze(-1))          # inactive groups: s = b_a = 0
    old = state.scales.double()
    s = s[..., 0]
    ok = active & torch.isfinite(s) & (s > 0) & (info == 0)[:, None]
    new = _store_scales(torch.where(ok, s, old), 2 ** state.bits - 1, fp16_exact)   # (m, G) stored scales
    dn = new.double() - old                                           # err(new) − err(old) = dnᵀ(M(new+old) − 2b)
    gain = (dn * ((M @ (new.double() + old).unsqueeze(-1))[..., 0] - 2 * b)).sum(-1)
    scales = torch.where((gain < 0)[:, None], new, state.scales)
    return QuantState(state.codes, scales, state.zeros, state.bits, g, {"method": "refit"})


# --------------------------------------------------------------------------------------------- packing
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack b-bit codes (any shape, values < 2^b) into int32 bit planes: 32 codes -> b words. 1-D int32."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** bits):
        raise ValueError(f"pack_codes: codes must lie in [0, {2 ** bits - 1}] for bits={bits}")
    pad = (-flat.numel()) % 32
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    chunks = flat.reshape(-1, 1, 32)                                  # (C, 1, 32)
    k = torch.arange(bits, device=flat.device).reshape(1, bits, 1)
    j = torch.arange(32, device=flat.device).reshape(1, 1, 32)
    words = (((chunks >> k) & 1) << j).sum(-1)                        # (C, b) in [0, 2^32)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)     # two's complement into int32
    return words.to(torch.int32).reshape(-1)


def unpack_codes(words: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of pack_codes: int32 words -> uint8 codes of the given shape."""
    _check_bits(bits)
    shape = tuple(shape)
    numel = math.prod(shape)
    nchunks = -(-numel // 32)
    if words.dtype != torch.int32 or words.numel() != nchunks * bits:
        raise ValueError(f"unpack_codes: expected {nchunks * bits} int32 words for shape {shape} at {bits} bits, "
                         f"got {words.numel()} {words.dtype}")
    w = words.reshape(-1, bits, 1)                                    # (C, b, 1)
    j = torch.arange(32, device=words.device, dtype=torch.int32).reshape(1, 1, 32)
    k = torch.arange(bits, device=words.device, dtype=torch.int32).reshape(1, bits, 1)
    planes = (w >> j) & 1                                             # (C, b, 32)
    codes = (planes << k).sum(1, dtype=torch.int32)                   # (C, 32)
    return codes.reshape(-1)[:numel].to(torch.uint8).reshape(shape)


# --------------------------------------------------------------------------------------------- module
class QuantLinear(nn.Module):
    """A linear layer that stores only packed codes, fp16 scales, packed zeros (and the bias).

    forward(x) = x @ dequantize(x.dtype).T + b, dequantizing on the fly. With `chunk_rows` set, the weight is
    dequantized and multiplied `chunk_rows` output rows at a time (lower peak memory; equal up to GEMM rounding).
    `in_perm` (optional, (n,) int64): the packed columns are the input columns in_perm[0], in_perm[1], ..., so that
    act-order checkpoints whose groups are not consecutive columns (a GPTQ g_idx permutation) keep consecutive
    groups here; dequantize() returns the weight in the original column order.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 64, bias: bool = False,
                 device=None, chunk_rows: int | None = None):
        super().__init__()
        _check_bits(bits)
        if in_features % group_size != 0:
            raise ValueError(f"QuantLinear: in_features={in_features} not divisible by group_size={group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.chunk_rows = bits, group_size, chunk_rows
        G = in_features // group_size
        nw = lambda numel: -(-numel // 32) * bits                    # noqa: E731
        self.register_buffer("qweight", torch.zeros(nw(out_features * in_features), dtype=torch.int32, device=device))
        # fp16 scales kept as their int16 bit pattern, so that module.to(dtype) / .half() / .bfloat16() (which
        # convert floating buffers) can never re-round them; `scales` is the fp16 view.
        self.register_buffer("scale_bits", torch.ones(out_features, G, dtype=torch.float16, device=device)
                             .view(torch.int16))
        self.register_buffer("qzeros", torch.zeros(nw(out_features * G), dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.register_buffer("in_perm", None)

    @classmethod
    def from_state(cls, state: QuantState, bias: torch.Tensor | None = None) -> QuantLinear:
        m, n = state.shape
        mod = cls(n, m, state.bits, state.group_size, bias=bias is not None, device=state.codes.device)
        mod.qweight = pack_codes(state.codes, state.bits)
        mod.scale_bits = state.scales.to(torch.float16).clone().view(torch.int16)
        mod.qzeros = pack_codes(state.zeros, state.bits)
        if bias is not None:
            mod.bias = bias.detach().clone()
        return mod

    @property
    def scales(self) -> torch.Tensor:
        """(m, n//g) fp16 scales (a view of the stored bits)."""
        return self.scale_bits.view(torch.float16)

    def state(self) -> QuantState:
        """The stored codes, scales and zeros (columns in in_perm's order when it is set)."""
        m, n = self.out_features, self.in_features
        return QuantState(unpack_codes(self.qweight, self.bits, (m, n)), self.scales.clone(),
                          unpack_codes(self.qzeros, self.bits, (m, n // self.group_size)), self.bits, self.group_size)

    def dequantize(self, dtype=torch.float32, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """ŵ (m, n) — or output rows [r0, r1) only — from the packed storage, in the original column order."""
        w = self._dequantize_packed(dtype, rows)
        return w if self.in_perm is None else w[:, torch.argsort(self.in_perm)]

    def _dequantize_packed(self, dtype=torch.float32, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """ŵ in the stored column order (see in_perm)."""
        m, n, g, b = self.out_features, self.in_features, self.group_size, self.bits
        r0, r1 = rows if rows is not None else (0, m)
        if rows is not None and (n * r0) % 32 == 0 and (n * r1 % 32 == 0 or r1 == m):
            wq = self.qweight[n * r0 // 32 * b: -(-n * r1 // 32) * b]
            codes = unpack_codes(wq, b, (r1 - r0, n))
        else:
            codes = unpack_codes(self.qweight, b, (m, n))[r0:r1]
        zeros = unpack_codes(self.qzeros, b, (m, n // g))[r0:r1]
        return _dequant(codes, self.scales[r0:r1], zeros, g, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_perm is not None:
            x = x.index_select(-1, self.in_perm)                     # (..., n) in the stored column order
        if self.chunk_rows is None or self.chunk_rows >= self.out_features:
            y = x @ self._dequantize_packed(x.dtype).T
        else:
            y = torch.cat([x @ self._dequantize_packed(x.dtype, (r, min(r + self.chunk_rows, self.out_features))).T
                           for r in range(0, self.out_features, self.chunk_rows)], dim=-1)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def nbytes(self, include_bias: bool = True) -> int:
        """Bytes held: packed codes + fp16 scales + packed zeros (+ input permutation) (+ bias)."""
        held = (self.qweight, self.scale_bits, self.qzeros) + (() if self.in_perm is None else (self.in_perm,))
        total = sum(t.numel() * t.element_size() for t in held)
        if include_bias and self.bias is not None:
            total += self.bias.numel() * self.bias.element_size()
        return total

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


# --------------------------------------------------------------------------------------------- files
def save_quantized(path, layers: dict[str, QuantLinear], metadata: dict | None = None) -> None:
    """Write {name: QuantLinear} to a safetensors file; the settings of every layer go in the file's metadata."""
    from safetensors.torch import save_file
    tensors, settings = {}, {}
    for name, mod in layers.items():
        if not isinstance(mod, QuantLinear):
            raise ValueError(f"save_quantized: {name!r} is a {type(mod).__name__}; expected QuantLinear")
        tensors[f"{name}.qweight"] = mod.qweight.detach().cpu().contiguous()
        tensors[f"{name}.scales"] = mod.scales.detach().cpu().contiguous()
        tensors[f"{name}.qzeros"] = mod.qzeros.detach().cpu().contiguous()
        if mod.bias is not None:
            tensors[f"{name}.bias"] = mod.bias.detach().cpu().contiguous()
        if mod.in_perm is not None:
            tensors[f"{name}.in_perm"] = mod.in_perm.detach().cpu().contiguous()
        settings[name] = {"in_features": mod.in_features, "out_features": mod.out_features, "bits": mod.bits,
                          "group_size": mod.group_size, "bias": mod.bias is not None}
        if mod.in_perm is not None:
            settings[name]["in_perm"] = True
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "packing": "bitplane-int32-32",
            "layers": json.dumps(settings), "user": json.dumps(metadata or {})}
    save_file(tensors, str(path), metadata=meta)


def load_quantized(path, device="cpu") -> tuple[dict[str, QuantLinear], dict]:
    """Read a file written by save_quantized -> ({name: QuantLinear}, metadata)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load_quantized: {path} does not exist")
    from checks import safetensors_header
    safetensors_header(path)            # ValueError naming the file if it is not a whole safetensors file
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"load_quantized: {path} has format {meta.get('format')!r}; expected {FORMAT!r}")
        layers = {}
        for name, cfg in json.loads(meta["layers"]).items():
            mod = QuantLinear(cfg["in_features"], cfg["out_features"], cfg["bits"], cfg["group_size"],
                              bias=cfg["bias"], device=device)
            mod.qweight = f.get_tensor(f"{name}.qweight")
            mod.scale_bits = f.get_tensor(f"{name}.scales").to(torch.float16).view(torch.int16)
            mod.qzeros = f.get_tensor(f"{name}.qzeros")
            if cfg["bias"]:
                mod.bias = f.get_tensor(f"{name}.bias")
            if cfg.get("in_perm"):
                mod.in_perm = f.get_tensor(f"{name}.in_perm")
            layers[name] = mod
    return layers, json.loads(meta.get("user", "{}"))
