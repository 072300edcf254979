"""QWHA's initialization: AdaAlloc, support selection, batched refinement, exchange search, init_qwha.

The adapter module itself (WHALinear, its training path, adapter files) is in adapter.py; its names are
re-exported here.

docs/method.md, eqs. 4–9 and 33–35, in PyTorch's orientation (y = x Wᵀ, W ∈ R^{m×n}):
  adapter        ΔW = s · F T,  F (m×n) sparse with B = r(m+n) non-zeros, T = wht.hadamard_matrix(n)   (eq. 4)
  objective      min_F ‖(E − F T) Rᵀ‖_F,  E = W − Q, RᵀR = H = XᵀX/N                                 (eq. 5)
  dense solution C = E Tᵀ (spectrum), G = T H Tᵀ (H in the Hadamard domain)
  AdaAlloc       k_i = ⌊B σ_i^{1/t} / Σ_j σ_j^{1/t}⌋, remainder one each to the smallest k_i, 2 ≤ k_i ≤ n    (eq. 7)
  selection      per row, the k_i largest C_ij²·G_jj (output-error contribution; authors' code) or |C_ij|;
                 or, beyond the paper, a per-row greedy (orthogonal matching pursuit, select_greedy) with the same k_i
  refinement     per row, f·G[Ω,Ω] = P[i,Ω] with P = E H Tᵀ = C G                                      (eqs. 9, 35)

All math functions are pure (tensor in, tensor out). The support of F is a (2, B) LongTensor [row, col] in
CSR order (rows ascending, columns ascending within a row); values are in the same order.

Scale: WHALinear computes ΔW = s·F T from its stored values; init_qwha stores f / s, where f is the refined
solution of the unscaled problem, so the initial ΔW is the same for every s. Default s = 1.0 in our
orthonormal normalization (T Tᵀ = I).
The authors' s = 4000 lives in their ±1 transform with extra 1/(n√m) factors and is not comparable.
With AdamW the per-step change of a value is ≈ lr regardless of its size, so the per-step change of ΔW is
≈ s·lr/√n per entry: s and lr trade one for one (choose lr for s = 1).
"""
from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

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

__all__ = [
    "spectrum", "hadamard_hessian", "channel_scores", "adaalloc", "select_topk", "select_greedy", "greedy_targets",
    "select_support", "refine",
    "swap_search", "layer_problem", "LayerProblem",
    "layer_error", "init_layer", "init_layer_full", "LayerInit", "init_qwha", "wrap_layers", "format_report",
    # from adapter.py
    "FrozenBaseAdapter", "SparseAdapter", "WHALinear", "adapters", "save_adapters", "load_adapters",
]

SELECT_MODES = ("adaalloc", "magnitude", "random", "random_rows", "none")
RULES = ("output", "magnitude", "greedy")    # per-row selection rules of select='adaalloc'
SWAP_ROUNDS_DEFAULT = 2   # init_qwha's exchange-search rounds (see init_qwha)
GREEDY_STEPS = 8          # steps of the greedy rule (select_greedy)
RULE_DEFAULT = "output"   # init_qwha's per-row selection (see init_qwha)
CHUNK_BYTES = 1 << 22     # gathered (k, k) float64 blocks per batched solve (a CPU cache-sized batch)
FP32_MIN_K = 128          # blocks of at least this size are factored in float32 (see refine)
FP32_MAX_PIVOT_SPREAD = 100.0  # float32 factors whose diagonal spreads more (so cond ≥ 10⁴) are redone in float64
PAD_PER_OCTAVE = 16       # block sizes per octave of k in the batched solve (rows padded up to them, see _padded_sizes)
AUG_MIN_K = 64            # smaller blocks: no padding, no augmented row (docs/performance.md)
_AUG_BIG = 1e30           # the last pivot of an augmented block [[A, bᵀ], [b, big]] (see _chunk_solve)


# ---------------------------------------------------------------------------------------------- spectrum


def spectrum(E: torch.Tensor) -> torch.Tensor:
    """C = E Tᵀ (m×n): the dense WHA coefficients that reproduce E exactly (F = C gives F T = E)."""
    return wht.wht(E)


def hadamard_hessian(H: torch.Tensor) -> torch.Tensor:
    """G = T H Tᵀ (n×n), with two WHTs (rows, then columns); symmetrized. No n×n Hadamard GEMM."""
    A = wht.wht(H)                     # (n, n) H Tᵀ
    G = wht.wht(A.T.contiguous())      # Aᵀ Tᵀ = T Hᵀ Tᵀ = T H Tᵀ  (H symmetric)
    return G.T.contiguous().add_(G).mul_(0.5)   # (G + Gᵀ)/2, the transpose by a tiled copy (~2× faster at n = 1536)


def channel_scores(E: torch.Tensor, H: torch.Tensor | None = None, kind: str = "output") -> torch.Tensor:
    """σ_i per output channel: 'output' ‖e_i Rᵀ‖ = sqrt(e_i H e_iᵀ) (layer-output error), 'weight' ‖e_i‖₂."""
    if kind == "weight":
        return E.norm(dim=1)
    if kind == "output":
        if H is None:
            raise ValueError("channel_scores(kind='output') needs H")
        return ((E @ H) * E).sum(1).clamp_min(0).sqrt()
    raise ValueError(f"channel_scores: kind must be 'output' or 'weight', got {kind!r}")


# ---------------------------------------------------------------------------------------------- AdaAlloc


