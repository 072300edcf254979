"""QWHA's initialization (docs/method.md, eqs. 4–9 and 33–35), in the pipeline's order.

First the method as the paper states it: short, literal, one row at a time, each function with its equation
number (`*_reference`, and the two literal helpers layer_error and channel_scores). Then the production API, which
computes the same on whole layers and calls the fast paths of qwha_fast.py (batched padded solves, banded top-k,
the greedy selection and the exchange search); tests/test_qwha.py holds each equal to its reference.

In PyTorch's orientation (y = x Wᵀ, W ∈ R^{m×n}, E = W − Q, H = XᵀX/N = RᵀR, T = wht.hadamard_matrix(n)):
  adapter       ΔW = s · F T, F (m×n) sparse with B = r(m+n) non-zeros          (eq. 4)   adapter.WHALinear
  objective     min_F ‖(E − F T) Rᵀ‖_F                                            (eqs. 5, 6) layer_error
  domain        C = E Tᵀ, G = T H Tᵀ, P = C G                          layer_problem_reference | layer_problem
  AdaAlloc      k_i = ⌊B σ_i^{1/t} / Σ_j σ_j^{1/t}⌋, remainder one each to the smallest k_i      (eq. 7)
                σ_i = ‖e_i Rᵀ‖ (channel_scores)                                adaalloc_reference | adaalloc
  selection     per row, the k_i largest C_ij²·G_jj (or |C_ij|)       select_topk_reference | select_topk
  refinement    per row, f·G[Ω,Ω] = P[i,Ω]                       (eqs. 9, 35) refine_reference | refine
  one layer     AdaAlloc → selection → refinement              init_layer_reference | init_layer(_full)
  beyond        greedy selection, exchange search (qwha_fast.select_greedy, qwha_fast.swap_search)
  all layers    init_qwha(model, hessians, weights, InitSettings(...))
The support of F is a (2, B) LongTensor [row, col] in CSR order (rows ascending, columns ascending within a
row); values are in the same order. The module WHALinear and the adapter files live in adapter.py (re-exported).

Scale: WHALinear computes ΔW = s·F T from its stored values; init_qwha stores f / s, f the solution of the
unscaled problem, so the initial ΔW is the same for every s. With the orthonormal T (T Tᵀ = I) the default is
s = 1; the authors' s = 4000 lives in their ±1 transform with extra 1/(n√m) factors and is not comparable. With
AdamW a value moves by ≈ lr per step whatever its size, so ΔW moves by ≈ s·lr/√n per entry: s and lr trade one
for one (choose lr for s = 1).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

import calib
import qwha_fast
import wht
from adapter import (
    FrozenBaseAdapter,
    SparseAdapter,
    WHALinear,
    _base_weight,
    adapters,
    load_adapters,
    save_adapters,
)
from model import set_module
from qwha_fast import CHUNK_BYTES, FP32_MIN_K, GREEDY_STEPS, greedy_targets, select_greedy, swap_search

__all__ = [
    # the method as the paper states it
    "layer_error", "channel_scores", "layer_problem_reference", "adaalloc_reference", "select_topk_reference",
    "refine_reference", "init_layer_reference",
    # production
    "InitSettings", "PLAIN_INIT", "spectrum", "hadamard_hessian", "layer_problem", "LayerProblem", "adaalloc",
    "select_topk", "select_support", "refine", "init_layer", "init_layer_full", "LayerInit", "init_qwha",
    "wrap_layers", "format_report",
    # from qwha_fast.py (beyond the paper, and the constants of the fast paths)
    "select_greedy", "greedy_targets", "swap_search", "GREEDY_STEPS", "CHUNK_BYTES", "FP32_MIN_K",
    # from adapter.py
    "FrozenBaseAdapter", "SparseAdapter", "WHALinear", "adapters", "save_adapters", "load_adapters",
]


# =================================================================================== the method, as the paper states it


def layer_error(E: torch.Tensor, H: torch.Tensor, dW: torch.Tensor | None = None) -> torch.Tensor:
    """The objective (eqs. 5, 6): ‖(E − ΔW) Rᵀ‖_F = sqrt(tr((E − ΔW) H (E − ΔW)ᵀ)), without forming R (float64)."""
    D = E.to(torch.float64) if dW is None else E.to(torch.float64) - dW.to(torch.float64)
    return ((D @ H.to(torch.float64)) * D).sum().clamp_min(0).sqrt()


def layer_problem_reference(E: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The problem in the Hadamard domain (eq. 6, App. C.1) with the explicit T: C = E Tᵀ (F = C gives F T = E),
    G = T H Tᵀ (a row's error is (c_i − f_i) G (c_i − f_i)ᵀ) and P = C G = E H Tᵀ. float64."""
    T = wht.hadamard_matrix(E.shape[1], dtype=torch.float64)
    C, G = E.double() @ T.T, T @ H.double() @ T.T
    return C, G, C @ G


