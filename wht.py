"""Walsh–Hadamard transforms for every LLaMA/Mistral width (docs/method.md "Hadamard matrices", eqs. 10–12).

A width n = K·2^p uses the orthonormal T = (H_K ⊗ H_P) / √n (eq. 11, T Tᵀ = I: eq. 12), H_P (P = 2^p) Sylvester's
matrix (eq. 10) and H_K a ±1 Hadamard matrix of order K ∈ SUPPORTED_K. In reading order:

    factorize, hadamard_matrix   n = K·P, and the explicit T (eq. 11)
    wht_reference                x Tᵀ the textbook way: the radix-2 butterfly over P, then the K×K core
    fwht_butterfly_              that butterfly in place (the benchmark's baseline)
    the cores H_K                Sylvester      H_1 = [1], H_2k = [[H_k, H_k], [H_k, -H_k]]    (1, every 2^p)
                                 Paley I        q ≡ 3 (mod 4) prime power, order q + 1        (12, 20, 60, 108, 140)
                                 Paley II       q ≡ 1 (mod 4) prime power, order 2(q + 1)     (28, 36, 52 over GF(25))
                                 doubling       H_40 = H_20 ⊗ H_2                             (40)
                                 Williamson     four symmetric circulants of order m, 4m      (156, 172; tabulated)
    fast paths                   wht / wht_ (the transform the code uses, differentiable), the optional CUDA
                                 kernel, and the transposing wht_from_t / wht_to_t of the adapter's training path

The fast `wht` views a row as the tensor (K, f_1, ..., f_r), P = f_1···f_r with each f ≤ 16, and, since
H_P = H_f1 ⊗ ... ⊗ H_fr, applies T one axis at a time as a batched GEMM against a small ±1 block (a radix-16
butterfly), the core being one more axis; rows go through in chunks with a fixed workspace. It is tested equal to
wht_reference and to the dense x Tᵀ; its speed against both is in docs/performance.md ("WHT kernel").
Precision: fp32 and fp64 in their own dtype; fp16/bf16 inputs are transformed in fp32 and rounded once on
output (error ≤ one half-precision rounding of each output).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import operator
import os
import warnings
from pathlib import Path

import torch

SUPPORTED_K = (1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)


def _is_pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


def factorize(n: int) -> tuple[int, int]:
    """n = K·P with P a power of two and K in SUPPORTED_K (the smallest such K; 40·P is returned as 20·2P)."""
    try:  # ints and numpy ints; not bools, floats or strings
        width = None if isinstance(n, bool) else operator.index(n)
    except TypeError:
        width = None
    if width is None or width < 1:
        raise ValueError(f"Hadamard width {n!r}: must be a positive int")
    n = width
    for k in SUPPORTED_K:
        if n % k == 0 and _is_pow2(n // k):
            return k, n // k
    raise ValueError(
        f"no Hadamard matrix for width {n}: supported widths are K·2^p with K in {SUPPORTED_K} "
        "(e.g. 576 = 36·16, 11008 = 172·64, 14336 = 28·512); nothing is padded or truncated")


def hadamard_core(K: int) -> torch.Tensor:
    """The ±1 matrix H_K (K, K), int64, with H_K H_Kᵀ = K·I (a fresh copy)."""
    return _core(K).clone()


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The orthonormal T (n, n) = (H_K ⊗ H_P) / √n with (K, P) = factorize(n) (eqs. 10–12). T Tᵀ = I."""
    K, P = factorize(n)
    T = torch.kron(_core(K).to(device=device, dtype=dtype), sylvester(P).to(device=device, dtype=dtype))
    return T.mul_(1.0 / math.sqrt(n))


