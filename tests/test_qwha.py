"""qwha.py and qwha_fast.py: the laws of the WHA adapter, AdaAlloc, selection and refinement, against dense
references; each production step equal to its paper-literal reference in qwha.py (qwha.*_reference).

Shapes include the non-power-of-two widths 12·2^p and 36·2^p (24, 48, 72, 96, 144). Everything is small, CPU.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

import adapter
import calib
import qwha
import qwha_fast
import wht

WIDTHS = [8, 16, 24, 32, 48, 64, 72, 96, 144]
SET = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def T_of(n):
    return wht.hadamard_matrix(n, dtype=torch.float64)


def spd(n, g, tokens=None, rank_deficient=False):
    """H = XᵀX/N from correlated random activations with a few outlier channels (like real layers)."""
    N = tokens or 3 * n
    X = torch.randn(N, n, generator=g, dtype=torch.float64)
    X = X @ (torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64))
    X[:, : max(1, n // 16)] *= 8.0
    if rank_deficient:
        X = X[: n // 2]
    return X.T @ X / X.shape[0]


def dense(support, values, m, n):
    F = torch.zeros(m, n, dtype=torch.float64)
    F[support[0], support[1]] = values.to(torch.float64)
    return F


def shapes():
    return st.tuples(st.integers(2, 12), st.sampled_from(WIDTHS), st.integers(0, 2**31 - 1))


# ---------------------------------------------------------------------------------------------- transforms


@SET
@given(shapes())
def test_spectrum_and_hadamard_hessian_match_dense(shape):
    m, n, seed = shape
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(m, n, generator=g, dtype=torch.float64)
    H = spd(n, g)
    T = T_of(n)
    torch.testing.assert_close(qwha.spectrum(E), E @ T.T)
    G = qwha.hadamard_hessian(H)
    torch.testing.assert_close(G, T @ H @ T.T)
    assert torch.equal(G, G.T)
    # G is "H seen in the Hadamard domain": C G Cᵀ has the trace of E H Eᵀ
    C = qwha.spectrum(E)
    torch.testing.assert_close(((C @ G) * C).sum(), ((E @ H) * E).sum())


def test_layer_error_is_output_error():
    g = torch.Generator().manual_seed(1)
    m, n, N = 5, 24, 100
    X = torch.randn(N, n, generator=g, dtype=torch.float64)
    E, D = torch.randn(m, n, generator=g, dtype=torch.float64), torch.randn(m, n, generator=g, dtype=torch.float64)
    H = X.T @ X / N
    want = (X @ (E - D).T).norm() / math.sqrt(N)
    torch.testing.assert_close(qwha.layer_error(E, H, D), want)


# ---------------------------------------------------------------------------------------------- AdaAlloc


@SET
@given(st.integers(1, 60), st.integers(2, 64), st.floats(0.2, 5.0), st.integers(0, 2**31 - 1), st.floats(0, 1))
def test_adaalloc_invariants(m, n, t, seed, frac):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(m, generator=g, dtype=torch.float64) ** 3 * 10
    lo, hi = 2, n
    budget = int(m * lo + frac * (m * hi - m * lo))
    k = qwha.adaalloc(scores, budget, t, lo, hi)
    assert k.dtype == torch.long and k.shape == (m,)
    assert int(k.sum()) == budget
    assert int(k.min()) >= lo and int(k.max()) <= hi
    # more score never gets fewer parameters than less score minus one (here: never fewer at all)
    order = torch.argsort(scores)
    ks = k[order]
    assert bool((ks[1:] >= ks[:-1] - 1).all())
    assert bool((ks[1:] >= ks[:-1]).all())


@SET
@given(st.integers(2, 40), st.floats(0.5, 3.0), st.integers(0, 2**31 - 1))
def test_adaalloc_equals_the_reference_when_no_bound_binds(m, t, seed):
    g = torch.Generator().manual_seed(seed)
    scores = 1 + torch.rand(m, generator=g, dtype=torch.float64)   # within a factor 2: proportional shares
    budget = 50 * m                                                  # ≥ 2, ≤ 10⁶ per row
    k = qwha.adaalloc(scores, budget, t, 2, 10**6)
    assert torch.equal(k, qwha.adaalloc_reference(scores, budget, t))


def test_adaalloc_bounds_and_errors():
    scores = torch.tensor([1000.0, 1.0, 1.0, 1e-6, 0.0])
    k = qwha.adaalloc(scores, 20, 1.0, 2, 8)
    assert k.tolist()[0] == 8 and int(k.sum()) == 20 and int(k.min()) >= 2
    assert qwha.adaalloc(scores, 10, 1.0, 2, 8).tolist() == [2] * 5      # budget = m·min
    assert qwha.adaalloc(scores, 40, 1.0, 2, 8).tolist() == [8] * 5      # budget = m·max
    with pytest.raises(ValueError, match="budget"):
        qwha.adaalloc(scores, 9, 1.0, 2, 8)
    with pytest.raises(ValueError, match="budget"):
        qwha.adaalloc(scores, 41, 1.0, 2, 8)
    with pytest.raises(ValueError, match="temperature"):
        qwha.adaalloc(scores, 20, 0.0)
    # a high temperature flattens, a low one sharpens
    s = torch.tensor([1.0, 2.0, 4.0, 8.0])
    flat, sharp = qwha.adaalloc(s, 400, 100.0, 2, 400), qwha.adaalloc(s, 400, 0.25, 2, 400)
    assert int(flat.max() - flat.min()) <= 5 and int(sharp[-1]) > 300


# ---------------------------------------------------------------------------------------------- selection


@SET
@given(shapes(), st.sampled_from(["output", "magnitude"]))
def test_select_topk_matches_brute_force(shape, rule):
    m, n, seed = shape
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(m, n, generator=g, dtype=torch.float64)
    G = qwha.hadamard_hessian(spd(n, g))
    k = torch.randint(0, n + 1, (m,), generator=g)
    sup = qwha.select_topk(C, G, k, rule, chunk_rows=3)
    assert sup.shape == (2, int(k.sum()))
    flat = sup[0] * n + sup[1]
    assert bool((flat[1:] > flat[:-1]).all())                        # CSR order, no duplicates
    S = C.square() * G.diagonal() if rule == "output" else C.abs()
    for i in range(m):
        mine = sup[1][sup[0] == i]
        want = torch.sort(torch.argsort(S[i], descending=True)[: int(k[i])]).values
        assert torch.equal(mine, want)


def test_select_support_modes():
    g = torch.Generator().manual_seed(3)
    m, n, B = 12, 48, 100
    C = torch.randn(m, n, generator=g, dtype=torch.float64)
    G = qwha.hadamard_hessian(spd(n, g))
    sc = C.norm(dim=1)
    for mode in ("adaalloc", "magnitude", "random", "random_rows"):
        sup = qwha.select_support(C, G, B, select=mode, scores=sc, generator=torch.Generator().manual_seed(0))
        assert sup.shape == (2, B), mode
        assert torch.unique(sup[0] * n + sup[1]).numel() == B, mode
    assert qwha.select_support(C, G, B, select="none").shape == (2, 0)
    mag = qwha.select_support(C, G, B, select="magnitude", rule="magnitude")
    thresh = C.abs().flatten().sort(descending=True).values[B - 1]
    assert bool((C.abs()[mag[0], mag[1]] >= thresh).all())
    r1 = qwha.select_support(C, G, B, select="random", generator=torch.Generator().manual_seed(5))
    r2 = qwha.select_support(C, G, B, select="random", generator=torch.Generator().manual_seed(5))
    assert torch.equal(r1, r2)
    with pytest.raises(ValueError, match="select"):
        qwha.select_support(C, G, B, select="topk")


# ---------------------------------------------------------------------------------------------- refinement


def _problem(m, n, seed, budget_frac=0.25, H=None):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(m, n, generator=g, dtype=torch.float64)
    H = spd(n, g) if H is None else H
    C, G = qwha.spectrum(E), qwha.hadamard_hessian(H)
    B = max(2 * m, int(budget_frac * m * n))
    k = qwha.adaalloc(qwha.channel_scores(E, H), B, 1.0, 2, n)
    sup = qwha.select_topk(C, G, k)
    return E, H, C, G, sup


@SET
@given(shapes(), st.floats(0.05, 0.9))
def test_refined_values_satisfy_the_normal_equations(shape, frac):
    m, n, seed = shape
    E, H, C, G, sup = _problem(m, n, seed, frac)
    f = qwha.refine(C @ G, G, sup)
    F = dense(sup, f, m, n)
    T = T_of(n)
    grad = -2 * (E - F @ T) @ H @ T.T          # ∂/∂F ‖(E − F T) Rᵀ‖²
    scale = (E @ H @ T.T).abs().max()
    assert grad[sup[0], sup[1]].abs().max() <= 1e-8 * scale
    # and never worse than the unrefined selection of the same support
    assert (qwha.layer_error(E, H, F @ T)
            <= qwha.layer_error(E, H, dense(sup, C[sup[0], sup[1]], m, n) @ T) * (1 + 1e-12))


@SET
@given(shapes())
def test_batched_refine_equals_per_row_lstsq(shape):
    m, n, seed = shape
    E, H, C, G, sup = _problem(m, n, seed, 0.3)
    f = qwha.refine(C @ G, G, sup, chunk_bytes=2000)             # tiny chunks: many batches per group
    R = torch.linalg.cholesky(H).T                                # RᵀR = H
    T = T_of(n)
    for i in range(m):
        cols = sup[1][sup[0] == i]
        A = (T[cols] @ R.T).T                                     # (n, k): f ↦ f T_Ω Rᵀ
        b = (E[i] @ R.T)[:, None]
        want = torch.linalg.lstsq(A, b).solution[:, 0]
        # both sides are backward stable: they differ by ~eps·cond(G[Ω,Ω]) (up to ~1e8 for these H) of the largest value
        torch.testing.assert_close(f[sup[0] == i], want, rtol=1e-7, atol=1e-7 * float(want.abs().max()))


@SET
@given(shapes(), st.floats(0.05, 0.9))
def test_identity_hessian_keeps_C_and_error_is_dropped_energy(shape, frac):
    m, n, seed = shape
    H = torch.eye(n, dtype=torch.float64)
    E, H, C, G, sup = _problem(m, n, seed, frac, H=H)
    f = qwha.refine(C @ G, G, sup)
    torch.testing.assert_close(f, C[sup[0], sup[1]])
    F = dense(sup, f, m, n)
    dropped = C.square().sum() - C[sup[0], sup[1]].square().sum()   # Parseval
    torch.testing.assert_close(qwha.layer_error(E, H, F @ T_of(n)) ** 2, dropped)


@SET
@given(shapes())
@example(shape=(3, 144, 4887))     # float32 blocks and damping: 1.08e-5 of the bare error
def test_full_budget_gives_zero_error(shape):
    m, n, seed = shape
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(m, n, generator=g, dtype=torch.float64)
    H = spd(n, g)
    idx, val = qwha.init_layer(E, H, m * n)
    F = dense(idx, val.double(), m, n)
    err, err0 = float(qwha.layer_error(E, H, F @ T_of(n))), float(qwha.layer_error(E, H))
    # zero but for the damping: the values minimize err² + λμ‖f‖² (λμ = 1e-4·mean diag H), and f = C gives
    # err = 0, so err² ≤ λμ‖C‖²; plus the fp32 rounding of the returned values
    lam_mu = 1e-4 * float(H.diagonal().mean())
    assert err ** 2 <= lam_mu * float(qwha.spectrum(E).square().sum()) * (1 + 1e-6) + (1e-6 * err0) ** 2
    assert err < 1e-4 * err0


def test_refine_falls_back_on_singular_blocks():
    g = torch.Generator().manual_seed(7)
    m, n = 6, 32
    H = spd(n, g, rank_deficient=True)                            # rank n/2: large blocks are singular
    E = torch.randn(m, n, generator=g, dtype=torch.float64)
    C, G = qwha.spectrum(E), qwha.hadamard_hessian(H)
    k = torch.full((m,), 24)
    sup = qwha.select_topk(C, G, k, "magnitude")
    f = qwha.refine(C @ G, G, sup)
    assert torch.isfinite(f).all()
    F = dense(sup, f, m, n)
    T = T_of(n)
    grad = (E - F @ T) @ H @ T.T
    assert grad[sup[0], sup[1]].abs().max() < 1e-8 * (E @ H).abs().max()   # a least-squares minimizer



@given(st.lists(st.integers(0, 5000), min_size=1, max_size=50), st.sampled_from([1, 2, 4, 8, 16]))
def test_padded_sizes_round_up_to_at_most_per_octave_sizes(ks, per_octave):
    k = torch.tensor(ks)
    K = qwha_fast._padded_sizes(k, per_octave)
    assert (K >= k).all() and ((K == 0) == (k == 0)).all()
    assert ((K - k) * per_octave <= k).all()                      # K ≤ k·(1 + 1/per_octave)
    small = k < qwha_fast.AUG_MIN_K
    assert (K[small] == k[small]).all()                           # small blocks are not padded
    for j in range(14):                                           # ≤ per_octave + 1 sizes per octave of padded k
        sel = (k >= 2**j) & (k < 2 ** (j + 1)) & ~small
        assert torch.unique(K[sel]).numel() <= per_octave + 1


@SET
@given(shapes(), st.floats(0.3, 0.9))
def test_padding_the_blocks_changes_nothing_but_round_off(shape, frac):
    """The batched solve pads each row's block with decoupled unit pivots up to a shared size and carries the
    right-hand side as an extra row: with heavy padding (one size per octave) the values and the quadratic forms
    for the error report are those of the plain blocks (no padding, two triangular solves)."""
    m, n, seed = shape
    E, H, C, G, sup = _problem(m, n, seed, frac)
    f_sel = C[sup[0], sup[1]]
    out = {}
    old = qwha_fast.PAD_PER_OCTAVE, qwha_fast.AUG_MIN_K
    try:
        for po in (1, 1 << 20):                # every block padded and augmented, then every block plain
            qwha_fast.PAD_PER_OCTAVE, qwha_fast.AUG_MIN_K = po, (2 if po == 1 else 1 << 20)
            out[po] = qwha_fast.solve_support(C @ G, G, sup, extra=f_sel, fp32_min_k=None)
    finally:
        qwha_fast.PAD_PER_OCTAVE, qwha_fast.AUG_MIN_K = old
    (f1, qf1, qx1), (f0, qf0, qx0) = out[1], out[1 << 20]
    torch.testing.assert_close(f1, f0, rtol=1e-7, atol=1e-7 * float(f0.abs().max()))
    assert float(qf1) == pytest.approx(float(qf0), rel=1e-9)
    assert float(qx1) == pytest.approx(float(qx0), rel=1e-9)


@SET
@given(shapes(), st.floats(0.05, 0.9), st.sampled_from([None, 1, 40]), st.sampled_from([2, 3]))
def test_refine_with_workers_is_bitwise_the_same(shape, frac, k32, workers):
    """Chunks solved in threads: the same values bit for bit (plain and padded blocks, float32 and float64,
    many chunks), and the quadratic forms of the report summed in the same order."""
    m, n, seed = shape
    E, H, C, G, sup = _problem(m, n, seed, frac)
    old = qwha_fast.AUG_MIN_K
    try:
        qwha_fast.AUG_MIN_K = 8                    # both block kinds on these small widths
        want = qwha_fast.solve_support(C @ G, G, sup, extra=C[sup[0], sup[1]], chunk_bytes=3000, fp32_min_k=k32)
        got = qwha_fast.solve_support(C @ G, G, sup, extra=C[sup[0], sup[1]], chunk_bytes=3000, fp32_min_k=k32,
                                      workers=workers)
        threads = torch.get_num_threads()
        f = qwha.refine(C @ G, G, sup, chunk_bytes=3000, fp32_min_k=k32, workers=workers)
        assert torch.get_num_threads() == threads
    finally:
        qwha_fast.AUG_MIN_K = old
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert torch.equal(f, want[0])
    with pytest.raises(ValueError, match="workers must be >= 1"):
        qwha.refine(C @ G, G, sup, workers=0)


@SET
@given(shapes(), st.floats(0.1, 0.9))
@example(shape=(4, 144, 1), frac=0.875)     # 1.8e-6 apart: rows of 126 of 144 coefficients, a worse-conditioned block
@example(shape=(2, 24, 466784), frac=0.859375)  # the report's cancellation (below)
@example(shape=(4, 64, 11408), frac=0.875)  # 5.7e-5 apart relative to the refined error, 5.2e-7 of the bare one
def test_float32_blocks_give_the_float64_error(shape, frac):
    """refine(fp32_min_k=1) factors every block in float32: the layer error of its values matches float64's to
    second order: within 1e-5 of it, or within 2e-6 of the bare error where refinement removes nearly all of it
    (cond H ~1e8, the refined error 1 % of the bare one); init_layer_full's report of it is the true (dense) error
    to ~1e-6 of the bare error."""
    m, n, seed = shape
    E, H, C, G, sup = _problem(m, n, seed, frac)
    T = T_of(n)
    err = {}
    for k32 in (None, 1):
        f = qwha.refine(C @ G, G, sup, fp32_min_k=k32)
        err[k32] = float(qwha.layer_error(E, H, dense(sup, f, m, n) @ T))
    assert err[1] == pytest.approx(err[None], rel=1e-5, abs=2e-6 * float(qwha.layer_error(E, H)))
    li = qwha.init_layer_full(E, H, sup.shape[1], fp32_min_k=1)
    want = float(qwha.layer_error(E, H, dense(li.indices, li.values, m, n) @ T))
    sel = float(qwha.layer_error(E, H, dense(li.indices, C[li.indices[0], li.indices[1]], m, n) @ T))
    # the report's quadratic forms come from the float32 blocks: good to ~1e-6 of the bare error e0 (2.2e-6 worst
    # in 200 random cases), but err² = e0² − 2 f·P + f G fᵀ loses ~ε32·e0² to cancellation where refinement
    # removes nearly all of the error, i.e. ~ε32·e0²/(2·err) on err ((2, 24, 466784): err = 0.003·e0, 1.15e-5·e0
    # off)
    e0 = li.err_before
    assert li.err_refined == pytest.approx(want, abs=1e-5 * e0 + 5e-7 * e0 ** 2 / want)
    assert li.err_select == pytest.approx(sel, abs=1e-5 * li.err_before)


def test_float32_rows_that_are_singular_or_ill_conditioned_are_redone_in_float64():
    """Singular blocks (float32 Cholesky fails) and blocks whose float32 pivots spread by > 100 (cond ≥ 10⁴, here
    diag H over 10 decades) get float64's values; at cond ~2·10⁵ (6 decades, pivot spread 60) float32 stays and
    moves the layer error by 4e-7."""
    g = torch.Generator().manual_seed(7)
    m, n = 6, 32
    E = torch.randn(m, n, generator=g, dtype=torch.float64)

    def logspace(d):
        return torch.diag(torch.logspace(0, d, n, dtype=torch.float64))

    for H, same in ((spd(n, g, rank_deficient=True), True), (logspace(10), True), (logspace(6), False)):
        C, G = qwha.spectrum(E), qwha.hadamard_hessian(H)
        sup = qwha.select_topk(C, G, torch.full((m,), 24), "magnitude")
        f64, f32 = qwha.refine(C @ G, G, sup, fp32_min_k=None), qwha.refine(C @ G, G, sup, fp32_min_k=1)
        if same:
            torch.testing.assert_close(f32, f64, rtol=1e-9, atol=1e-9 * float(f64.abs().max()))
        else:
            assert not torch.allclose(f32, f64, rtol=1e-6)
        err = [float(qwha.layer_error(E, H, dense(sup, f, m, n) @ T_of(n))) for f in (f64, f32)]
        assert err[1] == pytest.approx(err[0], rel=1e-6)


@SET
@given(shapes(), st.sampled_from(["adaalloc", "magnitude", "random", "random_rows", "none"]),
       st.booleans(), st.sampled_from(["output", "weight"]))
# a full budget in float32 blocks (k = 144): the near-zero error once came from cancelling sums (0.0 and 3e-5 where
# the values give 1.06e-6 and 8.9e-7); drawn by Hypothesis on another machine
@example(shape=(2, 144, 0), select="adaalloc", refine=True, score="output")
@example(shape=(2, 144, 1), select="adaalloc", refine=True, score="output")
def test_init_layer_report_matches_dense_errors(shape, select, refine, score):
    m, n, seed = shape
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(m, n, generator=g, dtype=torch.float64) * 1e-3
    H = spd(n, g)
    B = min(m * n, 4 * (m + n))
    li = qwha.init_layer_full(E, H, B, select=select, refine=refine, score=score,
                              generator=torch.Generator().manual_seed(1))
    T = T_of(n)
    assert li.values.dtype == torch.float32 and li.indices.dtype == torch.long
    assert li.values.shape == (0 if select == "none" else B,)
    assert li.err_before == pytest.approx(float(qwha.layer_error(E, H)), rel=1e-9)
    F = dense(li.indices, li.values, m, n)
    tol = 1e-6 * li.err_before                                    # fp32 values; cancellation near zero error
    assert li.err_refined == pytest.approx(float(qwha.layer_error(E, H, F @ T)), rel=1e-5, abs=tol)
    C = qwha.spectrum(E)
    Fs = dense(li.indices, C[li.indices[0], li.indices[1]], m, n)
    assert li.err_select == pytest.approx(float(qwha.layer_error(E, H, Fs @ T)), rel=1e-9,
                                          abs=1e-7 * li.err_before)  # sqrt(eps)
    if select != "none":
        # the values minimize the damped error err² + λμ‖f‖² (λμ = damp·mean diag H, damp = 1e-4 by default), so
        # err_refined² ≤ err_select² + λμ‖f_sel‖²: at a full budget the selection is exact and refinement is not
        lam_mu = 1e-4 * float(H.diagonal().mean())
        bound = li.err_select ** 2 + lam_mu * float(C[li.indices[0], li.indices[1]].square().sum())
        assert li.err_refined ** 2 <= bound * (1 + 1e-6) + tol ** 2
        assert li.err_refined < li.err_before


# ---------------------------------------------------------------------------------------------- fast == reference
# Each production step against its paper-literal reference in qwha.py (qwha.*_reference), through the fast paths
# of qwha_fast.py: banded top-k, padded and augmented blocks, float32 blocks, tiny chunks.


def mild_spd(n, g):
    """A well-conditioned H (cond ~10): float32 blocks then stay within ~1e-6 of float64's values."""
    X = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    return X.T @ X / X.shape[0]