def channel_scores(E: torch.Tensor, H: torch.Tensor | None = None, kind: str = "output") -> torch.Tensor:
    """AdaAlloc's σ_i per output channel (eq. 7): 'output' ‖e_i Rᵀ‖ = sqrt(e_i H e_iᵀ), the channel's output
    error; 'weight' ‖e_i‖₂ (the authors' code)."""
    if kind == "weight":
        return E.norm(dim=1)
    if kind == "output":
        if H is None:
            raise ValueError("channel_scores(kind='output') needs H")
        return ((E @ H) * E).sum(1).clamp_min(0).sqrt()
    raise ValueError(f"channel_scores: kind must be 'output' or 'weight', got {kind!r}")


def adaalloc_reference(scores: torch.Tensor, budget: int, temperature: float = 1.0) -> torch.Tensor:
    """Eq. 7 literally: k_i = ⌊B σ_i^{1/t} / Σ_j σ_j^{1/t}⌋, the remainder one each to the channels with the smallest
    k_i (ties: the higher score first). No bounds: `adaalloc` adds them and equals this where none binds."""
    w = scores.double() ** (1 / temperature)
    k = torch.floor(budget * w / w.sum()).long()
    order = sorted(range(len(k)), key=lambda i: (int(k[i]), -float(scores[i]), i))
    for i in order[: budget - int(k.sum())]:
        k[i] += 1
    return k


def select_topk_reference(C: torch.Tensor, G: torch.Tensor, k: torch.Tensor, rule: str = "output") -> torch.Tensor:
    """Per row i, the k_i largest scores: C_ij²·G_jj (the coefficient's share of the output error, the authors'
    code) or |C_ij| (rule='magnitude', the paper). Support (2, Σk), CSR order."""
    S = C.square() * G.diagonal() if rule == "output" else C.abs()
    rows, cols = [], []
    for i in range(C.shape[0]):
        top = torch.argsort(S[i], descending=True)[: int(k[i])].sort().values
        rows += [i] * len(top)
        cols += top.tolist()
    return torch.tensor([rows, cols], dtype=torch.long).view(2, -1)