def wht_reference(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x Tᵀ (inverse: x T) along the last dim, T = (H_K ⊗ H_P)/√n (eq. 11), the textbook way and in x's dtype: each
    of the K segments of P goes through the radix-2 butterfly x ↦ x H_P (eq. 10: [a, b] H_2k = [(a + b) H_k,
    (a − b) H_k]), then the ±1 core mixes the segments, H_K X (inverse: H_Kᵀ X, T being orthonormal). Plain
    autograd, no in-place step: the reference `wht` is tested against, and the adapter's reference forward."""
    n = x.shape[-1]
    K, P = factorize(n)
    y = x.reshape(*x.shape[:-1], K, P)                                  # (..., K, P): row k·P + p is y[k, p]
    h = P
    while h > 1:                                                        # halves a, b of every block of h
        y = y.unflatten(-1, (P // h, 2, h // 2))                        # (..., K, P/h, 2, h/2)
        a, b = y.select(-2, 0), y.select(-2, 1)
        y = torch.stack([a + b, a - b], -2).flatten(-3)                 # (..., K, P)
        h //= 2
    HK = _core(K).to(device=x.device, dtype=x.dtype)                   # (K, K) ±1
    y = torch.einsum("jk,...kp->...jp", HK.T if inverse else HK, y)     # H_K Y (inverse: H_Kᵀ Y)
    return (y / math.sqrt(n)).reshape(x.shape)


def fwht_butterfly_(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Sylvester transform x ↦ x H_P along the last dim (P = 2^p), in place: log2 P radix-2
    passes of adds and subtracts on views. wht_reference's butterfly in place: the benchmark's baseline."""
    P = x.shape[-1]
    if not _is_pow2(P):
        raise ValueError(f"fwht_butterfly_: last dim must be a power of two, got {P}")
    v = x.view(-1, P)
    h = P // 2
    tmp = torch.empty(v.shape[0], P // 2, dtype=x.dtype, device=x.device)
    while h >= 1:
        w = v.view(v.shape[0], -1, 2, h)
        a, b = w[:, :, 0], w[:, :, 1]
        t = tmp.view(v.shape[0], -1, h)
        t.copy_(a)
        a.add_(b)
        torch.sub(t, b, out=b)  # elementwise, so writing b from b is safe
        h //= 2
    return x


# ----------------------------------------------------------------------------------------------------
# The cores: ±1 Hadamard matrices (int64, unnormalized)

# Orders of the Kronecker core and how each is built (q = the finite field's size).
_PALEY_I = {12: 11, 20: 19, 60: 59, 108: 107, 140: 139}
_PALEY_II = {28: 13, 36: 17, 52: 25}

# Williamson quadruples: first rows of four symmetric circulant ±1 matrices A, B, C, D of order m with
# AAᵀ + BBᵀ + CCᵀ + DDᵀ = 4m·I (Williamson 1944). Data (not code) as tabulated in SageMath's
# hadamard_matrix.py: m = 43 from Hall, "Combinatorial Theory" (1983), m = 39 from Londoño (2013). Found by
# search, not by a formula, so they are stored; `_core` checks H Hᵀ = K·I in integers on every build and the
# tests check it again.
_WILLIAMSON = {
    39: ("+++--+-+-----+--++----++--+-----+-+--++", "+++--++-+---+-+--+----+--+-+---+-++--++",
         "++++---+--++----+-+--+-+----++--+---+++", "+---++-+-+-----+++-++-+++-----+-+-++---"),
    43: ("++---++++-+--+--++--------++--+--+-++++---+", "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
         "++-++++++----+-+--++-++-++--+-+----++++++-+", "+---++--++++-+-+++-++--++-+++-+-++++--++---"),
}


def sylvester(P: int) -> torch.Tensor:
    """Sylvester's ±1 matrix of order P = 2^p (eq. 10): H_2k = [[H_k, H_k], [H_k, -H_k]] = H_2 ⊗ H_k."""
    if not _is_pow2(P):
        raise ValueError(f"Sylvester order must be a power of two, got {P}")
    H = torch.ones(1, 1, dtype=torch.int64)
    while H.shape[0] < P:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _gf_tables(q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GF(q), q = p^k with k ≤ 3: elements coded 0..q-1 by their base-p digits (polynomial coefficients).
    Returns (sub (q,q): code of a - b, square (q,) bool: is a nonzero square)."""
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k = round(math.log(q, p))
    if p ** k != q or k > 3:
        raise ValueError(f"GF({q}): need a prime power p^k with k <= 3")
    digits = [[(a // p ** i) % p for i in range(k)] for a in range(q)]
    # monic irreducible f = x^k + c_{k-1}x^{k-1} + ... + c_0: for k <= 3, irreducible <=> no root in GF(p)
    def has_root(c):
        return any((pow(x, k, p) + sum(ci * pow(x, i, p) for i, ci in enumerate(c))) % p == 0 for x in range(p))
    f = next(digits[a] for a in range(q) if k == 1 or not has_root(digits[a]))

    def mul(a, b):
        prod = [0] * (2 * k - 1)
        for i, ai in enumerate(digits[a]):
            for j, bj in enumerate(digits[b]):
                prod[i + j] = (prod[i + j] + ai * bj) % p
        for deg in range(2 * k - 2, k - 1, -1):  # reduce x^deg = -(f - x^k) x^(deg-k)
            c, prod[deg] = prod[deg], 0
            for i, fi in enumerate(f):
                prod[deg - k + i] = (prod[deg - k + i] - c * fi) % p
        return sum(v * p ** i for i, v in enumerate(prod[:k]))

    code = lambda d: sum(v * p ** i for i, v in enumerate(d))  # noqa: E731
    sub = torch.tensor([[code([(x - y) % p for x, y in zip(digits[a], digits[b])]) for b in range(q)]
                        for a in range(q)])
    square = torch.zeros(q, dtype=torch.bool)
    square[[mul(a, a) for a in range(1, q)]] = True
    return sub, square


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(a_j - a_i) with χ the quadratic character of GF(q) (χ(0) = 0)."""
    sub, square = _gf_tables(q)
    d = sub.T  # d[i, j] = a_j - a_i
    Q = torch.where(square[d], 1, -1)
    Q[d == 0] = 0
    return Q.to(torch.int64)


def paley_i(q: int) -> torch.Tensor:
    """Paley I, order q + 1 for q ≡ 3 (mod 4): H = I + [[0, 1ᵀ], [-1, Q]] (Q skew)."""
    if q % 4 != 3:
        raise ValueError(f"Paley I needs q ≡ 3 (mod 4), got q = {q}")
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
    return S + torch.eye(q + 1, dtype=torch.int64)


def paley_ii(q: int) -> torch.Tensor:
    """Paley II, order 2(q + 1) for q ≡ 1 (mod 4): C = [[0, 1ᵀ], [1, Q]] (symmetric conference matrix),
    H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]."""
    if q % 4 != 1:
        raise ValueError(f"Paley II needs q ≡ 1 (mod 4), got q = {q}")
    C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _jacobsthal(q)
    a = torch.tensor([[1, 1], [1, -1]])
    b = torch.tensor([[1, -1], [-1, -1]])
    return torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)


def williamson(rows: tuple[str, str, str, str]) -> torch.Tensor:
    """Williamson array [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]], order 4m,
    from the first rows (± strings) of four circulants."""
    def circ(s):
        r = torch.tensor([1 if ch == "+" else -1 for ch in s])
        m = r.numel()
        idx = (torch.arange(m)[None, :] - torch.arange(m)[:, None]) % m
        return r[idx]  # row i is r shifted right by i
    A, B, C, D = (circ(s) for s in rows)
    return torch.cat([torch.cat(blk, 1) for blk in
                      ([A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A])], 0)


@functools.cache
def _core(K: int) -> torch.Tensor:
    if K == 1:
        H = torch.ones(1, 1, dtype=torch.int64)
    elif K in _PALEY_I:
        H = paley_i(_PALEY_I[K])
    elif K in _PALEY_II:
        H = paley_ii(_PALEY_II[K])
    elif K == 40:
        H = torch.kron(_core(20), sylvester(2))
    elif K // 4 in _WILLIAMSON and K % 4 == 0:
        H = williamson(_WILLIAMSON[K // 4])
    else:
        raise ValueError(f"no Hadamard core of order {K}; supported orders: {SUPPORTED_K}")
    if H.shape != (K, K) or not bool(((H == 1) | (H == -1)).all()) or not torch.equal(
            H @ H.T, K * torch.eye(K, dtype=torch.int64)):
        raise RuntimeError(f"internal error: Hadamard core of order {K} fails H Hᵀ = {K}·I")
    return H


# ----------------------------------------------------------------------------------------------------
# Fast paths. `wht` views a row as the tensor (K, f_1, ..., f_r) (_plan) and maps one axis per stage with a
# batched GEMM against a small ±1 block, each stage writing its axis to the front so the next one reads a
# contiguous last axis (_apply_stage); rows go through _CHUNK_ELEMS at a time with two chunk buffers, so wht_
# overwrites its input with bounded extra memory.

# Largest Sylvester block applied as one GEMM, and rows per chunk ≈ _CHUNK_ELEMS / n (CPU): radix 16 needs fewer
# flops per element than 32 or 64 at the same number of passes for the LLaMA widths; large chunks keep the number
# of parallel regions (each a scheduling cost on a loaded machine) small.
_RADIX = 16
_CHUNK_ELEMS = 1 << 22


class _WHT(torch.autograd.Function):
    """y = x Tᵀ (inverse: x T); the backward of a linear map is its transpose: ḡ = g T (inverse: g Tᵀ)."""

    @staticmethod
    def forward(ctx, x, inverse):
        ctx.inverse = inverse
        return _transform(x, inverse)

    @staticmethod
    def backward(ctx, g):
        return _WHT.apply(g, not ctx.inverse), None


class _WHTInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, inverse):
        ctx.inverse = inverse
        _transform(x, inverse, out=x)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, g):
        return _WHT.apply(g, not ctx.inverse), None


def wht(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x Tᵀ along the last dim (inverse=True: x T = x T⁻ᵀ), T = hadamard_matrix(x.shape[-1]); any leading
    shape; fp32/fp64, and fp16/bf16 computed in fp32 (one rounding on output). Differentiable."""
    return _WHT.apply(x, bool(inverse))


def wht_(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """In-place wht: overwrites x with x Tᵀ (or x T) using O(rows-per-chunk · n) workspace; returns x."""
    return _WHTInplace.apply(x, bool(inverse))


def _split_pow2(P: int, radix: int) -> list[int]:
    """P = f_1···f_r, each a power of two ≤ radix, as even as possible (largest first); [] for P = 1."""
    p, r = P.bit_length() - 1, radix.bit_length() - 1
    if p == 0:
        return []
    k = -(-p // r)
    return [1 << (p // k + (i < p % k)) for i in range(k)]


@functools.lru_cache(maxsize=256)
def _plan(n: int, inverse: bool, dtype: torch.dtype, device: torch.device) -> tuple:
    """Stages (d, M) of x ↦ x Tᵀ (inverse: x T), in order of application, each mapping one axis of size d of
    the row tensor (K, f_1, ..., f_r) by v ↦ M v. 1/√n is folded into the first stage's M."""
    K, P = factorize(n)
    dims = [K] + _split_pow2(P, _RADIX)
    mats = [_core(K).T if inverse else _core(K)] + [sylvester(f) for f in dims[1:]]
    stages = [[d, M.to(torch.float64)] for d, M in zip(reversed(dims), reversed(mats)) if d > 1]
    if not stages:  # n = 1
        stages = [[1, torch.ones(1, 1, dtype=torch.float64)]]
    stages[0][1] = stages[0][1] / math.sqrt(n)
    return tuple((d, M.to(device=device, dtype=dtype).contiguous()) for d, M in stages)


def _apply_stage(stage: tuple, src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[a] = M @ src[a]ᵀ with src[a] viewed (n/d, d) and dst[a] (d, n/d): transforms the last axis and rotates
    it to the front, so after one stage per axis the row is back in its (K, f_1, ..., f_r) order. One batched
    GEMM per stage (the transposed operand is a strided view, not a copy)."""
    d, M = stage
    A, n = src.shape
    torch.bmm(M.expand(A, d, d), src.view(A, n // d, d).transpose(1, 2), out=dst.view(A, d, n // d))


def _compute_dtype(x: torch.Tensor, who: str) -> torch.dtype:
    """The dtype the transform computes in for x (fp64 for fp64, else fp32); raises for any other dtype."""
    if not (x.is_floating_point() and x.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)):
        raise ValueError(f"{who}: expected a float32/float64/float16/bfloat16 tensor, got {x.dtype}")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _transform_into(x: torch.Tensor, out: torch.Tensor, inverse: bool) -> None:
    """out (m, n) ← x (m, n) Tᵀ (or x T); x and out contiguous, same device; out may be x (in place).
    Computes in fp32 (fp64 for fp64 inputs), chunk by chunk of rows with a fixed workspace."""
    m, n = x.shape
    cdt = _compute_dtype(x, "wht")
    stages = _plan(n, inverse, cdt, x.device)
    rows = max(1, min(m, _CHUNK_ELEMS // n))
    direct = x.dtype == cdt and out.dtype == cdt
    work = [torch.empty(rows, n, dtype=cdt, device=x.device) for _ in range(2 if direct else 3)]
    for s in range(0, m, rows):
        e = min(m, s + rows)
        src = x[s:e] if direct else work[2][: e - s].copy_(x[s:e])
        dst = (src if out.data_ptr() == x.data_ptr() else out[s:e]) if direct else src
        bufs = [w[: e - s] for w in work[:2]]
        cur = src
        for i, st in enumerate(stages):
            if i == len(stages) - 1 and cur is not dst:
                tgt = dst
            else:
                tgt = bufs[0] if cur is not bufs[0] else bufs[1]
            _apply_stage(st, cur, tgt)
            cur = tgt
        if direct and cur is not dst:
            dst.copy_(cur)
        elif not direct:
            out[s:e].copy_(cur)


# ----------------------------------------------------------------------------------------------------
# CUDA dispatch: kernels/wht_cuda.py may provide `load() -> fn or None`, where
# fn(x2d, core, inverse) -> x2d Tᵀ (or x2d T) for x2d (m, n) contiguous on CUDA, core = H_K (K, K) fp32 on the
# same device, same dtype out as in. Without it (or with QWHA_DISABLE_CUDA_WHT=1) the pure-torch path runs.


@functools.lru_cache(maxsize=1)
def _load_cuda_kernel():
    """kernels/wht_cuda.py's load(), imported by path (it is not a module of the installed package); None when the
    file is absent, a warning (once) and None when the build fails."""
    path = Path(__file__).resolve().with_name("kernels") / "wht_cuda.py"
    if not path.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location("qwha_kernels_wht_cuda", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.load()
    except Exception as e:  # a failed build must not break the pure-torch path
        warnings.warn(f"wht: CUDA kernel kernels/wht_cuda.py unavailable ({e}); using the pure-torch path")
        return None


def _cuda_wht():
    """The CUDA kernel's entry point, or None (not built/available, or QWHA_DISABLE_CUDA_WHT=1)."""
    if os.environ.get("QWHA_DISABLE_CUDA_WHT", "0") not in ("", "0"):
        return None
    if not torch.cuda.is_available():
        return None
    return _load_cuda_kernel()


def _transform(x: torch.Tensor, inverse: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """x Tᵀ (inverse: x T) along the last dim, into `out` (may be x itself) or a new tensor."""
    _compute_dtype(x, "wht")
    if x.dim() == 0:
        raise ValueError("wht: expected at least one dimension (the transformed one is the last)")
    n = x.shape[-1]
    factorize(n)  # raises for an unsupported width
    if x.numel() == 0:
        return x if out is None else out
    if x.is_cuda:
        fn = _cuda_wht()
        if fn is not None and x.dtype != torch.float64:
            K, _ = factorize(n)
            y = fn(x.reshape(-1, n).contiguous(), _core(K), inverse)  # None: a width the kernel does not take
            if y is not None:
                y = y.view(x.shape)
                return y if out is None else out.copy_(y)
    x2 = x.reshape(-1, n)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if out is None:
        res = torch.empty_like(x2)
        _transform_into(x2, res, inverse)
        return res.view(x.shape)
    o2 = out.view(-1, n) if out.is_contiguous() else None
    if o2 is not None and (out is not x or x2.data_ptr() == out.data_ptr()):
        _transform_into(x2, o2, inverse)
    else:  # strided target: compute, then copy back
        res = torch.empty_like(x2)
        _transform_into(x2, res, inverse)
        out.copy_(res.view(x.shape))
    return out


# ----------------------------------------------------------------------------------------------------
# Transposing transforms (the adapter's merged training path): one plain GEMM per Kronecker factor over all rows at
# once, each moving its axis across the row index, so the result comes out transposed. For callers that make or
# use the transposed operand for free (a scatter, a GEMM's output or operand layout), this skips both the
# batched small GEMMs of `wht` and any transposed copy.


def _check_2d(x: torch.Tensor, who: str) -> torch.dtype:
    if x.dim() != 2:
        raise ValueError(f"{who}: expected a 2-D tensor, got shape {tuple(x.shape)}")
    return _compute_dtype(x, who)


@functools.lru_cache(maxsize=256)
def _plan_from_t(n: int, inverse: bool, dtype: torch.dtype, device: torch.device) -> tuple:
    """wht_from_t's stages (d, Mᵀ), one per axis of the row tensor (K·2^i, f_1, ..., f_r), in that order, 1/√n
    folded into the first. The grouping minimises Σ d + 16 per stage with every f a power of two in [16, 128]
    and no axis below 12 (unless there is only one): as the transposed left operand of a GEMM, an axis of 8 or
    less runs several times slower per element on MKL than 12 to 32."""
    K, P = factorize(n)
    p = P.bit_length() - 1
    best = None
    for i in range(p + 1):                          # 2^i of the Sylvester part goes into the core's axis
        q = p - i
        counts = [1] if 0 < q < 4 else range(-(-q // 7), q // 4 + 1) if q else [0]
        for k in counts:
            fs = [1 << (q // k + (j < q % k)) for j in range(k)] if k else []
            dims = [d for d in [K << i] + fs if d > 1]
            cost = sum(dims) + 16 * len(dims)
            if len(dims) > 1 and min(dims) < 12:
                continue
            if best is None or cost < best[0]:
                best = (cost, K << i, fs)
    _, a1, fs = best
    core = torch.kron((_core(K).T if inverse else _core(K)).contiguous(), sylvester(a1 // K))
    stages = [[d, M.to(torch.float64)] for d, M in zip([a1] + fs, [core] + [sylvester(f) for f in fs]) if d > 1]
    if not stages:  # n = 1
        stages = [[1, torch.ones(1, 1, dtype=torch.float64)]]
    stages[0][1] = stages[0][1] / math.sqrt(n)
    return tuple((d, M.T.to(device=device, dtype=dtype).contiguous()) for d, M in stages)


def wht_from_t(xt: torch.Tensor, inverse: bool = False, *, clobber: bool = False,
               out: torch.Tensor | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    """x Tᵀ (inverse: x T) for x = xtᵀ, given as its transpose xt (n, A); returns (A, n) contiguous.

    xt's leading axis, as the row tensor (K·2^i, f_1, ..., f_r), goes through one GEMM (rest, d) @ (d, d) per
    axis, each moving its axis from first to last, so after the last one the result is in (A, n) order.
    clobber=True lets it use xt's memory as workspace (the result may share it); `out` (A, n), if given, receives
    the result (written by the last GEMM when it is contiguous in the compute dtype); `add` (A, n), if given, is
    added to the result by the last GEMM (addmm: no separate pass). fp32/fp64 in their own dtype, fp16/bf16 in
    fp32 with one rounding on output. Not differentiable (wht is)."""
    cdt = _check_2d(xt, "wht_from_t")
    n, A = xt.shape
    factorize(n)
    stages = _plan_from_t(n, inverse, cdt, xt.device)
    if add is not None:
        if tuple(add.shape) != (A, n):
            raise ValueError(f"wht_from_t: add has shape {tuple(add.shape)}, expected {(A, n)}")
        add = add if add.dtype == cdt and add.is_contiguous() else add.to(cdt).contiguous()

    def apply(cur, d, M, tgt, last):                                    # (rest, d): axis d moved first -> last
        if last and add is not None:
            torch.addmm(add.view(-1, d), cur.view(d, -1).T, M, out=tgt.view(-1, d))
        else:
            torch.mm(cur.view(d, -1).T, M, out=tgt.view(-1, d))
    return _run_stages(xt, cdt, (A, n), stages, clobber, out, apply)


def wht_to_t(x: torch.Tensor, inverse: bool = False, *, clobber: bool = False,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """(x Tᵀ)ᵀ (inverse: (x T)ᵀ) for x (A, n); returns the transposed result (n, A) contiguous.

    The row tensor (K, f_1, ..., f_r) with radix-16 factors, as `wht`; one GEMM (d, d) @ (d, rest) per axis,
    each moving its axis from last to first (the fast orientation for small d), so after the last one the
    result is in (n, A) order. clobber, out (n, A) and dtypes as wht_from_t."""
    cdt = _check_2d(x, "wht_to_t")
    A, n = x.shape
    factorize(n)
    stages = _plan(n, inverse, cdt, x.device)                          # last axis first
    return _run_stages(x, cdt, (n, A), stages, clobber, out,
                       lambda cur, d, M, tgt, last: torch.mm(M, cur.view(-1, d).T, out=tgt.view(d, -1)))


def _run_stages(x, cdt, shape, stages, clobber, out, apply):
    """Apply `stages` ((d, M) each, through apply(cur, d, M, target, is_last)) ping-ponging between x (when it
    may be overwritten) and at most two buffers, the last stage straight into `out` when that is possible."""
    cur = x if x.dtype == cdt and x.is_contiguous() else x.to(cdt).contiguous()
    size = cur.numel()
    direct = out is not None and out.dtype == cdt and out.is_contiguous()
    if out is not None and tuple(out.shape) != tuple(shape):
        raise ValueError(f"wht: out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if size == 0:
        res = cur.new_empty(shape)
    else:
        bufs = [None, cur if (clobber or cur is not x) else None]
        for i, (d, M) in enumerate(stages):
            if i == len(stages) - 1 and direct:
                tgt = out
            else:
                if bufs[i % 2] is None:
                    bufs[i % 2] = torch.empty(size, dtype=cdt, device=x.device)
                tgt = bufs[i % 2]
            apply(cur, d, M, tgt, i == len(stages) - 1)
            cur = tgt
        res = cur.view(shape)
    if out is None:
        return res if res.dtype == x.dtype else res.to(x.dtype)
    if res.data_ptr() != out.data_ptr():
        out.copy_(res)
    return out
