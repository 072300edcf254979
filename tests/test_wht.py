"""Tests for wht.py: Hadamard matrices of every supported width, the textbook wht_reference and the fast transform
(docs/method.md eqs. 10–12).

References are built independently here: Sylvester's matrix by the textbook block recursion, the transform by
a recursive fp64 FWHT followed by an einsum with the integer-verified core, and dense products with the
explicit matrix for widths up to 1024. The fast transform is tested against all of them and against wht_reference.
"""
import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import wht

MAX_N = 14336
WIDTHS = sorted({k << p for k in wht.SUPPORTED_K for p in range(15) if (k << p) <= MAX_N})
SMALL = [n for n in WIDTHS if n <= 1024]  # checked against the dense matrix
LARGE = [n for n in WIDTHS if n > 1024]  # checked against the fp64 Kronecker reference
LLAMA = [576, 1536, 3072, 4096, 5120, 8192, 11008, 13824, 14336]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@functools.cache
def sylvester_ref(P: int) -> torch.Tensor:
    """scipy.linalg.hadamard-style recursion, fp64."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < P:
        H = torch.vstack([torch.hstack([H, H]), torch.hstack([H, -H])])
    return H


def fwht_ref(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized x H_P along the last dim by the recursion H_2k = [[H_k, H_k], [H_k, -H_k]]."""
    P = x.shape[-1]
    if P == 1:
        return x
    a, b = fwht_ref(x[..., : P // 2]), fwht_ref(x[..., P // 2:])
    return torch.cat([a + b, a - b], -1)


def transform_ref(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x Tᵀ (or x T) in fp64 through the Kronecker structure T = (H_K ⊗ H_P)/√n."""
    n = x.shape[-1]
    K, P = wht.factorize(n)
    HK = wht.hadamard_core(K).double()
    y = fwht_ref(x.double().reshape(-1, K, P))
    y = torch.einsum("jk,mkp->mjp", HK.T if inverse else HK, y)
    return (y / math.sqrt(n)).reshape(x.shape)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------- matrices


@pytest.mark.parametrize("K", wht.SUPPORTED_K)
def test_core_is_hadamard_exactly(K):
    H = wht.hadamard_core(K)
    assert H.shape == (K, K) and H.dtype == torch.int64
    assert bool(((H == 1) | (H == -1)).all())
    assert torch.equal(H @ H.T, K * torch.eye(K, dtype=torch.int64))


@pytest.mark.parametrize("q", [3, 7, 11, 19, 23, 27, 43])
def test_paley_i_over_prime_and_prime_power_fields(q):
    H = wht.paley_i(q)  # 27 = 3^3 exercises GF(p^k) arithmetic with k = 3
    assert torch.equal(H @ H.T, (q + 1) * torch.eye(q + 1, dtype=torch.int64))


@pytest.mark.parametrize("q", [5, 9, 13, 17, 25, 29])
def test_paley_ii_over_prime_and_prime_power_fields(q):
    H = wht.paley_ii(q)
    assert torch.equal(H @ H.T, 2 * (q + 1) * torch.eye(2 * (q + 1), dtype=torch.int64))


def test_paley_rejects_wrong_residue():
    with pytest.raises(ValueError, match="3 \\(mod 4\\)"):
        wht.paley_i(13)
    with pytest.raises(ValueError, match="1 \\(mod 4\\)"):
        wht.paley_ii(11)


def test_williamson_rows_are_symmetric_circulants():
    for m, rows in wht._WILLIAMSON.items():
        assert all(len(r) == m and r[1:] == r[1:][::-1] for r in rows)


def test_sylvester_matches_independent_recursion():
    for p in range(9):
        assert torch.equal(wht.sylvester(1 << p).double(), sylvester_ref(1 << p))
    T = wht.hadamard_matrix(256, dtype=torch.float64)
    assert torch.allclose(T, sylvester_ref(256) / 16, atol=0, rtol=1e-15)


def test_factorize_llama_widths():
    assert wht.factorize(576) == (36, 16)
    assert wht.factorize(1536) == (12, 128)
    assert wht.factorize(4096) == (1, 4096)
    assert wht.factorize(5120) == (20, 256)  # 40·128 is the same matrix: H_40 = H_20 ⊗ H_2
    assert wht.factorize(11008) == (172, 64)
    assert wht.factorize(13824) == (108, 128)
    assert wht.factorize(14336) == (28, 512)
    assert torch.equal(wht.hadamard_core(40), torch.kron(wht.hadamard_core(20), wht.sylvester(2)))


@pytest.mark.parametrize("n", [0, -8, 3, 5, 6, 7, 9, 10, 14, 18, 22, 44, 100, 210, 2880])
def test_unsupported_widths_raise(n):
    with pytest.raises(ValueError, match=f"width {n}"):
        wht.factorize(n)
    with pytest.raises(ValueError, match=f"width {n}"):
        wht.hadamard_matrix(n)
    if n > 0:
        with pytest.raises(ValueError, match=f"width {n}"):
            wht.wht(torch.zeros(2, n))


def test_non_int_width_raises():
    for bad in (4.0, True, "64"):
        with pytest.raises(ValueError, match="positive int"):
            wht.factorize(bad)


def test_dense_matrix_and_wht_every_small_width():
    """T = (H_K ⊗ H_P)/√n exactly (H_P built independently), so entries are ±1/√n; T Tᵀ = I to fp32
    tolerance; wht(x) = x Tᵀ and wht(x, inverse=True) = x T. Larger widths: exact core + Sylvester + kron,
    and the Kronecker reference below."""
    g = torch.Generator().manual_seed(0)
    for n in SMALL:
        T = wht.hadamard_matrix(n)
        K, P = wht.factorize(n)
        assert torch.equal(T, torch.kron(wht.hadamard_core(K).float(), sylvester_ref(P).float())
                           * (1 / math.sqrt(n))), n
        assert torch.allclose(T @ T.T, torch.eye(n), atol=1e-5, rtol=0), n
        x = torch.randn(3, n, generator=g)
        assert rel_err(wht.wht(x), x @ T.T) < TOL[torch.float32], n
        assert rel_err(wht.wht(x, inverse=True), x @ T) < TOL[torch.float32], n


# ---------------------------------------------------------------------------------------------- reference


def test_reference_is_the_dense_matrix_every_small_width():
    """wht_reference (the butterfly and the core, eq. 11) equals x Tᵀ and x T with the explicit matrix, and the
    independent Kronecker recursion of this file, in fp64."""
    g = torch.Generator().manual_seed(10)
    for n in SMALL:
        T = wht.hadamard_matrix(n, dtype=torch.float64)
        x = torch.randn(2, 3, n, generator=g, dtype=torch.float64)
        for inverse in (False, True):
            ref = wht.wht_reference(x, inverse=inverse)
            assert ref.shape == x.shape and ref.dtype == x.dtype
            assert torch.allclose(ref, x @ (T if inverse else T.T), atol=1e-12, rtol=0), (n, inverse)
            assert torch.allclose(ref, transform_ref(x, inverse), atol=1e-12, rtol=0), (n, inverse)


REF_WIDTHS = [1, 2, 12, 24, 48, 96, 192, 40, 80, 172, 344, 576, 1536, 3072]


@settings(max_examples=25, deadline=None)
@given(n=st.sampled_from(REF_WIDTHS), m=st.integers(1, 4), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_hyp_fast_wht_equals_reference(n, m, dtype, seed):
    """The fast transform (radix-16 plan, chunks) equals the textbook one, forward and inverse, and the reference
    is orthonormal: norm kept, the inverse undoes the forward."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)
    for inverse in (False, True):
        ref = wht.wht_reference(x, inverse=inverse)
        assert rel_err(wht.wht(x, inverse=inverse), ref) < TOL[dtype], (n, inverse)
    y = wht.wht_reference(x.double())
    assert torch.allclose(y.norm(dim=-1), x.double().norm(dim=-1), rtol=1e-12)
    assert torch.allclose(wht.wht_reference(y, inverse=True), x.double(), atol=1e-12)


def test_reference_gradient_is_the_transpose():
    """wht_reference is plain autograd: its gradient is the inverse transform, as wht's hand-written backward."""
    g = torch.Generator().manual_seed(11)
    for n, inverse in ((12, False), (96, True), (576, False)):
        x = torch.randn(3, n, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(3, n, generator=g, dtype=torch.float64)
        (wht.wht_reference(x, inverse=inverse) * w).sum().backward()
        assert torch.allclose(x.grad, wht.wht(w, inverse=not inverse), atol=1e-12)


# ---------------------------------------------------------------------------------------------- transform


@pytest.mark.parametrize("n", LARGE)
def test_wht_large_widths_against_structured_reference(n):
    """Every supported width up to 14336, fp32 against the fp64 Kronecker reference; orthogonality of the
    full T follows from the exact core test and Sylvester, and is checked here on random vectors."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, generator=g)
    y = wht.wht(x)
    assert rel_err(y, transform_ref(x)) < TOL[torch.float32]
    assert rel_err(wht.wht(x, inverse=True), transform_ref(x, inverse=True)) < TOL[torch.float32]
    assert rel_err(wht.wht(y, inverse=True), x) < TOL[torch.float32]
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


@pytest.mark.parametrize("n", [3072, 5120, 11008])
def test_wht_columns_equal_hadamard_matrix_large(n):
    """wht(e_j) = e_j Tᵀ = column j of hadamard_matrix(n) (a few columns, including the Williamson core)."""
    T = wht.hadamard_matrix(n)
    cols = torch.tensor([0, 1, n // 3, n - 1])
    E = torch.zeros(len(cols), n)
    E[torch.arange(len(cols)), cols] = 1
    assert rel_err(wht.wht(E), T[:, cols].T) < TOL[torch.float32]
    assert rel_err(wht.wht(E, inverse=True), T[cols]) < TOL[torch.float32]


def test_llama_widths_error_bounds():
    """Error bounds on the model widths: fp32 < 1e-5 relative, bf16 < 1e-2 relative vs exact."""
    g = torch.Generator().manual_seed(1)
    for n in LLAMA:
        x = torch.randn(4, n, generator=g)
        ref = transform_ref(x)
        assert rel_err(wht.wht(x), ref) < 1e-5, n
        xb = x.bfloat16()
        assert rel_err(wht.wht(xb).float(), transform_ref(xb.float())) < 1e-2, n


widths = st.sampled_from([1, 2, 4, 12, 20, 24, 28, 36, 40, 52, 60, 64, 80, 108, 140, 156, 172, 288, 344, 576])
dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])
leads = st.lists(st.integers(1, 4), min_size=0, max_size=3)


@settings(max_examples=30, deadline=None)
@given(n=widths, lead=leads, dtype=dtypes, inverse=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_hyp_matches_dense_any_shape_dtype(n, lead, dtype, inverse, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, generator=g).to(dtype)
    T = wht.hadamard_matrix(n, dtype=torch.float64)
    y = wht.wht(x, inverse=inverse)
    assert y.shape == x.shape and y.dtype == dtype
    ref = x.double() @ (T if inverse else T.T)
    assert rel_err(y, ref) < TOL[dtype]
    z = x.clone()
    out = wht.wht_(z, inverse=inverse)
    assert out is z and torch.equal(z, y)  # same arithmetic in place and out of place


@settings(max_examples=20, deadline=None)
@given(n=widths, m=st.integers(1, 5), a=st.floats(-3, 3), b=st.floats(-3, 3), seed=st.integers(0, 2**31 - 1))
def test_hyp_linearity_parseval_inverse(n, m, a, b, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, m, n, generator=g, dtype=torch.float64)
    assert torch.allclose(wht.wht(a * x + b * y), a * wht.wht(x) + b * wht.wht(y), atol=1e-10)
    assert torch.allclose(wht.wht(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    assert torch.allclose(wht.wht(wht.wht(x), inverse=True), x, atol=1e-12)
    assert torch.allclose(wht.wht(wht.wht(x, inverse=True)), x, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(n=widths, seed=st.integers(0, 2**31 - 1))
def test_hyp_non_contiguous_input(n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 6, generator=g, dtype=torch.float64)
    x = base.T  # (6, n), non-contiguous
    assert torch.allclose(wht.wht(x), transform_ref(x), atol=1e-12)
    z = base.clone().T
    wht.wht_(z)
    assert torch.allclose(z, transform_ref(x), atol=1e-12)


def test_asymmetric_core_inverse_is_transpose():
    """For K > 1, T is not symmetric: the inverse must use Tᵀ, and applying the forward twice is not identity."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 12 * 8, generator=g, dtype=torch.float64)
    assert not torch.allclose(wht.wht(wht.wht(x)), x, atol=1e-3)
    assert torch.allclose(wht.wht(wht.wht(x), inverse=True), x, atol=1e-12)


@pytest.mark.parametrize("n", [12, 40, 96, 172, 11008])
@pytest.mark.parametrize("inverse", [False, True])
def test_gradient_equals_dense_gradient(n, inverse):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, n, generator=g, dtype=torch.float64)
    (wht.wht(x, inverse=inverse) * w).sum().backward()
    # d/dx <x Tᵀ, w> = w T, i.e. the inverse transform of w (and vice versa)
    assert torch.allclose(x.grad, transform_ref(w, inverse=not inverse), atol=1e-12)
    if n <= 172:
        T = wht.hadamard_matrix(n, dtype=torch.float64)
        assert torch.allclose(x.grad, w @ (T.T if inverse else T), atol=1e-12)


def test_gradcheck_and_double_backward():
    x = torch.randn(2, 12, generator=torch.Generator().manual_seed(8), dtype=torch.float64, requires_grad=True)
    for inverse in (False, True):
        assert torch.autograd.gradcheck(lambda t: wht.wht(t, inverse=inverse), (x,))
        assert torch.autograd.gradgradcheck(lambda t: wht.wht(t, inverse=inverse), (x,))


def test_inplace_autograd_on_non_leaf():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 80, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 80, generator=g, dtype=torch.float64)
    h = x * 2
    out = wht.wht_(h)
    assert out is h
    (out * w).sum().backward()
    T = wht.hadamard_matrix(80, dtype=torch.float64)
    assert torch.allclose(x.grad, 2 * w @ T, atol=1e-12)


def test_inplace_on_strided_view_writes_through():
    g = torch.Generator().manual_seed(4)
    buf = torch.randn(5, 2 * 48, generator=g, dtype=torch.float64)
    orig = buf.clone()
    wht.wht_(buf[:, ::2])  # every other column: a non-contiguous view
    assert torch.allclose(buf[:, ::2], transform_ref(orig[:, ::2]), atol=1e-12)
    assert torch.equal(buf[:, 1::2], orig[:, 1::2])


def test_many_rows_cross_chunk_boundaries(monkeypatch):
    """More rows than one workspace chunk holds (and a ragged last chunk), in and out of place."""
    n = 96
    monkeypatch.setattr(wht, "_CHUNK_ELEMS", 5 * n)
    m = 3 * 5 + 2
    g = torch.Generator().manual_seed(5)
    x = torch.randn(m, n, generator=g)
    ref = transform_ref(x)
    assert rel_err(wht.wht(x), ref) < TOL[torch.float32]
    z = x.clone()
    wht.wht_(z)
    assert rel_err(z, ref) < TOL[torch.float32]
    zb = x.bfloat16()
    wht.wht_(zb)
    assert rel_err(zb, transform_ref(x.bfloat16())) < TOL[torch.bfloat16]


def test_empty_and_bad_dtype():
    assert wht.wht(torch.zeros(0, 12)).shape == (0, 12)
    with pytest.raises(ValueError, match="float"):
        wht.wht(torch.zeros(2, 12, dtype=torch.int64))
    with pytest.raises(ValueError, match="dimension"):
        wht.wht(torch.tensor(1.0))


def test_textbook_butterfly_matches_sylvester():
    g = torch.Generator().manual_seed(6)
    for P in (1, 2, 8, 64, 512):
        x = torch.randn(3, P, generator=g, dtype=torch.float64)
        y = x.clone()
        assert wht.fwht_butterfly_(y) is y
        assert torch.allclose(y, x @ sylvester_ref(P), atol=1e-11)
    with pytest.raises(ValueError, match="power of two"):
        wht.fwht_butterfly_(torch.zeros(2, 12))


def test_cuda_dispatch_off_without_kernel(monkeypatch):
    monkeypatch.setenv("QWHA_DISABLE_CUDA_WHT", "1")
    assert wht._cuda_wht() is None
    monkeypatch.delenv("QWHA_DISABLE_CUDA_WHT")
    if not torch.cuda.is_available():
        assert wht._cuda_wht() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    g = torch.Generator().manual_seed(7)
    for n in (576, 1536, 4096, 11008, 14336):
        x = torch.randn(8, n, generator=g).to(dtype)
        for inverse in (False, True):
            y = wht.wht(x.cuda(), inverse=inverse).cpu()
            assert rel_err(y, transform_ref(x, inverse=inverse)) < TOL[dtype], (n, inverse)
