"""Fast paths of the QWHA init, each tested equal to (or never worse than) its reference in qwha.py.

qwha.py states each step as the paper does and calls these for the work that dominates the init's time:
  solve_support   the per-row least-squares refinement (eqs. 9, 35) of all rows at once: rows grouped by a padded
                  block size, each block gathered with its right-hand side as one more row, batched Cholesky,
                  float32 blocks where large, chunks in threads          (reference: qwha.refine_reference)
  topk_rows       the per-row top-k_i, in bands of rows of similar k_i     (reference: qwha.select_topk_reference)
  select_greedy   beyond the paper: per-row greedy selection (orthogonal matching pursuit) with the same k_i
  swap_search     beyond the paper: per-row exchange search after refinement; never raises a row's error
Pure tensor-in, tensor-out functions on the problem of qwha.layer_problem: P = C G (m×n), G = T H Tᵀ (n×n), a
support (2, B) [row, col] in CSR order (rows ascending, columns ascending within a row). Nothing here imports qwha.
"""
from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["solve_support", "topk_rows", "csr_support", "check_k", "select_greedy", "greedy_targets", "swap_search",
           "threads_per_worker"]

GREEDY_STEPS = 8          # steps of the greedy rule (select_greedy)
CHUNK_BYTES = 1 << 22     # gathered (k, k) float64 blocks per batched solve (a CPU cache-sized batch)
FP32_MIN_K = 128          # blocks of at least this size are factored in float32 (see solve_support)
FP32_MAX_PIVOT_SPREAD = 100.0  # float32 factors whose diagonal spreads more (so cond ≥ 10⁴) are redone in float64
PAD_PER_OCTAVE = 16       # block sizes per octave of k in the batched solve (rows padded up to them, see _padded_sizes)
AUG_MIN_K = 64            # smaller blocks: no padding, no augmented row (`_plain_chunk_solve`)
_AUG_BIG = 1e30           # the last pivot of an augmented block [[A, bᵀ], [b, big]] (see _chunk_solve)


# ---------------------------------------------------------------------------------------------- batched solve


def _gather(Gd, Pd, r, c, n):
    """A = G[Ω,Ω] (R, k, k) in the dtype of the flat Gd (n·n,), b = P[i,Ω] (R, k) from the flat Pd (m·n,)."""
    kk = c.shape[1]
    cn = c * n
    # flat index_select: faster than 3-D advanced indexing on CPU; int32 positions when n² < 2³¹
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
    solve the same system up to round-off (see `solve_support`)."""
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
    """One chunk of `solve_support`, on augmented blocks M = [[A, bᵀ], [b, big]] (A = G[Ω,Ω], b = P[i,Ω], padded):
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


def solve_support(P, G, support, extra=None, chunk_bytes=CHUNK_BYTES, fp32_min_k=FP32_MIN_K, quad=True,
                  workers=1):
    """The refinement of every row at once (eqs. 9, 35: per row f·G[Ω,Ω] = P[i,Ω]), plus the quadratic forms
    Σ_i v_i G[Ω_i,Ω_i] v_iᵀ of the solution (quad) and of `extra` (B,) values on the same support, from the
    gathered blocks (the error report without another m×n×n product). Returns (values (B,) float64 in the
    support's CSR order, Σ f G fᵀ (0 without quad), Σ extra G extraᵀ (0 without extra)).

    Rows are batched by padded size K_i ≥ k_i (`_padded_sizes`): a row's block is G[Ω,Ω] followed by K_i − k_i
    unit pivots decoupled from it (zero off-diagonal), with zeros on the right-hand side, so the padded system has
    the row's solution followed by exact zeros, and the many groups of rows of equal k become a few. Each block
    carries its right-hand side as an extra row, [[G[Ω,Ω], P[i,Ω]ᵀ], [P[i,Ω], big]], so that one batched
    Cholesky (in place) also does the forward solve and one triangular solve is left (`_chunk_solve`); blocks
    under AUG_MIN_K are solved plain (`_plain_chunk_solve`). Chunks hold ≤ chunk_bytes of float64 blocks.
    Blocks with K_i ≥ fp32_min_k (None: none) are gathered and factored in float32: their values differ from
    float64's by about eps32·cond(G[Ω,Ω]), which moves the error ‖(e_i − f T_Ω)Rᵀ‖² only at second order. A row
    whose float32 Cholesky fails, or whose pivots spread by more than FP32_MAX_PIVOT_SPREAD (a proof that
    cond ≥ 10⁴), is redone in float64; float64 failures (singular blocks) row by row by least squares
    (`_block_solve`). workers > 1: the chunks are solved that many at a time in threads (they write disjoint
    positions, and the sums are taken in chunk order: the values of workers = 1 at the same thread count; the
    caller sets the intra-op threads, `threads_per_worker`)."""
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


# ---------------------------------------------------------------------------------------------- threads


@contextlib.contextmanager
def threads_per_worker(workers: int, who: str):
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


# ---------------------------------------------------------------------------------------------- per-row top-k


def csr_support(rows: torch.Tensor, cols: torch.Tensor, n: int) -> torch.Tensor:
    """(2, B) long [row, col] sorted by row, then column."""
    flat = torch.sort(rows.long() * n + cols.long()).values
    return torch.stack([flat // n, flat % n])


def check_k(k: torch.Tensor, m: int, n: int, who: str) -> torch.Tensor:
    """k (m,) as long, or ValueError naming `who` unless 0 <= k_i <= n."""
    if k.shape != (m,) or (k < 0).any() or (k > n).any():
        raise ValueError(f"{who}: k must be (m,) = ({m},) with 0 <= k_i <= n = {n}")
    return k.long()


def topk_rows(S: torch.Tensor, k: torch.Tensor, row0: int = 0, bands: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) (Σk,) of the k_i largest entries of each row of S (R, n); rows numbered from row0. For large k
    the rows, sorted by k, go in `bands` groups, each with its own largest k (topk's cost grows with k). Equal to
    qwha.select_topk_reference up to ties."""
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


# ---------------------------------------------------------------------------------- greedy selection (beyond the paper)


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
    and the support is refined (`solve_support`) before the next step; steps ≥ max k_i adds one at a time (classic OMP).
    The same k_i, so the same budget. All rows move together: per step one sparse F·G product (B·n), one top-k
    over (m, n) and one batched refinement. P = C G and G: the (damped) problem the values solve.
    The last support is returned unrefined (the caller refines it).
    """
    m, n = P.shape
    if steps < 1:
        raise ValueError(f"select_greedy: steps must be >= 1, got {steps}")
    k = check_k(k.to(P.device), m, n, "select_greedy")
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
        rows, cols = topk_rows(S, adds[s])
        support = csr_support(torch.cat([support[0], rows]), torch.cat([support[1], cols]), n)
        if s < last:
            f = solve_support(P, G, support, chunk_bytes=chunk_bytes, fp32_min_k=fp32_min_k, quad=False)[0]
    return support


# ----------------------------------------------------------------------------------- exchange search (beyond the paper)


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
    Batched like `solve_support`: rows grouped by k_i, gathered (R, k, k) blocks, batched Cholesky and its inverse
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

