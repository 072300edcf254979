"""Walsh–Hadamard transforms for every LLaMA/Mistral width (METHOD.md eqs. 10–12).

A width n = K·2^p uses the orthonormal matrix T = (H_K ⊗ H_P) / √n, where H_P (P = 2^p) is Sylvester's
matrix and H_K a ±1 Hadamard matrix of order K ∈ {1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172}:

    Sylvester      H_1 = [1], H_2k = [[H_k, H_k], [H_k, -H_k]]           (1, and every 2^p)
    Paley I        q ≡ 3 (mod 4) prime power, order q + 1               (12, 20, 60, 108, 140)
    Paley II       q ≡ 1 (mod 4) prime power, order 2(q + 1)           (28 = 2·14, 36 = 2·18, 52 = 2·26 over GF(25))
    doubling       H_40 = H_20 ⊗ H_2, so H_40 ⊗ H_P = H_20 ⊗ H_2P      (40)
    Williamson     four symmetric circulants of order m, order 4m       (156 = 4·39, 172 = 4·43; tabulated rows)

`wht(x)` computes x Tᵀ along the last dimension without ever forming T: the row is viewed as a tensor
(K, f_1, ..., f_r) with P = f_1···f_r, and since H_P = H_f1 ⊗ ... ⊗ H_fr (Sylvester), T is applied one small
axis at a time, each a GEMM against a ±1 block of order ≤ 64 (a radix-64 butterfly: one pass over memory
does six radix-2 stages). On a CPU this beats both a dense x Tᵀ and the textbook radix-2 butterfly
(`fwht_butterfly_`, kept for reference and for the benchmark) by a wide margin; see bench/bench_wht.py.
Rows are processed in cache-sized chunks with a fixed workspace, so `wht_` overwrites its input in place
with O(chunk) extra memory. fp16/bf16 inputs are transformed in fp32 and rounded once on output.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
import warnings

import torch

SUPPORTED_K = (1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)

# Orders of the Kronecker core and how each is built (q = the finite field's size).
_PALEY_I = {12: 11, 20: 19, 60: 59, 108: 107, 140: 139}
_PALEY_II = {28: 13, 36: 17, 52: 25}

# Williamson quadruples: first rows of four symmetric circulant ±1 matrices A, B, C, D of order m with
# AAᵀ + BBᵀ + CCᵀ + DDᵀ = 4m·I (Williamson 1944). m = 43 from Hall, "Combinatorial Theory" (1983); m = 39 from
# Djoković (1993), as listed by Sloane's library and SageMath. They cannot be derived from a formula, so they
# are stored; `hadamard_core` checks H Hᵀ = K·I in integers on every build and the tests check it again.
_WILLIAMSON = {
    39: ("+++--+-+-----+--++----++--+-----+-+--++", "+++--++-+---+-+--+----+--+-+---+-++--++",
         "++++---+--++----+-+--+-+----++--+---+++", "+---++-+-+-----+++-++-+++-----+-+-++---"),
    43: ("++---++++-+--+--++--------++--+--+-++++---+", "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
         "++-++++++----+-+--++-++-++--+-+----++++++-+", "+---++--++++-+-+++-++--++-+++-+-++++--++---"),
}

# Largest Sylvester block applied as one GEMM, and rows per chunk ≈ _CHUNK_ELEMS / n (tuned in bench/).
_RADIX = 64
_CHUNK_ELEMS = 1 << 18


def _is_pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


def factorize(n: int) -> tuple[int, int]:
    """n = K·P with P a power of two and K in SUPPORTED_K (the smallest such K; 40·P is returned as 20·2P)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"Hadamard width must be a positive int, got {n!r}")
    for k in SUPPORTED_K:
        if n % k == 0 and _is_pow2(n // k):
            return k, n // k
    raise ValueError(
        f"no Hadamard matrix for width {n}: supported widths are K·2^p with K in {SUPPORTED_K} "
        "(e.g. 576 = 36·16, 11008 = 172·64, 14336 = 28·512); nothing is padded or truncated")


# ----------------------------------------------------------------------------------------------------
# ±1 Hadamard matrices (int64, unnormalized)


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


@functools.lru_cache(maxsize=None)
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


def hadamard_core(K: int) -> torch.Tensor:
    """The ±1 matrix H_K (K, K), int64, with H_K H_Kᵀ = K·I (a fresh copy)."""
    return _core(K).clone()


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The orthonormal T (n, n) = (H_K ⊗ H_P) / √n with (K, P) = factorize(n) (eqs. 10–12). T Tᵀ = I."""
    K, P = factorize(n)
    T = torch.kron(_core(K).to(device=device, dtype=dtype), sylvester(P).to(device=device, dtype=dtype))
    return T.mul_(1.0 / math.sqrt(n))