def refine_reference(P: torch.Tensor, G: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Eqs. 9, 35: per row i, the least-squares values on its support Ω_i, from the normal equations
    f·G[Ω,Ω] = P[i,Ω]; one solve per row, as the authors' code. Values (B,) float64 in the support's CSR order."""
    rows, cols = support
    k = torch.bincount(rows, minlength=P.shape[0]).tolist()
    out = torch.empty(rows.numel(), dtype=torch.float64, device=P.device)
    start = 0
    for i in range(P.shape[0]):
        if k[i]:
            c = cols[start:start + k[i]]
            out[start:start + k[i]] = torch.linalg.solve(G[c][:, c], P[i, c])
            start += k[i]
    return out


def init_layer_reference(E: torch.Tensor, H: torch.Tensor, budget: int, damp: float = 1e-4,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain QWHA init of one layer (eqs. 5–9): AdaAlloc, per-row top-k by C_ij²·G_jj, refinement, on H damped
    by λ·mean(diag H) as the authors' code does (damp = 0: the paper's H). (indices (2, B), values (B,) float64)."""
    E, H = E.double(), calib.damp(H.double(), damp)
    C, G, P = layer_problem_reference(E, H)
    k = adaalloc_reference(channel_scores(E, H), budget, temperature)
    support = select_topk_reference(C, G, k)
    return support, refine_reference(P, G, support)


# =========================================================================================================== production

SELECT_MODES = ("adaalloc", "magnitude", "random", "random_rows", "none")
RULES = ("output", "magnitude", "greedy")    # per-row selection rules of select='adaalloc'
SWAP_ROUNDS_DEFAULT = 2   # init_qwha's exchange-search rounds (see InitSettings)
RULE_DEFAULT = "output"   # init_qwha's per-row selection (see InitSettings)
_MODEL_ONLY = ("budget_rank", "scale", "seed", "workers")   # settings of init_qwha only (the layer has its budget)


@dataclass(frozen=True)
class InitSettings:
    """The settings of QWHA's init (init_qwha; init_layer_full takes those of one layer). The defaults are
    train.py's: AdaAlloc, per-row top-k, refinement, then SWAP_ROUNDS_DEFAULT rounds of exchange search, which
    lower both the layer errors and the held-out perplexity after init for a multiple of the plain init's time;
    the greedy rule lowers the layer errors further but not that perplexity (docs/performance.md)."""
    budget_rank: int = 64                  # B = r·(m + n) non-zeros per layer (capped at m·n), a rank-r LoRA's count
    temperature: float = 1.0               # AdaAlloc's t (eq. 7)
    score: str = "output"                  # AdaAlloc's σ_i: output ‖e_i Rᵀ‖ | weight ‖e_i‖₂ (the authors' code)
    min_per_row: int = 2                   # AdaAlloc's least k_i (the full-rank condition, App. B.2)
    select: str = "adaalloc"               # support: one of SELECT_MODES (adaalloc is QWHA's)
    rule: str = RULE_DEFAULT               # per row: output C²·G_jj | magnitude |C| | greedy (select_greedy)
    greedy_steps: int = GREEDY_STEPS       # steps of rule='greedy'
    refine: bool = True                    # least-squares values on the support (eqs. 9, 35) instead of C there
    swap_rounds: int = SWAP_ROUNDS_DEFAULT  # exchange-search rounds after refinement (0: the paper's plain init)
    damp: float = 1e-4                     # λ of the solves' H + λ·mean(diag H)·I (errors use the undamped H)
    scale: float = 1.0                     # s in ΔW = s·F T; the values are stored divided by s
    seed: int = 0                          # the random selections' generator, when init_qwha is given none
    workers: int = 1                       # layers initialized at once in threads (wrap_layers)
    chunk_bytes: int = CHUNK_BYTES         # float64 blocks per batched solve (qwha_fast.solve_support)
    fp32_min_k: int | None = FP32_MIN_K    # blocks of at least this size factored in float32 (None: none)


PLAIN_INIT = InitSettings(swap_rounds=0)   # init_layer_full's default: the paper's plain init, no exchange search
_SETTINGS = tuple(f.name for f in dataclasses.fields(InitSettings))


def _settings(settings: InitSettings | None, kw: dict, default: InitSettings, who: str,
              layer: bool = False) -> InitSettings:
    """`settings` (or `default`) with the fields in kw replaced; TypeError naming any keyword that is not a field
    (or, for one layer, a field of init_qwha only)."""
    unknown = sorted(k for k in kw if k not in _SETTINGS)
    if unknown:
        raise TypeError(f"{who}: unknown settings {unknown}; InitSettings has {list(_SETTINGS)}")
    if layer and (model_only := sorted(k for k in kw if k in _MODEL_ONLY)):
        raise TypeError(f"{who}: {model_only} are init_qwha's settings; one layer takes its budget as an argument")
    return dataclasses.replace(default if settings is None else settings, **kw)


# ---------------------------------------------------------------------------------------------- Hadamard domain


def spectrum(E: torch.Tensor, transform=None) -> torch.Tensor:
    """C = E Tᵀ (m×n) by the fast transform x ↦ x Tᵀ (default wht.wht): F = C gives F T = E exactly."""
    return (transform or wht.wht)(E)


def hadamard_hessian(H: torch.Tensor, transform=None) -> torch.Tensor:
    """G = T H Tᵀ (n×n) with two transforms (rows, then columns), symmetrized; no n×n GEMM with T. transform:
    x ↦ x Tᵀ for an orthonormal T (default wht.wht; the baselines pass their kernels')."""
    transform = transform or wht.wht
    A = transform(H)                   # (n, n) H Tᵀ
    G = transform(A.T.contiguous())    # Aᵀ Tᵀ = T Hᵀ Tᵀ = T H Tᵀ  (H symmetric)
    return G.T.contiguous().add_(G).mul_(0.5)   # (G + Gᵀ)/2, the transpose by a tiled copy


@dataclass
class LayerProblem:
    """One layer's init problem in the Hadamard domain (or a baseline kernel's; float64), set up by
    `layer_problem`. The values solve the damped problem (G, P); errors are reported with the undamped one
    (G_raw, P_raw)."""
    E: torch.Tensor                # (m, n) W − Q
    C: torch.Tensor                # (m, n) E Tᵀ
    P_raw: torch.Tensor            # (m, n) E H Tᵀ = C G_raw
    G_raw: torch.Tensor            # (n, n) T H Tᵀ
    G: torch.Tensor                # (n, n) T (H + λμ I) Tᵀ
    P: torch.Tensor                # (m, n) C G
    e_out: torch.Tensor            # (m,) ‖e_i Rᵀ‖² (undamped)
    lam_mu: float                  # λ·mean(diag H)

    @property
    def e0sq(self) -> float:
        """‖E Rᵀ‖², the bare quantization error squared."""
        return float(self.e_out.sum())

    def scores(self, kind: str = "output") -> torch.Tensor:
        """AdaAlloc's σ_i (m,) with the damped H: 'output' sqrt(e_i H e_iᵀ + λμ‖e_i‖²) from e_out (no other product),
        'weight' ‖e_i‖₂; channel_scores(E, H + λμI, kind) up to round-off."""
        if kind == "output":
            return (self.e_out + self.lam_mu * self.E.square().sum(1)).sqrt()
        if kind == "weight":
            return self.E.norm(dim=1)
        raise ValueError(f"init_layer: score must be 'output' or 'weight', got {kind!r}")

    def quad(self, support: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Σ_i f_i G[Ω_i,Ω_i] f_iᵀ (damped G) by one sparse F·G product (B·n), where no blocks were gathered."""
        rows, cols = support
        Fs = torch.sparse_coo_tensor(support, f, self.C.shape, is_coalesced=True, check_invariants=False)
        return (torch.sparse.mm(Fs, self.G)[rows, cols] * f).sum()

    def error(self, support: torch.Tensor, f: torch.Tensor, quad: torch.Tensor) -> float:
        """‖(E − F T)Rᵀ‖ = sqrt(‖ERᵀ‖² − 2 Σ_Ω f·P_raw + Σ_i f_i G_raw[Ω,Ω] f_iᵀ) from quad = Σ_i f_i G[Ω,Ω] f_iᵀ
        (G_raw = G − λμ I on the support). Where that sum cancels to under 1e-6 of ‖ERᵀ‖² (a near-exact fit, e.g.
        a full budget), its round-off, about 1e-7 of ‖ERᵀ‖² with float32 blocks, would dominate the result: then the
        error is formed directly, Σ_i d_i G_raw d_iᵀ with D = C − F (one m·n² product, as in layer_problem)."""
        p_raw = self.P_raw[support[0], support[1]]
        sq = self.e0sq - 2 * float(f @ p_raw) + float(quad) - self.lam_mu * float(f @ f)
        if sq < 1e-6 * self.e0sq:
            D = self.C.clone()
            D[support[0], support[1]] -= f.to(D.dtype)
            sq = float(((D @ self.G_raw) * D).sum())
        return math.sqrt(max(sq, 0.0))


def layer_problem(E: torch.Tensor, H: torch.Tensor, damp: float = 1e-4, transform=None) -> LayerProblem:
    """C, G, P of one layer from E = W − Q (m×n) and H = XᵀX/N (n×n, undamped; damped by λ·mean(diag H)): the one
    setup of QWHA's init and of the baselines' sparse adapters, whose kernels come in as `transform` (x ↦ x Tᵀ,
    T orthonormal; default the WHT). layer_problem_reference(E, H) up to round-off."""
    m, n = E.shape
    if H.shape != (n, n):
        raise ValueError(f"layer_problem: H has shape {tuple(H.shape)}, expected ({n}, {n}) for E of shape ({m}, {n})")
    E64, H64 = E.to(torch.float64), H.to(torch.float64)    # H's asymmetry (round-off) goes: G is symmetrized
    mu = H64.diagonal().mean()
    lam_mu = float(damp * (mu if mu > 0 else 1.0))
    C = spectrum(E64, transform)                                       # (m, n) E Tᵀ
    G_raw = hadamard_hessian(H64, transform)                           # (n, n) T H Tᵀ
    P_raw = C @ G_raw                                                  # (m, n) E H Tᵀ, the one m·n² product
    e_out = (P_raw * C).sum(1).clamp_min(0)                            # (m,) ‖e_i Rᵀ‖² = c_i G c_iᵀ
    G = G_raw.clone()
    G.diagonal().add_(lam_mu)                                          # T (H + λμI) Tᵀ
    return LayerProblem(E64, C, P_raw, G_raw, G, P_raw + lam_mu * C, e_out, lam_mu)


# ---------------------------------------------------------------------------------------------- AdaAlloc


def adaalloc(scores: torch.Tensor, budget: int, temperature: float = 1.0, min_per_row: int = 2,
             max_per_row: int | None = None) -> torch.Tensor:
    """Per-channel parameter counts k (m,) long, eq. 7 with bounds: k_i ∝ σ_i^{1/t}, Σk = budget, min ≤ k_i ≤ max.

    k_i = ⌊B σ_i^{1/t} / Σ σ_j^{1/t}⌋, the remainder one each to the channels with the smallest k_i (ties:
    higher score first). Where a bound binds, the channel is fixed at the bound and the rest of the budget is
    shared in proportion among the others (water-filling), so the sum is exact and the bounds hold. k is
    non-decreasing in the score. Equal to adaalloc_reference where no bound binds. Raises ValueError when
    budget < m·min or budget > m·max.
    """
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"adaalloc: scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    if not temperature > 0:
        raise ValueError(f"adaalloc: temperature must be > 0, got {temperature}")
    m = scores.numel()
    lo = int(min_per_row)
    hi = int(max_per_row) if max_per_row is not None else int(budget)
    if lo < 0 or hi < lo:
        raise ValueError(f"adaalloc: need 0 <= min_per_row <= max_per_row, got {lo}, {hi}")
    budget = int(budget)
    if budget < m * lo or budget > m * hi:
        raise ValueError(f"adaalloc: budget {budget} outside [m·min, m·max] = [{m * lo}, {m * hi}] for m = {m}")
    s = scores.detach().to(torch.float64).cpu()
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("adaalloc: scores must be finite and >= 0")
    # σ^{1/t} in the log domain (t → 0 would overflow); zero scores get weight 0 (the minimum)
    pos = s > 0
    w = torch.zeros_like(s)
    if pos.any():
        logw = s[pos].log() / temperature
        w[pos] = (logw - logw.max()).exp()
    else:
        w = torch.ones_like(s)
    # water-filling: fix channels whose proportional share violates a bound, re-share the rest
    k_real = torch.empty_like(s)
    free = torch.ones(m, dtype=torch.bool)
    fixed_sum = 0.0
    for _ in range(2 * m + 2):
        wf = w[free]
        share = ((budget - fixed_sum) * wf / wf.sum() if wf.sum() > 0
                 else torch.full_like(wf, (budget - fixed_sum) / wf.numel()))
        k_real[free] = share
        below, above = (k_real < lo) & free, (k_real > hi) & free
        if not below.any() and not above.any():
            break
        # fix the violators of the larger total violation first (standard clamp-and-reshare)
        viol_lo = (lo - k_real[below]).sum() if below.any() else 0.0
        viol_hi = (k_real[above] - hi).sum() if above.any() else 0.0
        if viol_lo >= viol_hi:
            k_real[below] = lo
            free &= ~below
        else:
            k_real[above] = hi
            free &= ~above
        fixed_sum = float(k_real[~free].sum())
        if not free.any():
            break
    k = k_real.floor().clamp(lo, hi).to(torch.long)

    def order():  # channels by (k ascending, score descending, index): ties go to the higher score
        o = torch.argsort(-s, stable=True)
        return o[torch.argsort(k[o], stable=True)]

    rem = budget - int(k.sum())
    while rem > 0:                       # one each to the smallest allocations (below the cap)
        o = order()
        o = o[k[o] < hi][:rem]
        k[o] += 1
        rem -= o.numel()
    while rem < 0:                       # float round-off made Σ⌊·⌋ exceed the budget: take from the largest
        o = order().flip(0)
        o = o[k[o] > lo][:-rem]
        k[o] -= 1
        rem += o.numel()
    return k.to(scores.device)


# ---------------------------------------------------------------------------------------------- selection


def _scores_matrix(C: torch.Tensor, G: torch.Tensor | None, rule: str) -> torch.Tensor:
    """The selection score of every coefficient (m, n): C_ij²·G_jj ('output') or |C_ij| ('magnitude')."""
    if rule == "output":
        if G is None:
            raise ValueError("selection rule 'output' needs G")
        return C.square() * G.diagonal()[None, :]        # C_ij² G_jj: contribution to the output error
    if rule == "magnitude":
        return C.abs()
    raise ValueError(f"selection rule must be one of {RULES} ('greedy' with select='adaalloc'), got {rule!r}")


def select_topk(C: torch.Tensor, G: torch.Tensor | None, k: torch.Tensor, rule: str = "output",
                chunk_rows: int = 4096) -> torch.Tensor:
    """Support (2, Σk) of the k_i largest coefficients of each row of C by C_ij²·G_jj ('output') or |C_ij|:
    select_topk_reference on chunks of rows, each by the banded qwha_fast.topk_rows."""
    m, n = C.shape
    k = qwha_fast.check_k(k.to(C.device), m, n, "select_topk")
    picks = [qwha_fast.topk_rows(_scores_matrix(C[r0:r0 + chunk_rows], G, rule), k[r0:r0 + chunk_rows], r0)
             for r0 in range(0, m, chunk_rows)]
    return qwha_fast.csr_support(torch.cat([p[0] for p in picks]), torch.cat([p[1] for p in picks]), n)


def select_support(C: torch.Tensor, G: torch.Tensor, budget: int, *, select: str = "adaalloc",
                   scores: torch.Tensor | None = None, temperature: float = 1.0, rule: str = "output",
                   min_per_row: int = 2, generator: torch.Generator | None = None, P: torch.Tensor | None = None,
                   greedy_steps: int = GREEDY_STEPS) -> torch.Tensor:
    """Support (2, B) of F by one of SELECT_MODES.

    adaalloc: k from `adaalloc(scores, ...)`, then per row the top-k by `rule` ('output' C_ij²·G_jj, 'magnitude'
    |C_ij|) or rule='greedy': `qwha_fast.select_greedy` with greedy_steps steps on P (default C G). magnitude:
    top-B over the whole layer by `rule`. random: B positions uniform over the layer (seeded). random_rows:
    adaalloc's k per row, columns uniform. none: empty support.
    """
    m, n = C.shape
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {SELECT_MODES}, got {select!r}")
    if select == "none":
        return torch.zeros(2, 0, dtype=torch.long, device=C.device)
    if not 0 <= budget <= m * n:
        raise ValueError(f"budget {budget} outside [0, m·n = {m * n}]")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "greedy" and select == "magnitude":
        raise ValueError("rule 'greedy' is per row: use it with select='adaalloc', not 'magnitude'")
    if select in ("adaalloc", "random_rows"):
        if scores is None:
            raise ValueError(f"select={select!r} needs channel scores")
        k = adaalloc(scores, budget, temperature, min_per_row, n).to(C.device)
        if select == "adaalloc" and rule == "greedy":
            return qwha_fast.select_greedy(C @ G if P is None else P, G, k, greedy_steps)
        if select == "adaalloc":
            return select_topk(C, G, k, rule)
        perm = torch.rand(m, n, generator=generator).argsort(dim=1).to(C.device)    # (m, n) random order
        keep = torch.arange(n, device=C.device)[None, :] < k[:, None]
        rows = torch.arange(m, device=C.device)[:, None].expand(m, n)
        return qwha_fast.csr_support(rows[keep], perm[keep], n)
    if select == "magnitude":
        flat = _scores_matrix(C, G, rule).reshape(-1).topk(budget).indices
    else:  # random
        flat = torch.randperm(m * n, generator=generator)[:budget].to(C.device)
    return qwha_fast.csr_support(flat // n, flat % n, n)


# ---------------------------------------------------------------------------------------------- refinement


def refine(P: torch.Tensor, G: torch.Tensor, support: torch.Tensor, *, chunk_bytes: int = CHUNK_BYTES,
           fp32_min_k: int | None = None, workers: int = 1) -> torch.Tensor:
    """Least-squares values on a fixed support, eqs. 9, 35: for each row, f·G[Ω,Ω] = P[i,Ω] (P = C G): the values
    of refine_reference, all rows at once by qwha_fast.solve_support (batched Cholesky of padded blocks, ≤
    chunk_bytes of float64 blocks per batch). fp32_min_k: blocks of at least this size are factored in float32
    (default None: none; init_layer_full uses FP32_MIN_K); their values differ from float64's by about
    eps32·cond(G[Ω,Ω]), the error only at second order. workers > 1: chunks solved that many at a time in
    threads, each with torch.get_num_threads() // workers intra-op threads meanwhile (the values are those of
    workers = 1 at the same per-worker thread count; see wrap_layers). Returns values (B,) float64, CSR order."""
    with qwha_fast.threads_per_worker(workers, "refine"):
        return qwha_fast.solve_support(P, G, support, chunk_bytes=chunk_bytes, fp32_min_k=fp32_min_k, quad=False,
                                       workers=workers)[0]


# ---------------------------------------------------------------------------------------------- per layer


@dataclass
class LayerInit:
    """One layer's initialization: support, values (unscaled: ΔW = dense(F) T) and its error report."""
    indices: torch.Tensor          # (2, B) long [row, col], CSR order
    values: torch.Tensor           # (B,) float32
    k: torch.Tensor                # (m,) long, parameters per output channel
    err_before: float              # ‖E Rᵀ‖ (bare quantization error)
    err_select: float              # ‖(E − F_sel T) Rᵀ‖ with F_sel = C on the support
    err_refined: float             # ‖(E − F T) Rᵀ‖ with the refined values (= err_select when refine=False)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def init_layer(E: torch.Tensor, H: torch.Tensor, budget: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantization-aware init of one layer (eqs. 5–9): (indices (2, B) long [row, col], values (B,) fp32).

    Values are unscaled: ΔW = dense(F) @ T with T = wht.hadamard_matrix(n). Keywords as `init_layer_full`; by
    default the values of init_layer_reference (up to round-off and the float32 blocks).
    """
    out = init_layer_full(E, H, budget, **kw)
    return out.indices, out.values


def init_layer_full(E: torch.Tensor, H: torch.Tensor, budget: int, settings: InitSettings | None = None, *,
                    generator: torch.Generator | None = None, **kw) -> LayerInit:
    """init_layer with its report. E = W − Q (m×n), H = XᵀX/N (n×n, undamped; damped by λ·mean(diag H) for the
    solves, errors reported with the undamped H). settings: InitSettings (default PLAIN_INIT: AdaAlloc, top-k,
    refinement, no exchange search), its fields replaced by keywords (temperature=..., rule=..., ...).
    generator: the random selections'. err_select stays that of the selected support with F = C; with
    swap_rounds, info['err_refined_noswap'] is the refined error before the exchanges."""
    s = _settings(settings, kw, PLAIN_INIT, "init_layer_full", layer=True)
    t0 = time.perf_counter()
    if s.swap_rounds and not s.refine:
        raise ValueError("init_layer: swap_rounds > 0 needs refine=True (exchanges compare refined supports)")
    pb = layer_problem(E, H, s.damp)
    support = select_support(pb.C, pb.G, budget, select=s.select, scores=pb.scores(s.score), temperature=s.temperature,
                             rule=s.rule, min_per_row=s.min_per_row, generator=generator, P=pb.P,
                             greedy_steps=s.greedy_steps)
    f_sel = pb.C[support[0], support[1]]
    if not (s.refine and support.shape[1]):
        err = pb.error(support, f_sel, pb.quad(support, f_sel))
        return _layer_init(support, f_sel, pb, err, err, t0, {})
    solve = dict(chunk_bytes=s.chunk_bytes, fp32_min_k=s.fp32_min_k)
    f, qf, qs = qwha_fast.solve_support(pb.P, pb.G, support, extra=f_sel, **solve)     # refine, with the report
    err_select, err_refined = pb.error(support, f_sel, qs), pb.error(support, f, qf)
    info: dict = {}
    if s.swap_rounds:                                                  # exchange search, then refine
        info["err_refined_noswap"] = err_refined
        support, f, sw = qwha_fast.swap_search(pb.P, pb.G, support, f, s.swap_rounds, P_raw=pb.P_raw,
                                               row_err2=pb.e_out, lam_mu=pb.lam_mu, chunk_bytes=s.chunk_bytes)
        info.update(swap_rounds_done=sw["rounds"], swap_rows_improved=sw["rows_improved"])
        f, qf, _ = qwha_fast.solve_support(pb.P, pb.G, support, **solve)
        err_refined = pb.error(support, f, qf)
    return _layer_init(support, f, pb, err_select, err_refined, t0, info)


def _layer_init(support, f, pb, err_select, err_refined, t0, info) -> LayerInit:
    k = torch.bincount(support[0], minlength=pb.C.shape[0])
    return LayerInit(support, f.to(torch.float32), k, math.sqrt(pb.e0sq), err_select, err_refined,
                     time.perf_counter() - t0, info)


# ---------------------------------------------------------------------------------------------- whole model


def init_qwha(model: nn.Module, hessians: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
              settings: InitSettings | None = None, *, names: list[str] | None = None,
              device: torch.device | str | None = None, compute_rank: bool = False, quiet: bool = False,
              generator: torch.Generator | None = None, **kw) -> list[dict]:
    """Wrap every target linear of `model` in a WHALinear initialized by init_layer_full (eqs. 5–9).

    hessians: {name: H = XᵀX/N} (undamped). weights: {name: W}, the ORIGINAL full-precision weights (the
    caller keeps them from before quantization; any Mapping, e.g. a lazy safetensors reader). The module at
    `name` holds the quantized base Q (QuantLinear, or nn.Linear); E = W − Q. settings: InitSettings (default
    InitSettings(), train.py's), its fields replaced by keywords (budget_rank=..., swap_rounds=...); budget per
    layer B = budget_rank·(m + n), capped at m·n; values stored as f / scale. Returns one report dict per layer
    and prints them as a table to stderr unless quiet. names: the layers (default: every Hessian's). device: where
    the math runs (default: H's device). compute_rank: report rank(F). generator: the random selections' (default
    one seeded with settings.seed); pass the same one to calls over successive blocks to draw as one call over all
    of them. workers > 1 (`wrap_layers`, which says what it changes) needs a selection that draws nothing.
    """
    s = _settings(settings, kw, InitSettings(), "init_qwha")
    if s.workers > 1 and s.select == "random":
        raise ValueError("init_qwha: workers > 1 needs a deterministic selection; select='random' draws from one "
                         "generator in layer order (use workers=1)")
    gen = generator if generator is not None else torch.Generator().manual_seed(s.seed)

    def init_one(base: nn.Module, W: torch.Tensor, H: torch.Tensor) -> tuple[nn.Module, dict]:
        Q = _base_weight(base).detach()
        if W.shape != Q.shape:
            raise ValueError(f"original weight {tuple(W.shape)} vs base {tuple(Q.shape)}")
        dev = torch.device(device) if device is not None else H.device
        m, n = Q.shape
        E = W.to(dev, torch.float64) - Q.to(dev, torch.float64)
        budget = min(s.budget_rank * (m + n), m * n)
        li = init_layer_full(E, H.to(dev), budget, s, generator=gen)
        wrapped = WHALinear(base, li.indices, li.values / s.scale, scale=s.scale)
        row = {"shape": [m, n], "budget": int(li.values.numel()),
               "err_before": li.err_before, "err_select": li.err_select, "err_refined": li.err_refined,
               "rel_select": li.err_select / max(li.err_before, 1e-30),
               "rel_refined": li.err_refined / max(li.err_before, 1e-30),
               "k_min": int(li.k.min()), "k_max": int(li.k.max()), "seconds": li.seconds}
        if s.swap_rounds:
            row["err_noswap"] = li.info.get("err_refined_noswap", li.err_refined)
        if compute_rank:
            row["rank_F"] = int(torch.linalg.matrix_rank(wrapped.dense_F().float()))
        return wrapped, row

    return wrap_layers(model, hessians, weights, init_one, names=names, adapter_types=(WHALinear,),
                       who="init_qwha", quiet=quiet, workers=s.workers)


def wrap_layers(model: nn.Module, hessians: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                init_one, *, names: list[str] | None = None, adapter_types: tuple = (), who: str = "init",
                label: str = "", quiet: bool = False, workers: int = 1) -> list[dict]:
    """The per-layer loop of init_qwha and baselines.init_adapters: for each target linear (default: every
    Hessian's name), check that its Hessian and original weight exist, take its base (the module itself, or the
    base of an adapter of `adapter_types` already there), call `init_one(base, W, H) -> (module, row)`, put the
    module in its place; progress on one stderr line and the report table at the end unless quiet. Returns the
    rows, each with "layer" first. Errors of init_one come back as ValueError naming `who` and the layer.

    workers > 1: that many layers at once in threads (torch releases the GIL in its kernels), each with
    torch.get_num_threads() // workers intra-op threads for the duration (restored after). On a CPU this is what
    uses the cores: the init's many small batched LAPACK calls do not run faster with more intra-op threads
    (docs/performance.md).
    A layer's result is the one init_one gives on the calling thread with the same torch thread count: bitwise
    the same as workers = 1 where that count is 1, else within the round-off that changing torch.set_num_threads
    itself causes, amplified in the float32 blocks (bench/bench_init.py --threads 2 measures it).
    init_one must not share state between layers (e.g. a generator). Modules are put in place, and rows
    reported, in the order of `names`; inputs are read from `weights` / `hessians` in the calling thread, at most
    2·workers layers ahead."""
    names = list(names) if names is not None else list(hessians)
    for name in names:                                                # every input checked before any work
        if name not in hessians:
            raise ValueError(f"{who}: no Hessian for {name}")
        if name not in weights:
            raise ValueError(f"{who}: no original weight for {name} (pass the full-precision weights)")

    def inputs(name):                                                 # read in the calling thread
        mod = model.get_submodule(name)
        base = mod.base if adapter_types and isinstance(mod, adapter_types) else mod
        return name, base, weights[name], hessians[name]

    def run(name, base, W, H):
        try:
            return init_one(base, W, H)
        except ValueError as e:
            raise ValueError(f"{who}: {name}: {e}") from e

    report = []
    t_all = time.perf_counter()

    def done(i, name, new, row):
        set_module(model, name, new)
        report.append({"layer": name, **row})
        if not quiet:
            el = time.perf_counter() - t_all
            print(f"\rinit {label}{i + 1}/{len(names)} {name} rel {row['rel_refined']:.3f} "
                  f"({el:.1f}s, ETA {el / (i + 1) * (len(names) - i - 1):.0f}s)   ",
                  end="", file=sys.stderr, flush=True)

    if workers == 1:
        for i, name in enumerate(names):
            done(i, name, *run(*inputs(name)))
    else:
        with qwha_fast.threads_per_worker(workers, who), ThreadPoolExecutor(workers) as pool:
            pending = []                                              # futures in the order of names
            for i, name in enumerate(names):
                pending.append(pool.submit(run, *inputs(name)))
                while len(pending) > 2 * workers or (pending and i == len(names) - 1):
                    j = len(report)
                    done(j, names[j], *pending.pop(0).result())
    if not quiet:
        print("\n" + format_report(report), file=sys.stderr)
    return report


def format_report(report: list[dict]) -> str:
    """The per-layer init report as one fixed-width table (plus a mean row)."""
    has_rank = any("rank_F" in r for r in report)
    head = (f"{'layer':<40} {'m×n':>11} {'B':>8} {'err0':>9} {'sel':>9} {'refined':>9} {'rel':>6} {'kmin':>5} "
            f"{'kmax':>5}")
    head += f" {'rankF':>6}" if has_rank else ""
    head += f" {'s':>6}"
    lines = [head]
    for r in report:
        line = (f"{r['layer'][-40:]:<40} {r['shape'][0]:>5}×{r['shape'][1]:<5} {r['budget']:>8} "
                f"{r['err_before']:>9.4g} {r['err_select']:>9.4g} {r['err_refined']:>9.4g} "
                f"{r['rel_refined']:>6.3f} {r['k_min']:>5} {r['k_max']:>5}")
        line += f" {r.get('rank_F', 0):>6}" if has_rank else ""
        lines.append(line + f" {r['seconds']:>6.2f}")
    if report:
        def mean(key):
            return sum(r[key] for r in report) / len(report)

        lines.append(f"{'mean':<40} {'':>11} {'':>8} {mean('err_before'):>9.4g} {mean('err_select'):>9.4g} "
                     f"{mean('err_refined'):>9.4g} {mean('rel_refined'):>6.3f}")
    return "\n".join(lines)