@SET
@given(shapes(), st.sampled_from([0.0, 1e-4, 1e-2]))
def test_layer_problem_equals_the_reference(shape, damp):
    m, n, seed = shape
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(m, n, generator=g, dtype=torch.float64)
    H = spd(n, g)
    pb = qwha.layer_problem(E, H, damp)
    Hd = calib.damp(H, damp)
    C, G, P = qwha.layer_problem_reference(E, Hd)
    _, G_raw, P_raw = qwha.layer_problem_reference(E, H)
    for got, want in ((pb.C, C), (pb.G, G), (pb.P, P), (pb.G_raw, G_raw), (pb.P_raw, P_raw)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    torch.testing.assert_close(pb.scores("output"), qwha.channel_scores(E, Hd), rtol=1e-9, atol=0)
    torch.testing.assert_close(pb.scores("weight"), qwha.channel_scores(E, kind="weight"), rtol=1e-12, atol=0)
    assert pb.e0sq == pytest.approx(float(qwha.layer_error(E, H)) ** 2, rel=1e-9)


@SET
@given(st.integers(1, 200), st.sampled_from([64, 96, 144]), st.sampled_from(["output", "magnitude"]),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_select_topk_equals_the_reference_up_to_ties(m, n, rule, ties, seed):
    """Many rows with k up to n: the banded top-k (qwha_fast.topk_rows) in chunks of rows; with ties (C on a few
    levels) the two may pick different columns of equal score, never different scores."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(m, n, generator=g, dtype=torch.float64)
    if ties:
        C = C.mul(2).round()
    G = qwha.hadamard_hessian(spd(n, g))
    k = torch.randint(0, n + 1, (m,), generator=g)
    got = qwha.select_topk(C, G, k, rule, chunk_rows=97)
    want = qwha.select_topk_reference(C, G, k, rule)
    assert torch.equal(got[0], want[0])                              # the same k_i per row, CSR order
    S = C.square() * G.diagonal() if rule == "output" else C.abs()
    for i in range(m):
        mine, ref = got[1][got[0] == i], want[1][want[0] == i]
        assert torch.equal(S[i, mine].sort().values, S[i, ref].sort().values)
        if not ties:
            assert torch.equal(mine, ref)


@SET
@given(shapes(), st.floats(0.05, 0.9), st.sampled_from(["plain", "padded", "float32"]),
       st.sampled_from([3000, 1 << 22]))
def test_refine_equals_the_reference(shape, frac, path, chunk_bytes):
    """refine (qwha_fast.solve_support) against one normal-equations solve per row: plain float64 blocks, every
    block padded and augmented (one block size per octave), every block in float32 (on a well-conditioned H)."""
    m, n, seed = shape
    H = mild_spd(n, torch.Generator().manual_seed(seed + 1)) if path == "float32" else None
    E, H, C, G, sup = _problem(m, n, seed, frac, H=H)
    P = C @ G
    old = qwha_fast.PAD_PER_OCTAVE, qwha_fast.AUG_MIN_K
    try:
        if path != "plain":
            qwha_fast.PAD_PER_OCTAVE, qwha_fast.AUG_MIN_K = 1, 2
        f = qwha.refine(P, G, sup, chunk_bytes=chunk_bytes, fp32_min_k=1 if path == "float32" else None)
    finally:
        qwha_fast.PAD_PER_OCTAVE, qwha_fast.AUG_MIN_K = old
    want = qwha.refine_reference(P, G, sup)
    tol = 1e-5 if path == "float32" else 1e-7                       # eps·cond(G[Ω,Ω]) of the largest value
    torch.testing.assert_close(f, want, rtol=tol, atol=tol * float(want.abs().max()))


@SET
@given(st.integers(2, 12), st.sampled_from([16, 24, 32, 48, 64, 72, 96, 144]), st.floats(0.2, 0.6),
       st.floats(0.5, 2.0), st.integers(0, 2**31 - 1))
def test_init_layer_equals_the_reference(m, n, frac, t, seed):
    """init_layer's plain init (swap_rounds = 0) is init_layer_reference's where no AdaAlloc bound binds: the same
    support, float64 blocks give its values to fp32 rounding, the default float32 blocks its layer error."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(m, n, generator=g, dtype=torch.float64)
    H = spd(n, g)
    B = int(frac * m * n)
    w = qwha.channel_scores(E, calib.damp(H, 1e-4)) ** (1 / t)
    share = B * w / w.sum()                                          # eq. 7 before the floor
    assume(float(share.min()) >= 2 and float(share.max()) <= n)     # adaalloc's bounds do not bind
    idx, val = qwha.init_layer_reference(E, H, B, temperature=t)
    idx64, val64 = qwha.init_layer(E, H, B, temperature=t, fp32_min_k=None)
    assert torch.equal(idx64, idx)
    torch.testing.assert_close(val64.double(), val, rtol=1e-5, atol=1e-6 * float(val.abs().max()))
    li = qwha.init_layer_full(E, H, B, temperature=t)
    assert torch.equal(li.indices, idx)
    T = T_of(n)
    want = float(qwha.layer_error(E, H, dense(idx, val, m, n) @ T))
    assert float(qwha.layer_error(E, H, dense(li.indices, li.values, m, n) @ T)) == pytest.approx(want, rel=1e-5)


def test_init_settings_replace_keywords_and_name_unknown_ones():
    """init_qwha(settings) equals init_qwha(**the same fields); keywords replace fields of settings; an unknown
    keyword, or a model-level one given to one layer, is a TypeError naming it."""
    m1, names, weights, hessians = _toy_quantized(seed=2)
    m2, _, _, _ = _toy_quantized(seed=2)
    s = qwha.InitSettings(budget_rank=3, swap_rounds=1, scale=0.5)
    r1 = qwha.init_qwha(m1, hessians, weights, s, quiet=True)
    r2 = qwha.init_qwha(m2, hessians, weights, qwha.InitSettings(budget_rank=5), budget_rank=3, swap_rounds=1,
                        scale=0.5, quiet=True)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in r1] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in r2]
    for name in names:
        a, b = m1.get_submodule(name), m2.get_submodule(name)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values) and b.scale == 0.5
    with pytest.raises(TypeError, match="budget_rnak"):
        qwha.init_qwha(m1, hessians, weights, budget_rnak=3, quiet=True)
    E, H = torch.randn(4, 16, dtype=torch.float64), torch.eye(16, dtype=torch.float64)
    with pytest.raises(TypeError, match="budget_rank"):
        qwha.init_layer_full(E, H, 16, budget_rank=2)
    assert qwha.PLAIN_INIT.swap_rounds == 0 and qwha.InitSettings().swap_rounds == qwha.SWAP_ROUNDS_DEFAULT