def adaalloc(scores: torch.Tensor, budget: int, temperature: float = 1.0, min_per_row: int = 2,
             max_per_row: int | None = None) -> torch.Tensor:
    """Per-channel parameter counts k (m,) long, eq. 7: k_i ∝ σ_i^{1/t}, Σk = budget, min ≤ k_i ≤ max.

    k_i = ⌊B σ_i^{1/t} / Σ σ_j^{1/t}⌋, the remainder one each to the channels with the smallest k_i (ties:
    higher score first). Where a bound binds, the channel is fixed at the bound and the rest of the budget is
    shared in proportion among the others (water-filling), so the sum is exact and the bounds hold. k is
    non-decreasing in the score. Raises ValueError when budget < m·min or budget > m·max.
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


def _csr(rows: torch.Tensor, cols: torch.Tensor, n: int) -> torch.Tensor:
    """(2, B) long [row, col] sorted by row, then column."""
    flat = torch.sort(rows.long() * n + cols.long()).values
    return torch.stack([flat // n, flat % n])


def _scores_matrix(C: torch.Tensor, G: torch.Tensor | None, rule: str) -> torch.Tensor:
    if rule == "output":
        if G is None:
            raise ValueError("selection rule 'output' needs G")
        return C.square() * G.diagonal()[None, :]        # C_ij² G_jj: contribution to the output error
    if rule == "magnitude":
        return C.abs()
    raise ValueError(f"selection rule must be one of {RULES} ('greedy' with select='adaalloc'), got {rule!r}")


def _topk_rows(S: torch.Tensor, k: torch.Tensor, row0: int = 0, bands: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) (Σk,) of the k_i largest entries of each row of S (R, n); rows numbered from row0. For large k
    the rows, sorted by k, go in `bands` groups, each with its own largest k (topk's cost grows with k: ~40 % less
    time at r = 64)."""
    rows_out, cols_out = [], []
    banded = S.shape[0] >= 16 * bands and k.numel() and int(k.max()) >= 64
    for r in torch.argsort(k).tensor_split(bands) if banded else [None]:
        kr = k if r is None else k[r]
        kmax = int(kr.max()) if kr.numel() else 0
        if kmax == 0:
            continue
        top = (S if r is None else S.index_select(0, r)).topk(kmax, dim=1).indices     # (R', kmax)
        keep = torch.arange(kmax, device=S.device)[None, :] < kr[:, None]
        ids = torch.arange(S.shape[0], device=S.device) if r is None else r
        rows_out.append((ids + row0)[:, None].expand_as(top)[keep])
        cols_out.append(top[keep])
    if not rows_out:
        return S.new_zeros(0, dtype=torch.long), S.new_zeros(0, dtype=torch.long)
    return torch.cat(rows_out), torch.cat(cols_out)


def _check_k(k: torch.Tensor, m: int, n: int, who: str) -> torch.Tensor:
    if k.shape != (m,) or (k < 0).any() or (k > n).any():
        raise ValueError(f"{who}: k must be (m,) = ({m},) with 0 <= k_i <= n = {n}")
    return k.long()


def select_topk(C: torch.Tensor, G: torch.Tensor | None, k: torch.Tensor, rule: str = "output",
                chunk_rows: int = 4096) -> torch.Tensor:
    """Support (2, Σk) of the k_i largest coefficients of each row of C by C_ij²·G_jj ('output') or |C_ij|."""
    m, n = C.shape
    k = _check_k(k.to(C.device), m, n, "select_topk")
    picks = [_topk_rows(_scores_matrix(C[r0:r0 + chunk_rows], G, rule), k[r0:r0 + chunk_rows], r0)
             for r0 in range(0, m, chunk_rows)]
    return _csr(torch.cat([p[0] for p in picks]), torch.cat([p[1] for p in picks]), n)


def greedy_targets(k: torch.Tensor, steps: int) -> torch.Tensor:
    """(steps, m) the greedy schedule: row i holds ⌈k_i·(s+1)/steps⌉ coefficients after step s (the last: k_i)."""
    s = torch.arange(1, steps + 1, device=k.device)[:, None]
    return (k[None, :] * s + steps - 1) // steps


def _gain_scores(P: torch.Tensor, G: torch.Tensor, support: torch.Tensor, f: torch.Tensor,
                 inv_sd: torch.Tensor) -> torch.Tensor:
    """|g_ij|/√G_jj (m, n), −inf on the support: g = P − F G, the residual gradient of F (values f on the CSR
    support). g_j²/G_jj is the exact error decrease of adding j alone with the other values held (one sparse
    F·G product, B·n)."""
    m, n = P.shape
    rows, cols = support
    F = torch.sparse_coo_tensor(support, f.to(P.dtype), (m, n), is_coalesced=True, check_invariants=False)
    S = torch.addmm(P, F, G, alpha=-1).abs_().mul_(inv_sd)            # (m, n)
    S[rows, cols] = -math.inf
    return S


def select_greedy(P: torch.Tensor, G: torch.Tensor, k: torch.Tensor, steps: int = GREEDY_STEPS, *,
                  chunk_bytes: int = CHUNK_BYTES, fp32_min_k: int | None = FP32_MIN_K) -> torch.Tensor:
    """Support (2, Σk) by per-row stagewise greedy selection (orthogonal matching pursuit on ‖(e_i − f T_Ω)Rᵀ‖).

    Beyond the paper, whose rows keep their top-k_i coefficients (by C_ij²·G_jj here) and then refine (eq. 9).
    Each row starts empty; at step s it grows to ⌈k_i·(s+1)/steps⌉ coefficients (`greedy_targets`) by adding the
    unselected columns of largest g_j²/G_jj, g = P[i] − f·G[Ω,:] the residual gradient of its refined values f,
    and the support is refined (`refine`) before the next step; steps ≥ max k_i adds one at a time (classic OMP).
    The same k_i, so the same budget. All rows move together: per step one sparse F·G product (B·n), one top-k
    over (m, n) and one batched refine (chunked as refine). P = C G and G: the (damped) problem the values solve.
    The last support is returned unrefined (the caller refines it).
    """
    m, n = P.shape
    if steps < 1:
        raise ValueError(f"select_greedy: steps must be >= 1, got {steps}")
    k = _check_k(k.to(P.device), m, n, "select_greedy")
    targets = greedy_targets(k, steps)
    adds = torch.diff(targets, dim=0, prepend=torch.zeros_like(k)[None])    # (steps, m) added per step
    last = max(s for s in range(steps) if adds[s].any()) if k.any() else -1
    inv_sd = G.diagonal().clamp_min(torch.finfo(G.dtype).tiny).rsqrt()      # 1/√G_jj
    support = torch.zeros(2, 0, dtype=torch.long, device=P.device)
    f = torch.zeros(0, dtype=P.dtype, device=P.device)
    for s in range(last + 1):
        if not adds[s].any():
            continue                                                  # rows with k_i < steps skip some steps
        S = _gain_scores(P, G, support, f, inv_sd)                    # (m, n)
        rows, cols = _topk_rows(S, adds[s])
        support = _csr(torch.cat([support[0], rows]), torch.cat([support[1], cols]), n)
        if s < last:
            f = _solve_support(P, G, support, chunk_bytes=chunk_bytes, fp32_min_k=fp32_min_k, quad=False)[0]
    return support