# ---------------------------------------------------------------------------------------------- the module


class FakeQuantLinear(nn.Module):
    """Stands in for gptq.QuantLinear: forward(x) == x @ dequantize().T + b."""

    def __init__(self, Q, bias):
        super().__init__()
        self.register_buffer("q", Q)
        self.bias = nn.Parameter(bias)
        self.out_features, self.in_features = Q.shape

    def dequantize(self):
        return self.q

    def forward(self, x):
        return x @ self.q.T + self.bias


def _wha(m=12, n=24, B=40, seed=0, quant=False, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    if quant:
        base = FakeQuantLinear(torch.randn(m, n, generator=g), torch.randn(m, generator=g))
    else:
        base = nn.Linear(n, m)
        with torch.no_grad():
            base.weight.copy_(torch.randn(m, n, generator=g))
            base.bias.copy_(torch.randn(m, generator=g))
    flat = torch.randperm(m * n, generator=g)[:B]
    sup = torch.stack([flat // n, flat % n])
    vals = torch.randn(B, generator=g)
    return qwha.WHALinear(base, sup, vals, scale=scale), sup, vals


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("n", [16, 24, 48, 72])
def test_wha_paths_agree_with_dense_and_merge(quant, n):
    mod, sup, vals = _wha(n=n, quant=quant)
    m = mod.out_features
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(2))
    F = torch.zeros(m, n)
    F[sup[0], sup[1]] = vals
    Q = mod.base.dequantize() if quant else mod.base.weight
    want = x.double() @ (Q.double() + 0.7 * F.double() @ T_of(n)).T + mod.bias.double()
    torch.testing.assert_close(mod.delta_weight().double(), 0.7 * F.double() @ T_of(n), rtol=1e-5, atol=1e-6)
    outs = {}
    for path in ("reference", "activations", "merged"):
        mod.path = path
        outs[path] = mod(x)
        torch.testing.assert_close(outs[path].double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["activations"], outs["merged"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["reference"], outs["merged"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x @ mod.merge().T + mod.bias, outs["merged"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.merged_linear()(x), outs["merged"], rtol=1e-5, atol=1e-5)
    mod.path = "auto"
    assert mod.choose_path(1) == "activations" and mod.choose_path(4096) == "merged"


def test_disable_gives_base_output_exactly_and_only_values_train():
    mod, _, _ = _wha(quant=False)
    x = torch.randn(4, 24)
    base_out = mod.base(x)
    assert not torch.equal(mod(x), base_out)
    assert torch.equal(mod.disable()(x), base_out)
    mod.enable()
    trainable = [name for name, p in mod.named_parameters() if p.requires_grad]
    assert trainable == ["values"]
    for path in ("reference", "activations", "merged"):
        mod.zero_grad(set_to_none=True)
        mod.path = path
        mod(x).square().sum().backward()
        assert mod.values.grad is not None and mod.values.grad.abs().sum() > 0
        assert mod.base.weight.grad is None and mod.base.bias.grad is None


def test_gradients_of_both_paths_agree():
    mod, _, _ = _wha(n=48, quant=True)
    x = torch.randn(7, 48, generator=torch.Generator().manual_seed(9))
    grads = []
    for path in ("reference", "activations", "merged"):
        mod.values.grad = None
        mod.path = path
        (mod(x) * torch.linspace(-1, 1, mod.out_features)).sum().backward()
        grads.append(mod.values.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="'reference'"):
        qwha.WHALinear(mod.base, torch.arange(3), path="dense")


# ---------------------------------------------------------------------------------------------- merged path
# WHALinear's training path: wht.wht_from_t / wht.wht_to_t (the transposing transforms it runs on), the
# blocked W = Q + s·F T, and the hand-written backward with its three value-gradient routes.

TRANSPOSING_WIDTHS = [1, 2, 8, 12, 24, 48, 96, 192, 576, 1536, 4096]   # single- and multi-stage plans


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("n", TRANSPOSING_WIDTHS)
def test_transposing_transforms_match_dense(n, inverse):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=g, dtype=torch.float64)
    T = T_of(n)
    want = x @ T if inverse else x @ T.T
    xt = x.T.contiguous()
    keep = xt.clone()
    torch.testing.assert_close(wht.wht_from_t(xt, inverse), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(wht.wht_from_t(x.T, inverse), want, rtol=0, atol=1e-12)   # strided input
    assert torch.equal(xt, keep)                                                      # not clobbered unless asked
    got = wht.wht_to_t(x, inverse)
    assert got.shape == (n, 5) and got.is_contiguous()
    torch.testing.assert_close(got, want.T, rtol=0, atol=1e-12)
    out = torch.empty(5, n, dtype=torch.float64)
    add = torch.randn(5, n, generator=g, dtype=torch.float64)
    assert wht.wht_from_t(xt.clone(), inverse, clobber=True, out=out, add=add) is out
    torch.testing.assert_close(out, want + add, rtol=0, atol=1e-12)
    out_t = torch.empty(n, 5, dtype=torch.float64)
    assert wht.wht_to_t(x.clone(), inverse, clobber=True, out=out_t) is out_t
    torch.testing.assert_close(out_t, want.T, rtol=0, atol=1e-12)
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):                   # fp32 compute, one rounding
        y = wht.wht_from_t(xt.to(dt), inverse)
        assert y.dtype == dt
        torch.testing.assert_close(y.double(), (x.to(dt).double() @ (T if inverse else T.T)), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="2-D"):
        wht.wht_to_t(x[0])


def _wha_reference(mod, x, gy):
    """adapter.reference_forward (eq. 4 with plain autograd) of the layer in fp64, its base copied to fp64; returns
    y, ∂values, ∂x for the output gradient gy."""
    import copy
    base = copy.deepcopy(mod.base).double()
    v = mod.values.detach().double().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    y = adapter.reference_forward(xr, base, mod.indices, v, mod.scale)
    y.backward(gy.double())
    return y, v.grad, xr.grad


def test_reference_forward_is_eq_4_with_the_dense_matrix():
    """reference_forward = base(x) + s·x Tᵀ Fᵀ with the explicit T and F, and its gradients are those of that
    dense expression (plain autograd through the textbook transform)."""
    mod, sup, vals = _wha(m=10, n=48, B=30, seed=7, quant=True)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 5, 48, generator=g, dtype=torch.float64)
    gy = torch.randn(2, 5, 10, generator=g, dtype=torch.float64)
    y, gv, gx = _wha_reference(mod, x, gy)
    F = dense(sup, vals, 10, 48)
    v = vals.double().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    Fv = torch.zeros(10, 48, dtype=torch.float64).index_put((sup[0], sup[1]), v)
    want = xr @ mod.base.q.double().T + mod.bias.double() + mod.scale * (xr @ T_of(48).T) @ Fv.T
    want.backward(gy)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, x @ (mod.base.q.double() + mod.scale * F @ T_of(48)).T + mod.bias.double(),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gv, v.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, xr.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("route", ["sampled", "dense x", "dense gW"])
@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("form", ["wht", "csr"])
@pytest.mark.parametrize("chunk", [512, 4])
def test_merged_path_equals_dense_autograd(monkeypatch, route, sort, form, chunk):
    """Forward, value gradients and input gradients of the merged path against a dense fp64 autograd reference,
    for each value-gradient route, each way to form W (WHT of row blocks, or CSR F times dense T) and the value
    gradient in one token chunk or many (ragged last one), in many row blocks and groups (ragged last ones), with
    a row-sorted or shuffled support with a repeated entry (values at the same position add, as in dense_F)."""
    monkeypatch.setattr(adapter, "_SDDMM_CHUNK", chunk)
    monkeypatch.setattr(adapter, "_BLOCK_ELEMS", 5 * 96)                 # 5 rows per block
    monkeypatch.setattr(adapter, "_GROUP_ELEMS", 10 * 96)                # W re-formed 2 blocks at a time for gx
    monkeypatch.setattr(adapter, "_SDDMM_COST", 10**9 if route != "sampled" else 0)
    monkeypatch.setattr(adapter, "_CSR_MAX_K", 10**9 if form == "csr" else 0)
    m, n = 23, 96
    N = {"sampled": 30, "dense x": 7, "dense gW": 40}[route]             # dense x: N < m; dense gW: N >= m
    g = torch.Generator().manual_seed(3)
    base = FakeQuantLinear(torch.randn(m, n, generator=g), torch.randn(m, generator=g))
    flat = torch.randperm(m * n, generator=g)[:300]
    flat = torch.cat([flat, flat[:1]])                                  # a repeated position
    flat = flat.sort().values if sort else flat
    mod = qwha.WHALinear(base, flat, torch.randn(flat.numel(), generator=g), scale=0.7, path="merged")
    assert adapter._csr_form(mod, torch.device("cpu")) == (form == "csr")
    x = torch.randn(2, N // 2, n, generator=g, requires_grad=True)
    gy = torch.randn(2, N // 2, m, generator=g)
    y = mod(x)
    y.backward(gy)
    y_ref, gv_ref, gx_ref = _wha_reference(mod, x, gy)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mod.values.grad.double(), gv_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), gx_ref, rtol=1e-5, atol=1e-4)
    dup = (flat[:, None] == flat[None, :]).sum(1) > 1                  # the repeated position's two entries
    assert dup.sum() == 2 and mod.values.grad[dup][0] == mod.values.grad[dup][1]   # get the same gradient
    with torch.no_grad():
        torch.testing.assert_close(mod(x), x @ mod.merge().T + mod.bias, rtol=1e-5, atol=1e-5)


def test_csr_formation_is_chosen_by_entries_per_row_and_width():
    """W is formed through a CSR F and a dense T on a CPU where F has ≤ _CSR_MAX_K entries per row on average and
    n ≤ _CSR_MAX_N (SmolLM2 at r = 8: q/o and gate/up yes, k/v (32 per row) and down (n = 1536) no)."""
    cpu = torch.device("cpu")

    def mod(m, n, r):
        return qwha.WHALinear(nn.Linear(n, m, bias=False), torch.arange(r * (m + n)) * (m * n // (r * (m + n))))

    assert [adapter._csr_form(mod(m, n, 8), cpu) for m, n in [(576, 576), (1536, 576), (192, 576), (576, 1536)]] == \
        [True, True, False, False]
    assert not adapter._csr_form(mod(576, 576, 64), cpu)                    # r = 64: 128 entries per row
    assert not adapter._csr_form(mod(576, 576, 8), torch.device("meta"))    # only on a CPU
    T = adapter._dense_T(48, cpu)
    assert T is adapter._dense_T(48, cpu)                                   # cached
    torch.testing.assert_close(T, wht.hadamard_matrix(48), rtol=0, atol=0)


class Siblings(nn.Module):
    """Three merged WHA layers on one input, like q/k/v; forward returns their three outputs."""

    def __init__(self, m=(20, 8, 8), n=48, B=60):
        super().__init__()
        self.mods = nn.ModuleList(_wha(m=mi, n=n, B=B, seed=i, quant=True)[0] for i, mi in enumerate(m))
        for mod in self.mods:
            mod.path = "merged"

    def forward(self, x):
        return [mod(x) for mod in self.mods]


@pytest.mark.parametrize("route", ["sampled", "dense x"])
def test_layers_reading_one_input_share_its_transform(monkeypatch, route):
    """q/k/v-like layers reading the same x transform it once for their value gradients (wht_to_t called once,
    not three times), give the gradients of the dense reference, and keep nothing of it after the backward;
    the registry forgets x when x goes."""
    monkeypatch.setattr(adapter, "_SDDMM_COST", 10**9 if route != "sampled" else 0)
    monkeypatch.setattr(adapter, "_SDDMM_CHUNK", 4)                         # x Tᵀ in chunks of 4 tokens
    net = Siblings()
    N = 30 if route == "sampled" else 7                                  # dense x: N < m (= 8 ... 20)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 48, generator=g, requires_grad=True)
    gys = [torch.randn(N, mod.out_features, generator=g) for mod in net.mods]
    calls = []
    real = wht.wht_to_t
    monkeypatch.setattr(wht, "wht_to_t", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    ys = net(x)
    sh = adapter._SHARED[id(x)]
    assert sh.users == 3 and sh.xTt is None                              # joined by all three, nothing held yet
    torch.autograd.backward(ys, gys)
    assert calls == [(4, 48)] * (N // 4) + [(N % 4, 48)]               # x transformed once for the three
    assert sh.users == 0 and sh.xTt is None                             # dropped after the last backward
    gx = torch.zeros(N, 48, dtype=torch.float64)
    for mod, gy in zip(net.mods, gys):
        _, gv_ref, gx_ref = _wha_reference(mod, x, gy)
        torch.testing.assert_close(mod.values.grad.double(), gv_ref, rtol=1e-5, atol=1e-4)
        gx += gx_ref
    torch.testing.assert_close(x.grad.double(), gx, rtol=1e-5, atol=1e-4)
    del ys, x
    assert not any(s is sh for s in adapter._SHARED.values())              # x gone: its entry too


def test_merged_path_with_no_tokens():
    """An empty batch gives an empty output and zero value gradients (no chunk of x Tᵀ to sum)."""
    mod, _, _ = _wha(m=6, n=16, B=10, seed=3)
    mod.path = "merged"
    x = torch.zeros(0, 16, requires_grad=True)
    y = mod(x)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert torch.equal(mod.values.grad, torch.zeros(10)) and x.grad.shape == (0, 16)


def test_shared_input_follows_the_tensor_and_its_version():
    """A new _SharedInput for another tensor or for the same tensor changed in place; none without a value
    gradient (frozen values, or no grad)."""
    x, z = torch.randn(4, 16), torch.randn(4, 16)
    a = adapter._shared_input(x)
    assert adapter._shared_input(x) is a and a.users == 2
    assert adapter._shared_input(z) is not a
    x.add_(1)
    assert adapter._shared_input(x) is not a
    mod, _, _ = _wha(m=6, n=16, B=10, seed=2)
    mod.path = "merged"
    with torch.no_grad():
        w = torch.randn(3, 16)
        mod(w)
    assert id(w) not in adapter._SHARED
    mod.values.requires_grad_(False)
    mod(w)
    assert id(w) not in adapter._SHARED


def test_merged_path_follows_changed_indices():
    """The cached support layout follows `indices` changed in place or replaced (load_adapters replaces it)."""
    mod, _, _ = _wha(m=12, n=24, B=40, seed=4)
    mod.path = "merged"
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(5))
    mod(x)
    with torch.no_grad():
        mod.indices.copy_(torch.randperm(12 * 24)[:40].to(mod.indices.dtype))
    torch.testing.assert_close(mod(x), _wha_reference(mod, x, torch.zeros(5, 12))[0].float(), rtol=1e-5, atol=1e-5)
    mod.indices = torch.randperm(12 * 24)[:40].to(mod.indices.dtype)
    torch.testing.assert_close(mod(x), _wha_reference(mod, x, torch.zeros(5, 12))[0].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep", [None, False, True])
def test_merged_path_saves_x_and_the_merged_weight_or_the_values(keep):
    """Autograd holds x, the values and W (m, n) if kept (else it is re-formed in backward) for a merged layer:
    kept by _keep_weight's rule (8·m·n ≤ N·(m + n)) or as forced; all give the dense reference's gradients."""
    mod, _, _ = _wha(m=12, n=48, B=40, seed=6)
    mod.path, mod.keep_weight = "merged", keep
    for N in (5, 100):                                                 # 8·12·48 = 4608 > 5·60, <= 100·60
        kept = keep if keep is not None else N == 100
        x = torch.randn(N, 48, generator=torch.Generator().manual_seed(N), requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            y = mod(x)
        assert sorted(saved) == sorted([(N, 48), (40,)] + ([(12, 48)] if kept else []))   # x, values (a Parameter)
        mod.values.grad = None
        y.backward(torch.ones_like(y))
        y_ref, gv_ref, gx_ref = _wha_reference(mod, x, torch.ones_like(y))
        torch.testing.assert_close(x.grad.double(), gx_ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(mod.values.grad.double(), gv_ref, rtol=1e-5, atol=1e-4)


class Toy(nn.Module):
    def __init__(self, n=24, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.ModuleDict({"up": nn.Linear(n, 48), "down": nn.Linear(48, n)})
                                     for _ in range(2)])

    def forward(self, x):
        for blk in self.layers:
            x = x + blk["down"](torch.relu(blk["up"](x)))
        return x


def _toy_quantized(seed=0):
    """A toy model whose linears hold a crudely 'quantized' weight, plus the original weights and Hessians."""
    model = Toy(seed=seed)
    g = torch.Generator().manual_seed(seed)
    names = [f"layers.{i}.{p}" for i in range(2) for p in ("up", "down")]
    weights, hessians = {}, {}
    for name in names:
        lin = model.get_submodule(name)
        weights[name] = lin.weight.detach().clone()
        with torch.no_grad():
            lin.weight.copy_(torch.round(lin.weight * 8) / 8)
        hessians[name] = spd(lin.in_features, g)
    return model, names, weights, hessians


def test_init_qwha_wraps_and_reports(capsys):
    model, names, weights, hessians = _toy_quantized()
    report = qwha.init_qwha(model, hessians, weights, budget_rank=4, scale=2.0, compute_rank=True)
    assert [r["layer"] for r in report] == names
    err = capsys.readouterr().err
    assert "mean" in err and names[-1] in err
    for r in report:
        mod = model.get_submodule(r["layer"])
        assert isinstance(mod, qwha.WHALinear) and mod.scale == 2.0
        m, n = r["shape"]
        assert r["budget"] == 4 * (m + n) and mod.values.numel() == r["budget"]
        assert r["err_refined"] < r["err_select"] <= r["err_before"] * (1 + 1e-9)
        assert r["k_min"] >= 2 and r["rank_F"] == min(m, n)
        # the stored values (÷ scale) reproduce the reported error through the module's own ΔW
        E = (weights[r["layer"]] - mod.base.weight).double()
        got = qwha.layer_error(E, hessians[r["layer"]], mod.delta_weight().double())
        assert float(got.detach()) == pytest.approx(r["err_refined"], rel=1e-4)
    x = torch.randn(3, 24)
    assert torch.isfinite(model(x)).all()
    with pytest.raises(ValueError, match="original weight"):
        qwha.init_qwha(Toy(), hessians, {}, quiet=True)


@pytest.mark.parametrize("workers", [2, 3])
def test_init_qwha_workers_give_the_same_adapters_in_order(workers):
    """Layers initialized in threads: bitwise the indices and values of one worker at one thread each, the rows
    in the order of the names, and torch's thread count restored."""
    ref_model, names, weights, hessians = _toy_quantized(seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = qwha.init_qwha(ref_model, hessians, weights, budget_rank=3, quiet=True, swap_rounds=1)
    finally:
        torch.set_num_threads(threads)
    model, _, _, _ = _toy_quantized(seed=1)
    got = qwha.init_qwha(model, hessians, weights, budget_rank=3, quiet=True, swap_rounds=1, workers=workers)
    assert torch.get_num_threads() == threads
    assert [r["layer"] for r in got] == names
    for a, b in zip(ref, got):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    for name in names:
        x, y = ref_model.get_submodule(name), model.get_submodule(name)
        assert torch.equal(x.indices, y.indices) and torch.equal(x.values, y.values)


def test_init_qwha_workers_errors_name_the_layer_and_bad_settings():
    model, names, weights, hessians = _toy_quantized()
    bad = dict(hessians)
    bad[names[2]] = hessians[names[2]][:-1]                       # wrong shape: the third layer fails
    with pytest.raises(ValueError, match=names[2].replace(".", r"\.")):
        qwha.init_qwha(model, bad, weights, budget_rank=3, quiet=True, workers=2)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        qwha.init_qwha(model, hessians, weights, quiet=True, workers=0)
    with pytest.raises(ValueError, match="select='random'"):
        qwha.init_qwha(model, hessians, weights, quiet=True, workers=2, select="random")


def test_save_load_round_trip_is_bitwise(tmp_path):
    model, names, weights, hessians = _toy_quantized()
    qwha.init_qwha(model, hessians, weights, budget_rank=3, scale=0.5, quiet=True)
    for mod in qwha.adapters(model).values():                    # as after some training
        with torch.no_grad():
            mod.values.add_(torch.randn_like(mod.values) * 1e-3)
    path = tmp_path / "adapters.safetensors"
    qwha.save_adapters(path, model, {"budget_rank": 3, "temperature": 1.0})
    fresh, _, _, _ = _toy_quantized()                             # same quantized base, no adapters
    settings_back = qwha.load_adapters(path, fresh)
    assert settings_back == {"budget_rank": 3, "temperature": 1.0}
    x = torch.randn(5, 24)
    assert torch.equal(model(x), fresh(x))
    for name, mod in qwha.adapters(model).items():
        other = fresh.get_submodule(name)
        assert torch.equal(mod.indices, other.indices) and mod.indices.dtype == other.indices.dtype
        assert torch.equal(mod.values, other.values) and other.scale == mod.scale
    qwha.load_adapters(path, fresh)                               # loading onto existing adapters replaces them
    assert torch.equal(model(x), fresh(x))
    with pytest.raises(FileNotFoundError):
        qwha.load_adapters(tmp_path / "missing.safetensors", fresh)


def test_wha_on_a_real_quantlinear_base():
    import gptq
    g = torch.Generator().manual_seed(11)
    m, n = 24, 128
    W, b = torch.randn(m, n, generator=g), torch.randn(m, generator=g)
    base = gptq.QuantLinear.from_state(gptq.quantize_rtn(W, 3, 64), bias=b)
    H = spd(n, g)
    E = W.double() - base.dequantize().double()
    idx, val = qwha.init_layer(E, H, 4 * (m + n))
    mod = qwha.WHALinear(base, idx, val / 2.0, scale=2.0)
    x = torch.randn(6, n, generator=g)
    outs = []
    for path in ("activations", "merged"):
        mod.path = path
        outs.append(mod(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1], x @ mod.merge().T + b, rtol=1e-5, atol=1e-5)
    assert [name for name, p in mod.named_parameters() if p.requires_grad] == ["values"]
    # the adapter lowers the output error against the full-precision layer on data shaped like H
    X = torch.linalg.cholesky(H).T.float()                       # rows whose XᵀX is H: error measured on them
    ref = X @ W.T + b
    assert (mod(X) - ref).norm() < 0.9 * (base(X) - ref).norm()


@pytest.mark.parametrize("route", ["sampled", "dense x"])
def test_wha_in_a_llama_block_with_and_without_gradient_checkpointing(monkeypatch, route):
    """Every linear of a tiny LLaMA wrapped in a merged WHALinear (q/k/v and gate/up share their inputs): the value
    gradients with non-reentrant gradient checkpointing (the layer re-run in the backward) equal those without,
    q/k/v and gate/up transform their input once per block, and no shared transform is held afterwards."""
    import model as M
    monkeypatch.setattr(adapter, "_SDDMM_COST", 10**9 if route != "sampled" else 0)
    cfg = M.ModelConfig(vocab_size=40, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    net = M.init_weights(M.LlamaForCausalLM(cfg), torch.Generator().manual_seed(0)).train()
    for p in net.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    for name in M.linear_names(net):
        base = M.get_module(net, name)
        m, n = base.out_features, base.in_features
        flat = torch.randperm(m * n, generator=g)[: 3 * (m + n) // 2]
        M.set_module(net, name, qwha.WHALinear(base, flat, torch.randn(flat.numel(), generator=g), path="merged"))
    ids = torch.randint(0, 40, (1, 7) if route == "dense x" else (2, 30), generator=g)  # dense x: 7 tokens < m
    calls = []
    real = wht.wht_to_t
    monkeypatch.setattr(wht, "wht_to_t", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    grads = []
    for ckpt in (False, True):
        net.gradient_checkpointing = ckpt
        calls.clear()
        net(ids).float().square().mean().backward()
        mods = qwha.adapters(net)
        grads.append({k: mod.values.grad.clone() for k, mod in mods.items()})
        for mod in mods.values():
            mod.values.grad = None
        assert len(calls) == 2 * 4                                  # per block: q/k/v, o, gate/up, down
        assert all(sh.xTt is None for sh in list(adapter._SHARED.values()))
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6)