def select_support(C: torch.Tensor, G: torch.Tensor, budget: int, *, select: str = "adaalloc",
                   scores: torch.Tensor | None = None, temperature: float = 1.0, rule: str = "output",
                   min_per_row: int = 2, generator: torch.Generator | None = None, P: torch.Tensor | None = None,
                   greedy_steps: int = GREEDY_STEPS) -> torch.Tensor:
    """Support (2, B) of F by one of SELECT_MODES.

    adaalloc: k from `adaalloc(scores, ...)`, then per row the top-k by `rule` ('output' C_ij²·G_jj, 'magnitude'
    |C_ij|) or rule='greedy': `select_greedy` with greedy_steps steps on P (default C G). magnitude: top-B over the
    whole layer by `rule`. random: B positions uniform over the layer (seeded). random_rows: adaalloc's k per
    row, columns uniform. none: empty support.
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
            return select_greedy(C @ G if P is None else P, G, k, greedy_steps)
        if select == "adaalloc":
            return select_topk(C, G, k, rule)
        perm = torch.rand(m, n, generator=generator).argsort(dim=1).to(C.device)    # (m, n) random order
        keep = torch.arange(n, device=C.device)[None, :] < k[:, None]
        rows = torch.arange(m, device=C.device)[:, None].expand(m, n)
        return _csr(rows[keep], perm[keep], n)
    if select == "magnitude":
        flat = _scores_matrix(C, G, rule).reshape(-1).topk(budget).indices
    else:  # random
        flat = torch.randperm(m * n, generator=generator)[:budget].to(C.device)
    return _csr(flat // n, flat % n, n)


# ---------------------------------------------------------------------------------------------- refinement


def refine(P: torch.Tensor, G: torch.Tensor, support: torch.Tensor, *, chunk_bytes: int = CHUNK_BYTES,
           fp32_min_k: int | None = None, workers: int = 1) -> torch.Tensor:
    """Least-squares values on a fixed support, eq. 9/35: for each row, f·G[Ω,Ω] = P[i,Ω] (P = C G).

    Batched: rows grouped by a padded size K_i ≥ k_i (`_padded_sizes`, ≤ 16 sizes per octave; the padding is
    unit pivots decoupled from the block, so it changes nothing but round-off), each block gathered with its
    right-hand side as one more row, [[G[Ω,Ω], P[i,Ω]ᵀ], [P[i,Ω], big]], so that one batched Cholesky (in place)
    also does the forward solve and one triangular solve is left (per group and chunk, ≤ chunk_bytes of float64
    blocks); rows whose Cholesky fails fall back to least squares (padding merges the many groups of equal k into a
    few). Blocks with K_i ≥ fp32_min_k (default None: none; init_layer_full and select_greedy pass
    FP32_MIN_K) are gathered and factored in float32, where gather and Cholesky are faster; their values differ
    from float64's by about eps32·cond(G[Ω,Ω]) (so the normal equations hold only to that), which moves the error
    ‖(e_i − f T_Ω)Rᵀ‖² only at second order (4e-7 at cond 2·10⁵ in the tests; bench/bench_init.py measures the
    demo layers). The check: a row whose float32 Cholesky fails, or whose factor's diagonal spreads by more than
    FP32_MAX_PIVOT_SPREAD (a proof that cond ≥ 10⁴), is re-solved in float64. workers > 1: the chunks are solved
    that many at a time in threads, each with torch.get_num_threads() // workers intra-op threads meanwhile (the
    values are those of workers = 1 at the same per-worker thread count; see wrap_layers). Returns
    values (B,) float64 in the support's (CSR) order.
    """
    with _threads_per_worker(workers, "refine"):
        return _solve_support(P, G, support, chunk_bytes=chunk_bytes, fp32_min_k=fp32_min_k, quad=False,
                              workers=workers)[0]


@contextlib.contextmanager
def _threads_per_worker(workers: int, who: str):
    """For `workers` threads that each run torch ops: torch.get_num_threads() // workers intra-op threads (at least
    1) meanwhile, restored after; nothing changes for workers = 1. Raises for workers < 1, naming `who`."""
    if workers < 1:
        raise ValueError(f"{who}: workers must be >= 1, got {workers}")
    threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(max(1, threads // workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _gather(Gd, Pd, r, c, n):
    """A = G[Ω,Ω] (R, k, k) in the dtype of the flat Gd (n·n,), b = P[i,Ω] (R, k) from the flat Pd (m·n,)."""
    kk = c.shape[1]
    cn = c * n
    # flat index_select: ~3× faster than 3-D advanced indexing on CPU; int32 positions when n² < 2³¹
    A = Gd.index_select(0, (cn[:, :, None] + c[:, None, :]).view(-1)).view(-1, kk, kk)
    b = Pd.index_select(0, (r[:, None] * n + c).view(-1)).view(-1, kk)
    return A, b


def _spd_solve(A, b, overwrite=False):
    """x·A = b for symmetric blocks A (R, k, k) by Cholesky A = L Lᵀ: (x (R, k) in A's dtype, L, ok (R,) bool).
    overwrite: factor in place (A becomes L: no copy; A's transpose is the column-major layout LAPACK wants)."""
    L = A.mT if overwrite else A.mT.clone(memory_format=torch.contiguous_format).mT   # column-major (R, k, k)
    L, info = torch.linalg.cholesky_ex(L, out=(L, torch.empty(A.shape[0], dtype=torch.int32, device=A.device)))
    y = torch.linalg.solve_triangular(L, b.to(A.dtype)[..., None], upper=False)      # L y = b
    x = torch.linalg.solve_triangular(L.mT, y, upper=True)[..., 0]                   # Lᵀ x = y
    return x, L, (info == 0) & torch.isfinite(x).all(dim=1)


def _block_solve(Gd, Pd, r, c, n):
    """Gather and solve one chunk of rows with equal k in float64: Gd, Pd the flat G (n·n,) and P (m·n,), r (R,)
    row ids, c (R, k) their support columns. Returns A = G[Ω,Ω] (R,k,k), b = P[i,Ω] (R,k), the solution x (R,k)
    of x·A = b and ok (R,) bool: rows solved by Cholesky (the others, singular, by least squares)."""
    A, b = _gather(Gd, Pd, r, c, n)
    x, _, ok = _spd_solve(A, b)
    if not ok.all():
        bad = ~ok
        x[bad] = torch.linalg.lstsq(A[bad].cpu(), b[bad, :, None].cpu(), driver="gelsd").solution[..., 0].to(x)
    return A, b, x, ok


def _quad(A, x):
    """Per-row x A xᵀ (R,) for blocks A (R, k, k) and x (R, k) (float64 accumulation)."""
    return (x.double() * torch.linalg.vecdot(A, x.to(A.dtype)[:, None, :]).double()).sum(1)


def _padded_sizes(k: torch.Tensor, per_octave: int | None = None) -> torch.Tensor:
    """Block size K_i ≥ k_i of each row in the batched solve: k_i rounded up to a multiple of
    2^(⌊log₂ k_i⌋ − log₂ per_octave) (a power of two; default PAD_PER_OCTAVE), so at most per_octave + 1 sizes
    per octave; k_i < AUG_MIN_K stays (those rows take `_plain_chunk_solve`). 16: K/k ≤ 1 + 1/16, ≤ 20 % more
    Cholesky flops for a row, traded for far fewer groups of rows of equal size. 0 stays 0. Rows padded to K
    solve the same system up to round-off (see `_solve_support`)."""
    per_octave = PAD_PER_OCTAVE if per_octave is None else per_octave
    lg = torch.log2(k.clamp_min(1).double()).floor().long()
    step = torch.pow(2, (lg - int(math.log2(per_octave))).clamp_min(0))
    return torch.where(k < AUG_MIN_K, k, (k + step - 1) // step * step)


def _row_groups(k: torch.Tensor, K: torch.Tensor):
    """The rows with equal padded size K_i = kk > 0, as (kk, r (R,) row ids), by K ascending."""
    order = torch.argsort(K, stable=True)
    sizes, counts = torch.unique_consecutive(K[order], return_counts=True)
    return [(kk, r) for kk, r in zip(sizes.tolist(), order.split(counts.tolist())) if kk]


def _aug_source(G, P, pad, dtype):
    """The flat array every augmented block is gathered from: [Gx (N·N), P (m·n), 0, big], Gx = (N, N) with
    G in the corner and `pad` unit pivots after it (N = n + pad), all decoupled (zeros off the diagonal)."""
    n = G.shape[0]
    Gx = torch.zeros(n + pad, n + pad, dtype=dtype, device=G.device)
    Gx[:n, :n] = G
    Gx.diagonal()[n:] = 1
    tail = torch.tensor([0.0, _AUG_BIG], dtype=dtype, device=G.device)
    return torch.cat([Gx.view(-1), P.reshape(-1).to(dtype), tail])


def _aug_blocks(src, n, N, m, r, c, valid):
    """(R, K+1, K+1) augmented blocks [[G[Ω,Ω], P[i,Ω]ᵀ], [P[i,Ω], big]] gathered from src (`_aug_source`), with
    c (R, K) the padded columns (pads: distinct ids ≥ n, unit pivots) and valid (R, K) the real ones."""
    R, K = c.shape
    idx = torch.empty(R, K + 1, K + 1, dtype=c.dtype, device=c.device)
    torch.add((c * N)[:, :, None], c[:, None, :], out=idx[:, :K, :K])      # flat index_select: see _gather
    zero = N * N + m * n
    brow = torch.where(valid, c + (N * N + r[:, None] * n).to(c.dtype), zero)   # P[i, c] (pads: 0)
    idx[:, K, :K] = brow
    idx[:, :K, K] = brow
    idx[:, K, K] = zero + 1
    return src.index_select(0, idx.view(-1)).view(R, K + 1, K + 1)


def _chunk_solve(src, n, N, m, r, c, valid, xe, check_spread, quad=True):
    """One chunk of `_solve_support`, on augmented blocks M = [[A, bᵀ], [b, big]] (A = G[Ω,Ω], b = P[i,Ω], padded):
    one Cholesky gives L = [[L_A, 0], [yᵀ, ·]] with L_A y = bᵀ, then one triangular solve L_Aᵀ xᵀ = y; and
    x A xᵀ = x·b = ‖y‖² for the error report. Returns (x (R, K) float64, x A xᵀ (R,), Σ xe A xeᵀ or 0, ok (R,)):
    ok False for rows whose Cholesky fails or gives non-finite values, or (check_spread: float32 blocks) whose
    pivots spread by more than FP32_MAX_PIVOT_SPREAD."""
    K = c.shape[1]
    M = _aug_blocks(src, n, N, m, r, c, valid)
    qx = _quad(M[:, :K, :K], xe).sum() if xe is not None else 0.0      # before M is overwritten by its factor
    L = M.mT                                                          # column-major: LAPACK factors in place
    L, info = torch.linalg.cholesky_ex(L, out=(L, torch.empty(M.shape[0], dtype=torch.int32, device=M.device)))
    y = L[:, K, :K]                                                   # (R, K) L_A⁻¹ bᵀ
    # Lᵀ [x, −1]ᵀ = [0, −δ]ᵀ (δ = L_KK) is L_Aᵀ xᵀ = y on the whole contiguous factor: no copy of L_A
    rhs = torch.zeros(M.shape[0], K + 1, 1, dtype=M.dtype, device=M.device)
    rhs[:, K, 0] = -L[:, K, K]
    x = torch.linalg.solve_triangular(M, rhs, upper=True)[:, :K, 0].double()
    ok = (info == 0) & torch.isfinite(x).all(dim=1)
    if check_spread:                                                  # cond(A) ≥ (max L_ii / min L_ii)², real rows only
        d = torch.where(valid, L.diagonal(dim1=-2, dim2=-1)[:, :K], L[:, :1, 0])   # pads: the first pivot
        ok &= d.amax(1) <= FP32_MAX_PIVOT_SPREAD * d.amin(1)
    return x, (y.double().square().sum(1) if quad else None), qx, ok


def _plain_chunk_solve(Gd, Pd, G32, r, c, n, xe, quad=True):
    """A chunk of rows with equal small k (< AUG_MIN_K: padding and the augmented row cost more than they save
    there): (x (R,k) float64, x A xᵀ (R,) or None, Σ xe A xeᵀ or 0). G[Ω,Ω] and P[i,Ω] gathered apart, Cholesky in
    place, two triangular solves. G32 (n·n,) given: gather and factor in float32, x A xᵀ as ‖Lᵀxᵀ‖²; rows whose
    float32 Cholesky fails, or whose pivots spread by more than FP32_MAX_PIVOT_SPREAD, are re-solved by
    `_block_solve` (float64)."""
    A, b = _gather(Gd if G32 is None else G32, Pd, r, c, n)
    qx = _quad(A, xe).sum() if xe is not None else 0.0               # before A is overwritten by its factor
    x, L, ok = _spd_solve(A, b, overwrite=True)
    x = x.double()
    qf = None
    if G32 is None:
        qf = (x * b).sum(1) if quad else None                         # x A xᵀ = x·b at the solution
    else:
        d = L.diagonal(dim1=-2, dim2=-1)                              # cond(A) ≥ (max L_ii / min L_ii)²
        ok &= d.amax(1) <= FP32_MAX_PIVOT_SPREAD * d.amin(1)
        if quad:
            qf = torch.linalg.vecdot(L.mT, x.float()[:, None, :]).double().square().sum(1)    # ‖Lᵀxᵀ‖²
    if not ok.all():                                                  # singular (or too ill-conditioned for float32)
        bad = ~ok
        A64, b64, x[bad], _ = _block_solve(Gd, Pd, r[bad], c[bad], n)
        if quad:
            qf[bad] = _quad(A64, x[bad])
    return x, qf, qx


def _chunk_redo(G, P, source, n, N, m, r, c, valid, x, qf, ok, f32):
    """The rows of a chunk that `_chunk_solve` could not do (ok False): float32 rows again in float64, then rows
    whose float64 Cholesky fails (singular blocks) one by one by least squares (`_block_solve`)."""
    if f32:
        bad = ~ok
        x64, qf64, _, ok64 = _chunk_solve(source(torch.float64), n, N, m, r[bad], c[bad], valid[bad], None, False,
                                          qf is not None)
        x[bad] = x64
        if qf is not None:
            qf[bad] = qf64
        ok = ok.clone()
        ok[bad] = ok64
    failed = torch.nonzero(~ok).flatten().tolist()
    if failed:                                                        # flat float64 G and P, made once for all rows
        Gd, Pd = G.to(torch.float64).reshape(-1), P.to(torch.float64).reshape(-1)
    for j in failed:
        cj = c[j:j + 1][valid[j:j + 1]].view(1, -1).long()
        A64, _, xj, _ = _block_solve(Gd, Pd, r[j:j + 1], cj, n)
        x[j] = 0
        x[j, :cj.shape[1]] = xj[0]
        if qf is not None:
            qf[j] = _quad(A64, xj)[0]
    return x, qf


def _solve_support(P, G, support, extra=None, chunk_bytes=CHUNK_BYTES, fp32_min_k=FP32_MIN_K, quad=True,
                   workers=1):
    """refine(), plus the quadratic forms Σ_i v_i G[Ω_i,Ω_i] v_iᵀ of the solution and of `extra` (B,) values
    on the same support, from the gathered blocks (for the error report without another m×n×n product).

    Rows are batched by padded size K_i ≥ k_i (`_padded_sizes`): a row's block is G[Ω,Ω] followed by K_i − k_i
    unit pivots decoupled from it (zero off-diagonal), with zeros on the right-hand side, so the padded system has
    the row's solution followed by exact zeros. Each block carries its right-hand side as an extra row (see
    `_chunk_solve`). Rows that fail (float32: or spread too much) are redone in float64; float64 failures
    (singular blocks) row by row by least squares (`_block_solve`)."""
    m, n = P.shape
    rows, cols = support[0], support[1]
    nnz = rows.numel()
    values = torch.zeros(nnz + 1, dtype=torch.float64, device=P.device)   # + the sink slot of the pads
    quad_f = torch.zeros((), dtype=torch.float64, device=P.device)
    quad_x = torch.zeros((), dtype=torch.float64, device=P.device)
    if nnz == 0:
        return values[:0], quad_f, quad_x
    k = torch.bincount(rows, minlength=m)                              # (m,)
    K = _padded_sizes(k)
    pad = int((K - k).max())
    N = n + pad
    ptr = torch.cumsum(k, 0) - k
    itype = torch.int32 if N * N + m * n + 2 < 2**31 and nnz < 2**31 else torch.int64
    cols_x = torch.cat([cols.to(itype), cols.new_zeros(1, dtype=itype)])   # + a sink slot for pads
    extra_x = None if extra is None else torch.cat([extra.to(torch.float64), extra.new_zeros(1, dtype=torch.float64)])
    src, lock = {}, threading.Lock()

    def source(dtype):                                                # made once, on first use (any thread)
        with lock:
            if dtype not in src:
                src[dtype] = _aug_source(G, P, pad, dtype)
            return src[dtype]

    def augmented(f32, r, c, valid, xe, pos):                          # a chunk of padded, augmented blocks
        x, qf, qx, ok = _chunk_solve(source(torch.float32 if f32 else torch.float64), n, N, m, r, c, valid, xe, f32,
                                     quad)
        if not ok.all():
            x, qf = _chunk_redo(G, P, source, n, N, m, r, c, valid, x, qf, ok, f32)
        values.index_copy_(0, pos.reshape(-1), x.reshape(-1))        # pads (exact zeros) go to the sink
        return qf, qx

    def plain(Gd, Pd, G32, r, c, xe, pos):                            # a chunk of small blocks of equal k
        x, qf, qx = _plain_chunk_solve(Gd, Pd, G32, r, c, n, xe, quad)
        values.index_copy_(0, pos, x.reshape(-1))
        return qf, qx

    groups = _row_groups(k, K)
    flat = None
    if any(kk < AUG_MIN_K for kk, _ in groups):
        Gd = G.to(torch.float64).reshape(-1)
        flat = (Gd, P.to(torch.float64).reshape(-1), Gd.float() if fp32_min_k is not None else None)
    tasks = []                                                        # (function, args) per chunk, in order
    for kk, rg in groups:                                             # per group: indices for all its rows
        ar = torch.arange(kk, device=P.device)
        step = max(1, chunk_bytes // ((kk + 1) ** 2 * 8))
        f32 = fp32_min_k is not None and kk >= fp32_min_k
        if kk < AUG_MIN_K:                                            # K = k: no pads, plain blocks
            Gd, Pd, G32 = flat
            for r in rg.split(step):
                pos = (ptr[r][:, None] + ar).view(-1)
                xe = None if extra_x is None else extra_x.index_select(0, pos).view(-1, kk)
                tasks.append((plain, (Gd, Pd, G32 if f32 else None, r, cols_x.index_select(0, pos).view(-1, kk),
                                      xe, pos)))
            continue
        kg = k[rg][:, None]
        valid_g = ar < kg                                             # (Rg, K)
        pos_g = torch.where(valid_g, ptr[rg][:, None] + ar, nnz)      # (Rg, K) CSR positions (pads: the sink)
        c_g = torch.where(valid_g, cols_x[pos_g], (n + ar - kg).to(itype))   # pads: distinct unit pivots n, n+1, ..
        xe_g = None if extra_x is None else extra_x[pos_g]
        for s0 in range(0, rg.numel(), step):                         # chunks: ≤ chunk_bytes of blocks
            sl = slice(s0, s0 + step)
            tasks.append((augmented, (f32, rg[sl], c_g[sl], valid_g[sl], None if xe_g is None else xe_g[sl],
                                      pos_g[sl])))
    if workers > 1 and len(tasks) > 1:                                # chunks write disjoint positions of values
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda t: t[0](*t[1]), tasks))
    else:
        results = [fn(*args) for fn, args in tasks]
    for qf, qx in results:                                            # summed in chunk order, as with 1 worker
        if quad:
            quad_f += qf.sum()
        quad_x += qx
    values = values[:nnz]
    return values, quad_f, quad_x


_refine = refine  # init_layer_full's `refine` flag shadows the function


def swap_search(P: torch.Tensor, G: torch.Tensor, support: torch.Tensor, values: torch.Tensor, rounds: int, *,
                P_raw: torch.Tensor | None = None, row_err2: torch.Tensor | None = None, lam_mu: float = 0.0,
                chunk_bytes: int = 1 << 27, exchange_frac: float = 0.25,
                retry_single: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Exchange search on each row's support (beyond the paper), between selection and the final refinement.

    Each round, each row i with refined values f on Ω_i (f·G[Ω,Ω] = P[i,Ω]):
      gain of adding j ∉ Ω    g_j² / G_jj,  g = P[i] − f·G[Ω,:] (the residual gradient; exact for one addition)
      cost of dropping j ∈ Ω  f_j² / (G[Ω,Ω]⁻¹)_jj                   (exact for one removal)
    the s = max(1, k_i // 4) best additions are paired with the s cheapest removals (best with cheapest) and the
    pairs with gain > cost are exchanged; the new support is refined, and the row keeps it only where its error
    ‖(e_i − f T_Ω)Rᵀ‖² drops; a row that rejects its batch of exchanges retries the best pair alone
    (retry_single). s = max(1, ⌊k_i·exchange_frac⌋). Stops early when no row improves. k_i is unchanged.
    Batched like `refine`: rows grouped by k_i, gathered (R, k, k) blocks, batched Cholesky and its inverse
    diagonal, chunks of ≤ chunk_bytes; g for all rows from one sparse(F)·G product per round (B·n).
    P, G: the (damped) problem that the values solve. The acceptance error is measured with P_raw and
    G − lam_mu·I (the undamped problem, as reported by init_layer_full) plus row_err2 = ‖e_i Rᵀ‖² (m,); by default
    P_raw = P, lam_mu = 0 (the row constant then does not matter: zeros).
    Returns (support (2, B) CSR, values (B,) float64, info {'rounds', 'rows_improved': [per round]}).
    """
    m, n = P.shape
    if rounds < 0:
        raise ValueError(f"swap_search: rounds must be >= 0, got {rounds}")
    rows, cols = support[0], support[1].clone()
    f = values.to(torch.float64).clone()
    info = {"rounds": 0, "rows_improved": []}
    if rounds == 0 or rows.numel() == 0:
        return support, f, info
    Pd, Gd = P.to(torch.float64).reshape(-1), G.to(torch.float64).reshape(-1)
    Prd = Pd if P_raw is None else P_raw.to(torch.float64).reshape(-1)
    e2 = torch.zeros(m, dtype=torch.float64, device=P.device) if row_err2 is None else row_err2.to(torch.float64)
    gdiag = G.to(torch.float64).diagonal()
    k = torch.bincount(rows, minlength=m)
    ptr = torch.cumsum(k, 0) - k
    groups = [kk for kk in torch.unique(k).tolist() if 0 < kk < n]

    def row_err(r, c, x, A):                                           # undamped ‖(e_i − x T_Ω)Rᵀ‖² (R,)
        p_raw = Prd.index_select(0, (r[:, None] * n + c).reshape(-1)).view_as(x)
        quad = _quad(A, x)
        return e2[r] - 2 * (x * p_raw).sum(1) + quad - lam_mu * x.square().sum(1)

    for _ in range(rounds):
        Fs = torch.sparse_coo_tensor(torch.stack([rows, cols]), f, (m, n), check_invariants=False).coalesce()
        g = P.to(torch.float64) - torch.sparse.mm(Fs, G.to(torch.float64))     # (m, n) residual gradient
        gain = g.square_() / gdiag                                     # (m, n) gain of each single addition
        gain[rows, cols] = -math.inf                                   # selected: not candidates
        improved = 0
        for kk in groups:
            s = max(1, int(kk * exchange_frac))
            rsel = torch.nonzero(k == kk).flatten()
            ar = torch.arange(kk, device=P.device)
            for r in rsel.split(max(1, chunk_bytes // (kk * kk * 8 * 3))):
                pos = (ptr[r][:, None] + ar).reshape(-1)
                c = cols.index_select(0, pos).view(-1, kk)             # (R, k)
                x = f.index_select(0, pos).view(-1, kk)                # (R, k) current refined values
                A = Gd.index_select(0, (c[:, :, None] * n + c[:, None, :]).reshape(-1)).view(-1, kk, kk)
                L, inf_ = torch.linalg.cholesky_ex(A)
                eye = torch.eye(kk, dtype=A.dtype, device=A.device).expand_as(A)
                Linv = torch.linalg.solve_triangular(L, eye, upper=False)
                dinv = Linv.square().sum(1)                            # (R, k) diag(A⁻¹) = column norms² of L⁻¹
                cost = x.square() / dinv
                cost[(inf_ != 0) | ~torch.isfinite(cost).all(1)] = math.inf   # singular block: no exchange
                ga, ja = gain[r].topk(min(s, n - kk), dim=1)           # (R, s') best additions, descending
                cr, ir = cost.topk(ga.shape[1], dim=1, largest=False)  # (R, s') cheapest removals, ascending
                do = ga > cr                                           # a prefix per row (monotone)
                err_cur, pending = None, None
                for attempt in range(2):                               # all s' pairs; then the best pair alone
                    if attempt == 1:                                   # for the rows that rejected the batch
                        do = do & (torch.arange(do.shape[1], device=P.device) == 0) & pending[:, None]
                    changed = do.any(1)
                    if not changed.any():
                        break
                    if err_cur is None:
                        err_cur = row_err(r, c, x, A)                  # (R,) current error per row
                    r2, c_old = r[changed], c[changed]
                    c_new = c_old.scatter(1, ir[changed],
                                          torch.where(do[changed], ja[changed], c_old.gather(1, ir[changed])))
                    c_new = c_new.sort(1).values                       # CSR order within the row
                    A_new, _, x_new, _ = _block_solve(Gd, Pd, r2, c_new, n)
                    err_old, err_new = err_cur[changed], row_err(r2, c_new, x_new, A_new)
                    acc = torch.isfinite(x_new).all(1) & (err_new < err_old - 1e-12 * err_old.abs())
                    pending = changed.clone()
                    pending[changed] = ~acc & (do[changed].sum(1) > 1)
                    if acc.any():
                        pacc = pos.view(-1, kk)[changed][acc].reshape(-1)
                        cols.index_copy_(0, pacc, c_new[acc].reshape(-1))
                        f.index_copy_(0, pacc, x_new[acc].reshape(-1))
                        improved += int(acc.sum())
                    if not retry_single or not pending.any():
                        break
        info["rounds"] += 1
        info["rows_improved"].append(improved)
        if improved == 0:
            break
    return torch.stack([rows, cols]), f, info


def layer_error(E: torch.Tensor, H: torch.Tensor, dW: torch.Tensor | None = None) -> torch.Tensor:
    """‖(E − ΔW) Rᵀ‖_F = sqrt(tr((E − ΔW) H (E − ΔW)ᵀ)) without forming R (float64 scalar)."""
    D = E.to(torch.float64) if dW is None else E.to(torch.float64) - dW.to(torch.float64)
    return ((D @ H.to(torch.float64)) * D).sum().clamp_min(0).sqrt()


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

    Values are unscaled: ΔW = dense(F) @ T with T = wht.hadamard_matrix(n). Keywords as `init_layer_full`.
    """
    out = init_layer_full(E, H, budget, **kw)
    return out.indices, out.values


@dataclass
class LayerProblem:
    """One layer's init problem in the Hadamard domain (float64). The values solve the damped problem (G, P);
    errors are reported with the undamped one (G_raw, P_raw)."""
    C: torch.Tensor                # (m, n) E Tᵀ
    P_raw: torch.Tensor            # (m, n) E H Tᵀ = C G_raw
    G_raw: torch.Tensor            # (n, n) T H Tᵀ
    G: torch.Tensor                # (n, n) T (H + λμ I) Tᵀ
    P: torch.Tensor                # (m, n) C G
    e_out: torch.Tensor            # (m,) ‖e_i Rᵀ‖² (undamped)
    lam_mu: float                  # λ·mean(diag H)

    @property
    def e0sq(self) -> float:
        return float(self.e_out.sum())

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


def layer_problem(E: torch.Tensor, H: torch.Tensor, damp: float = 1e-4) -> LayerProblem:
    """C, P, G of one layer from E = W − Q (m×n) and H = XᵀX/N (n×n, undamped; damped by λ·mean(diag H))."""
    m, n = E.shape
    if H.shape != (n, n):
        raise ValueError(f"init_layer: H has shape {tuple(H.shape)}, expected ({n}, {n}) for E of shape ({m}, {n})")
    E64, H64 = E.to(torch.float64), H.to(torch.float64)    # H's asymmetry (round-off) goes: G is symmetrized
    mu = H64.diagonal().mean()
    lam_mu = float(damp * (mu if mu > 0 else 1.0))
    C = spectrum(E64)                                                  # (m, n) E Tᵀ
    G_raw = hadamard_hessian(H64)                                      # (n, n) T H Tᵀ
    P_raw = C @ G_raw                                                  # (m, n) E H Tᵀ, the one m·n² product
    e_out = (P_raw * C).sum(1).clamp_min(0)                            # (m,) ‖e_i Rᵀ‖² = c_i G c_iᵀ
    G = G_raw.clone()
    G.diagonal().add_(lam_mu)                                          # T (H + λμI) Tᵀ
    return LayerProblem(C, P_raw, G_raw, G, P_raw + lam_mu * C, e_out, lam_mu)


def init_layer_full(E: torch.Tensor, H: torch.Tensor, budget: int, *, temperature: float = 1.0,
                    select: str = "adaalloc", refine: bool = True, score: str = "output",
                    rule: str = "output", damp: float = 1e-4, min_per_row: int = 2,
                    generator: torch.Generator | None = None, chunk_bytes: int = CHUNK_BYTES,
                    swap_rounds: int = 0, greedy_steps: int = GREEDY_STEPS,
                    fp32_min_k: int | None = FP32_MIN_K) -> LayerInit:
    """init_layer with its report. E = W − Q (m×n), H = XᵀX/N (n×n, undamped; damped by λ·mean(diag H) for
    the solve). score: AdaAlloc's σ_i ('output' ‖e_i Rᵀ‖ or 'weight' ‖e_i‖); rule: per-row selection
    ('output' top-k by C²·G_jj, 'magnitude' top-k by |C|, 'greedy' `select_greedy` in greedy_steps steps, beyond
    the paper). Errors are reported with the undamped H. swap_rounds: rounds of `swap_search` between
    the refinement and a final refinement (0: off); err_select stays that of the selected support with F = C,
    info['err_refined_noswap'] the refined error before the exchanges. fp32_min_k: see `refine`."""
    t0 = time.perf_counter()
    if swap_rounds and not refine:
        raise ValueError("init_layer: swap_rounds > 0 needs refine=True (exchanges compare refined supports)")
    pb = layer_problem(E, H, damp)
    if score == "output":
        sc = (pb.e_out + pb.lam_mu * E.to(torch.float64).square().sum(1)).sqrt()   # σ_i with the damped H
    elif score == "weight":
        sc = E.to(torch.float64).norm(dim=1)
    else:
        raise ValueError(f"init_layer: score must be 'output' or 'weight', got {score!r}")
    support = select_support(pb.C, pb.G, budget, select=select, scores=sc, temperature=temperature, rule=rule,
                             min_per_row=min_per_row, generator=generator, P=pb.P, greedy_steps=greedy_steps)
    f_sel = pb.C[support[0], support[1]]
    if not (refine and support.shape[1]):
        err = pb.error(support, f_sel, pb.quad(support, f_sel))
        return _layer_init(support, f_sel, pb, err, err, t0, {})
    solve = dict(chunk_bytes=chunk_bytes, fp32_min_k=fp32_min_k)
    f, qf, qs = _solve_support(pb.P, pb.G, support, extra=f_sel, **solve)
    err_select, err_refined = pb.error(support, f_sel, qs), pb.error(support, f, qf)
    info: dict = {}
    if swap_rounds:                                                    # exchange search, then refine
        info["err_refined_noswap"] = err_refined
        support, f, sw = swap_search(pb.P, pb.G, support, f, swap_rounds, P_raw=pb.P_raw, row_err2=pb.e_out,
                                     lam_mu=pb.lam_mu, chunk_bytes=chunk_bytes)
        info.update(swap_rounds_done=sw["rounds"], swap_rows_improved=sw["rows_improved"])
        f, qf, _ = _solve_support(pb.P, pb.G, support, **solve)
        err_refined = pb.error(support, f, qf)
    return _layer_init(support, f, pb, err_select, err_refined, t0, info)


def _layer_init(support, f, pb, err_select, err_refined, t0, info) -> LayerInit:
    k = torch.bincount(support[0], minlength=pb.C.shape[0])
    return LayerInit(support, f.to(torch.float32), k, math.sqrt(pb.e0sq), err_select, err_refined,
                     time.perf_counter() - t0, info)


# ---------------------------------------------------------------------------------------------- whole model


def init_qwha(model: nn.Module, hessians: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], *,
              budget_rank: int = 64, temperature: float = 1.0, scale: float = 1.0, select: str = "adaalloc",
              refine: bool = True, score: str = "output", rule: str = RULE_DEFAULT, damp: float = 1e-4,
              names: list[str] | None = None, device: torch.device | str | None = None, seed: int = 0,
              compute_rank: bool = False, quiet: bool = False, swap_rounds: int = SWAP_ROUNDS_DEFAULT,
              greedy_steps: int = GREEDY_STEPS, workers: int = 1,
              generator: torch.Generator | None = None) -> list[dict]:
    """Wrap every target linear of `model` in a WHALinear initialized by init_layer (eqs. 5–9).

    hessians: {name: H = XᵀX/N} (undamped). weights: {name: W}, the ORIGINAL full-precision weights (the
    caller keeps them from before quantization; any Mapping, e.g. a lazy safetensors reader). The module at
    `name` holds the quantized base Q (QuantLinear, or nn.Linear); E = W − Q. Budget per layer:
    B = budget_rank·(m + n), capped at m·n. Values stored as f / scale. Returns one report dict per layer
    and prints them as a table to stderr unless quiet. device: where the math runs (default: H's device).
    swap_rounds: exchange-search rounds per layer (`swap_search`; 0 = plain AdaAlloc + refinement). Default
    SWAP_ROUNDS_DEFAULT = 2: it lowers both the layer errors and the held-out perplexity after init at about 2.4x
    the plain init's time (docs/performance.md). The per-layer primitives keep 0.
    rule / greedy_steps: the per-row selection (`init_layer_full`). The default stays the paper's top-k: the greedy
    rule lowers the layer error further but not the held-out perplexity after init (docs/performance.md).
    workers: layers initialized at once in threads (`wrap_layers`, which says what it changes). Not with
    select="random", whose one generator is drawn from in layer order. generator: that generator (default one
    seeded with `seed`); pass the same one to calls over successive blocks to draw as one call over all of them.
    """
    if workers > 1 and select == "random":
        raise ValueError("init_qwha: workers > 1 needs a deterministic selection; select='random' draws from one "
                         "generator in layer order (use workers=1)")
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)

    def init_one(base: nn.Module, W: torch.Tensor, H: torch.Tensor) -> tuple[nn.Module, dict]:
        Q = _base_weight(base).detach()
        if W.shape != Q.shape:
            raise ValueError(f"original weight {tuple(W.shape)} vs base {tuple(Q.shape)}")
        dev = torch.device(device) if device is not None else H.device
        m, n = Q.shape
        E = W.to(dev, torch.float64) - Q.to(dev, torch.float64)
        budget = min(budget_rank * (m + n), m * n)
        li = init_layer_full(E, H.to(dev), budget, temperature=temperature, select=select, refine=refine,
                             score=score, rule=rule, damp=damp, generator=gen, swap_rounds=swap_rounds,
                             greedy_steps=greedy_steps)
        wrapped = WHALinear(base, li.indices, li.values / scale, scale=scale)
        row = {"shape": [m, n], "budget": int(li.values.numel()),
               "err_before": li.err_before, "err_select": li.err_select, "err_refined": li.err_refined,
               "rel_select": li.err_select / max(li.err_before, 1e-30),
               "rel_refined": li.err_refined / max(li.err_before, 1e-30),
               "k_min": int(li.k.min()), "k_max": int(li.k.max()), "seconds": li.seconds}
        if swap_rounds:
            row["err_noswap"] = li.info.get("err_refined_noswap", li.err_refined)
        if compute_rank:
            row["rank_F"] = int(torch.linalg.matrix_rank(wrapped.dense_F().float()))
        return wrapped, row

    return wrap_layers(model, hessians, weights, init_one, names=names, adapter_types=(WHALinear,),
                       who="init_qwha", quiet=quiet, workers=workers)


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
        with _threads_per_worker(workers, who), ThreadPoolExecutor(workers) as pool:
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
