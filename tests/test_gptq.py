"""gptq.py: the eq. 1 grid, GPTQ (the fast form against the reference loop and RTN), its polish, MagR, packing,
QuantLinear, files."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gptq

FAST = settings(max_examples=12, deadline=None, derandomize=True)


def correlated_H(n: int, seed: int, rho: float = 0.9, outliers: float = 1.0) -> torch.Tensor:
    """H = XᵀX/N of inputs with AR(1)-correlated features (corr ρ^|i−j|) and log-normal channel scales. (n, n)"""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n, dtype=torch.float64)
    C = rho ** (idx[:, None] - idx[None, :]).abs()                                    # (n, n) correlation
    d = torch.exp(outliers * torch.randn(n, generator=g, dtype=torch.float64))       # channel scales
    X = torch.randn(4 * n, n, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(C).T * d
    return (X.T @ X / X.shape[0]).float()


def rand_W(m: int, n: int, seed: int, scale: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g) * scale


def close(a, b, atol=1e-6, rtol=0.0) -> bool:
    """|a − b| <= atol + rtol·|b| everywhere (torch.testing.assert_close pulls in torch.distributed: seconds)."""
    return bool(((a - b).abs() <= atol + rtol * b.abs()).all())


def layer_err(W, Q, H) -> float:
    """‖(W − Q)Rᵀ‖ with RᵀR = H, through an explicit root from eigh (the dense reference)."""
    lam, U = torch.linalg.eigh(H.double())
    R = lam.clamp(min=0).sqrt()[:, None] * U.T                                        # RᵀR = H
    return float(torch.linalg.norm((W.double() - Q.double()) @ R.T))


# --------------------------------------------------------------------------------------------- RTN / grid
@FAST
@given(bits=st.sampled_from([2, 3, 4]), g=st.sampled_from([8, 16, 32]), m=st.integers(1, 9),
       ng=st.integers(1, 4), seed=st.integers(0, 2 ** 16), scale=st.sampled_from([1e-3, 0.05, 3.0]))
def test_rtn_codes_in_range_and_within_half_step(bits, g, m, ng, seed, scale):
    W = rand_W(m, g * ng, seed, scale)
    W[0, :g] = 0.0                                                                    # an all-zero group
    s = gptq.quantize_rtn(W, bits, g)
    maxq = 2 ** bits - 1
    assert s.codes.dtype == torch.uint8 and int(s.codes.max()) <= maxq
    assert s.scales.dtype == torch.float16 and s.scales.shape == (m, ng)
    assert s.zeros.dtype == torch.uint8 and int(s.zeros.max()) <= maxq
    Wh = s.dequantize()
    assert torch.equal(Wh[0, :g], torch.zeros(g))                                    # zero group stays zero
    step = s.scales.float().repeat_interleave(g, 1)                                  # (m, n)
    z = s.zeros.float().repeat_interleave(g, 1)
    lo, hi = -z * step, (maxq - z) * step                                             # the grid's range
    inside = (W >= lo) & (W <= hi)
    tol = step / 2 * (1 + 1e-5) + 1e-7 * W.abs()
    assert ((W - Wh).abs() <= tol)[inside].all()
    # the grid (fitted on min/max, fp16-rounded scale) covers all but a sliver at the ends
    assert ((W - Wh).abs() <= step * 0.51 + 1e-3 * W.abs()).all()


def test_rtn_dequantize_uses_stored_fp16_scales():
    W = rand_W(4, 64, 0)
    s = gptq.quantize_rtn(W, 3, 32)
    q = s.codes.float().reshape(4, 2, 32)
    ref = (q - s.zeros.float()[..., None]) * s.scales.float()[..., None]
    assert torch.equal(s.dequantize(), ref.reshape(4, 64))
    assert s.dequantize(torch.float16).dtype == torch.float16


# --------------------------------------------------------------------------------------------- GPTQ
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_diagonal_H_equals_rtn_exactly(bits, act_order):
    """No off-diagonal curvature, no error feedback: GPTQ is RTN on the same static grid (H = I and any diag)."""
    W = rand_W(24, 128, 1)
    g = torch.Generator().manual_seed(2)
    rtn = gptq.quantize_rtn(W, bits, 32)
    for H in (torch.eye(128), torch.diag(torch.rand(128, generator=g) + 0.1)):
        for cd in (0, 2):                                                             # CD's vertex is w itself
            s = gptq.gptq_quantize(W, H, bits, 32, block_size=48, act_order=act_order, cd_passes=cd)
            assert torch.equal(s.codes, rtn.codes) and torch.equal(s.scales, rtn.scales)
            assert torch.equal(s.zeros, rtn.zeros)
    dyn = gptq.gptq_quantize(W, torch.eye(128), bits, 32, block_size=64, static_groups=False)
    assert torch.equal(dyn.codes, rtn.codes) and torch.equal(dyn.scales, rtn.scales)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2 ** 16), rho=st.floats(0.5, 0.95), outliers=st.floats(0.0, 1.5))
def test_gptq_beats_rtn_on_correlated_inputs(seed, rho, outliers):
    n, m = 96, 24
    H = correlated_H(n, seed, rho, outliers)
    W = rand_W(m, n, seed + 1)
    for bits in (2, 3, 4):
        e_rtn = layer_err(W, gptq.quantize_rtn(W, bits, 32).dequantize(), H)
        s = gptq.gptq_quantize(W, H, bits, 32, block_size=32)
        e_gptq = layer_err(W, s.dequantize(), H)
        assert e_gptq < e_rtn, (bits, e_gptq, e_rtn)
        assert math.isclose(s.stats["out_err"], e_gptq, rel_tol=1e-3)                # stats match the dense reference
        e_act = layer_err(W, gptq.gptq_quantize(W, H, bits, 32, act_order=True).dequantize(), H)
        assert e_act < e_rtn


@pytest.mark.parametrize("static", [True, False])
def test_gptq_matches_the_textbook_column_loop(static):
    """Blocked LDLQ form (static grid) and blocked GPTQ form (dynamic grid) against gptq.gptq_reference, the dense
    per-column GPTQ loop in fp64: the same codes up to rounding ties."""
    H, W = correlated_H(96, 17), rand_W(16, 96, 18)
    ref = gptq.gptq_reference(W, H, 3, 32, static_groups=static)
    fast = gptq.gptq_quantize(W, H, 3, 32, block_size=64 if static else 32, static_groups=static)
    Q, R = fast.dequantize(), ref.dequantize()
    assert (Q != R).float().mean() < 0.01
    assert abs(layer_err(W, Q, H) / layer_err(W, R, H) - 1) < 1e-3
    if static:                                                                        # the same grid
        assert torch.equal(fast.scales, ref.scales) and torch.equal(fast.zeros, ref.zeros)


def test_gptq_reference_is_a_grid_state_that_beats_rtn():
    """The reference's codes lie on its grid (eq. 1), a dead input gives a zero column, and its error feedback
    beats RTN on correlated inputs."""
    H, W = correlated_H(64, 31), rand_W(12, 64, 32)
    H[7, :] = 0
    H[:, 7] = 0
    s = gptq.gptq_reference(W, H, 3, 16)
    assert s.codes.dtype == torch.uint8 and int(s.codes.max()) <= 7 and s.scales.dtype == torch.float16
    assert torch.equal(s.dequantize()[:, 7], torch.zeros(12))
    assert layer_err(W, s.dequantize(), H) < layer_err(W, gptq.quantize_rtn(W, 3, 16).dequantize(), H)
    fast = gptq.gptq_quantize(W, H, 3, 16)
    assert (fast.codes != s.codes).float().mean() < 0.01


def test_gptq_block_size_does_not_change_the_result_much():
    """Lazy block updates are a reordering of the same arithmetic: blocks of 16, 48 and 128 agree."""
    H, W = correlated_H(96, 3), rand_W(16, 96, 4)
    ref = gptq.gptq_quantize(W, H, 4, 32, block_size=128).dequantize()
    for bs in (16, 48):
        Q = gptq.gptq_quantize(W, H, 4, 32, block_size=bs).dequantize()
        assert (Q != ref).float().mean() < 0.01                                        # rounding ties only


@pytest.mark.parametrize("kw", [dict(), dict(act_order=True), dict(static_groups=False, block_size=32),
                                dict(act_order=True, clip=True, cd_passes=2, refit=True),
                                dict(static_groups=False, block_size=32, clip=True, cd_passes=1, refit=True)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_group_uses_at_most_2_to_the_b_values(bits, kw):
    g = 16
    H, W = correlated_H(64, 5), rand_W(12, 64, 6)
    s = gptq.gptq_quantize(W, H, bits, g, **kw)
    Q = s.dequantize().reshape(12, 64 // g, g)
    for row in Q.reshape(-1, g):
        assert row.unique().numel() <= 2 ** bits
    assert s.codes.dtype == torch.uint8 and int(s.codes.max()) <= 2 ** bits - 1
    assert int(s.zeros.max()) <= 2 ** bits - 1 and bool((s.scales.float() > 0).all())


def test_act_order_keeps_the_static_grid_of_the_original_order():
    H, W = correlated_H(64, 7, outliers=1.5), rand_W(8, 64, 8)
    s = gptq.gptq_quantize(W, H, 3, 16, act_order=True)
    r = gptq.quantize_rtn(W, 3, 16)
    assert torch.equal(s.scales, r.scales) and torch.equal(s.zeros, r.zeros)         # no g_idx needed


def test_dead_columns_are_zeroed_and_deterministic():
    H, W = correlated_H(64, 9), rand_W(8, 64, 10)
    H[5, :] = 0
    H[:, 5] = 0
    a = gptq.gptq_quantize(W, H, 4, 16)
    b = gptq.gptq_quantize(W, H, 4, 16)
    assert torch.equal(a.codes, b.codes) and a.stats["dead"] == 1
    assert torch.equal(a.dequantize()[:, 5], torch.zeros(8))


def test_non_positive_definite_H_triggers_damping_retry():
    n = 32
    g = torch.Generator().manual_seed(11)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    ev = torch.ones(n)
    ev[0] = -0.05                                                                     # 5 % of mean(diag) below 0
    H = U @ torch.diag(ev) @ U.T
    s = gptq.gptq_quantize(rand_W(4, n, 12), H, 4, 16, damp=0.01)
    assert s.stats["retries"] == 1 and math.isclose(s.stats["damp"], 0.1)
    assert gptq.gptq_quantize(rand_W(4, n, 12), torch.eye(n), 4, 16).stats["retries"] == 0
    ev[0] = -40.0 * n                                                                 # hopeless even at λ = 10
    ev[1:] = 50.0
    with pytest.raises(ValueError, match="model.layers.3.mlp.up_proj"):
        gptq.gptq_quantize(rand_W(4, n, 12), U @ torch.diag(ev) @ U.T, 4, 16, name="model.layers.3.mlp.up_proj")


def test_bad_arguments_raise():
    W = rand_W(4, 64, 0)
    for bits in (1, 5, 8, 2.0, True, "4"):
        with pytest.raises(ValueError, match="bits"):
            gptq.quantize_rtn(W, bits, 32)
        with pytest.raises(ValueError, match="bits"):
            gptq.gptq_quantize(W, torch.eye(64), bits, 32)
        with pytest.raises(ValueError, match="bits"):
            gptq.pack_codes(torch.zeros(32, dtype=torch.uint8), bits)
    for g in (0, -8, 48, 128, 16.0):
        with pytest.raises(ValueError, match="group_size"):
            gptq.quantize_rtn(W, 4, g)
        with pytest.raises(ValueError, match="group_size"):
            gptq.gptq_quantize(W, torch.eye(64), 4, g)
    with pytest.raises(ValueError, match="group_size"):
        gptq.QuantLinear(60, 4, 4, 64)
    with pytest.raises(ValueError, match=r"\(64, 64\)"):
        gptq.gptq_quantize(W, torch.eye(32), 4, 32)
    with pytest.raises(ValueError, match="act_order"):
        gptq.gptq_quantize(W, torch.eye(64), 4, 32, act_order=True, static_groups=False)
    for cd in (-1, 1.5, True):
        with pytest.raises(ValueError, match="cd_passes"):
            gptq.gptq_quantize(W, torch.eye(64), 4, 32, cd_passes=cd)
    with pytest.raises(ValueError, match="shrink"):
        gptq.fit_groups_clipped(W, 4, 32, shrink=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight"):
        gptq.fit_groups_clipped(W, 4, 32, weight=torch.ones(32))
    with pytest.raises(ValueError, match="diagonal"):
        gptq.coordinate_descent(W, gptq.quantize_rtn(W, 4, 32), torch.zeros(64, 64))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        gptq.pack_codes(torch.full((5,), 4, dtype=torch.uint8), 2)


# --------------------------------------------------------------------------------------------- GPTQ options
def weighted_group_err(W, s, wt):
    """Σ_i wt_i (w_i − ŵ_i)² per group, fp64. (m, G)"""
    g = s.group_size
    E = (W.double() - s.dequantize().double()) ** 2 * wt.double()
    return E.reshape(W.shape[0], -1, g).sum(-1)


@FAST
@given(bits=st.sampled_from([2, 3, 4]), g=st.sampled_from([8, 16, 32]), seed=st.integers(0, 2 ** 16),
       outlier=st.sampled_from([0.0, 4.0, 20.0]), weighted=st.booleans())
def test_clip_search_never_loses_to_minmax(bits, g, seed, outlier, weighted):
    """The clipped grid's weighted rounding error per group is at most min–max's (p = 1 is a candidate), and the
    Lloyd polish never raises it over the grid search alone."""
    m, n = 6, 2 * g
    W = rand_W(m, n, seed)
    W[:, 3] *= 1 + outlier                                                            # an outlier column
    gen = torch.Generator().manual_seed(seed + 1)
    wt = torch.rand(n, generator=gen) ** 3 * 10 if weighted else torch.ones(n)
    sc, zc = gptq.fit_groups_clipped(W, bits, g, wt if weighted else None)
    s0, z0 = gptq.fit_groups(W, bits, g)
    maxq = 2 ** bits - 1
    Wg = W.reshape(m, n // g, g)
    def st_(s, z):                                                                    # RTN on the grid (s, z)
        q = gptq._round_codes(Wg, s.float()[..., None], z.float()[..., None], maxq)
        return gptq.QuantState(q.reshape(m, n).to(torch.uint8), s, z, bits, g)
    e_clip, e_mm = weighted_group_err(W, st_(sc, zc), wt), weighted_group_err(W, st_(s0, z0), wt)
    assert (e_clip <= e_mm * (1 + 1e-5) + 1e-12).all()
    assert sc.dtype == torch.float16 and zc.dtype == torch.uint8 and int(zc.max()) <= maxq
    e_grid = weighted_group_err(W, st_(*gptq.fit_groups_clipped(W, bits, g, wt if weighted else None, polish=0)), wt)
    assert (e_clip <= e_grid * (1 + 1e-5) + 1e-12).all()
    only_p1 = gptq.fit_groups_clipped(W, bits, g, wt, shrink=(1.0,), polish=0)       # p = 1 alone is min–max
    assert torch.equal(only_p1[0], s0) and torch.equal(only_p1[1], z0)
    if outlier >= 20.0:                                                               # a lone outlier: clipping wins
        assert e_clip.sum() < e_mm.sum()


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2 ** 16), bits=st.sampled_from([2, 3, 4]), act_order=st.booleans(),
       refit=st.booleans(), clip=st.booleans())
def test_cd_passes_never_raise_the_output_error(seed, bits, act_order, refit, clip):
    """GPTQ, then k passes of coordinate descent (each followed by a scale refit or not): each run extends the
    previous one's steps, and the error never rises in k."""
    H, W = correlated_H(64, seed, outliers=1.0), rand_W(12, 64, seed + 1)
    errs = [layer_err(W, gptq.gptq_quantize(W, H, bits, 16, block_size=32, act_order=act_order, clip=clip,
                                            cd_passes=k, refit=refit and k > 0).dequantize(), H) for k in range(4)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0]                                                         # and it does something


def test_cd_converges_to_a_coordinatewise_minimum():
    """After CD stops changing codes, no single code moved by ±1 (within range) lowers a row's error: dense check."""
    bits, g = 3, 8
    H, W = correlated_H(32, 21), rand_W(5, 32, 22)
    s = gptq.gptq_quantize(W, H, bits, g, block_size=16)
    c = gptq.coordinate_descent(W, s, H, passes=50, block_size=16)
    assert c.stats["cd_changed"][-1] == 0 and sum(c.stats["cd_changed"]) > 0
    Hd = H.double()
    row_err = lambda Q: (((W.double() - Q) @ Hd) * (W.double() - Q)).sum(-1)       # noqa: E731  (m,)
    base = row_err(c.dequantize().double())
    for j in range(32):
        for step in (-1, 1):
            codes = c.codes.clone().to(torch.int16)
            codes[:, j] += step
            ok = (codes[:, j] >= 0) & (codes[:, j] <= 2 ** bits - 1)
            moved = gptq.QuantState(codes.clamp(0, 2 ** bits - 1).to(torch.uint8), c.scales, c.zeros, bits, g)
            e = row_err(moved.dequantize().double())
            assert (e[ok] >= base[ok] * (1 - 1e-6)).all(), (j, step)


def test_refit_scales_is_the_row_least_squares_solution():
    """With the codes fixed, refit_scales gives each row the least-squares scales (fp16), found densely through
    an explicit root R; it never raises a row's error, and it cannot improve on its own result."""
    bits, g, m, n = 4, 16, 6, 64
    H, W = correlated_H(n, 23), rand_W(m, n, 24)
    s = gptq.gptq_quantize(W, H, bits, g)
    off = gptq.QuantState(s.codes, (s.scales.float() * 1.3).half(), s.zeros, bits, g)   # scales deliberately off
    r = gptq.refit_scales(W, off, H)
    assert torch.equal(r.codes, off.codes) and torch.equal(r.zeros, off.zeros)
    lam, U = torch.linalg.eigh(H.double())
    R = lam.clamp(min=0).sqrt()[:, None] * U.T                                       # RᵀR = H
    u = (s.codes.double() - s.zeros.double().repeat_interleave(g, 1))                # (m, n)
    for i in range(m):
        A = torch.zeros(n, n // g, dtype=torch.float64)                              # ŵ_i = A s
        for a in range(n // g):
            A[a * g:(a + 1) * g, a] = u[i, a * g:(a + 1) * g]
        sol = torch.linalg.lstsq(R @ A, R @ W[i].double()).solution
        assert torch.allclose(r.scales[i].double(), sol, rtol=2e-3)                   # fp16 rounding of the LS
    e_off = layer_err(W, off.dequantize(), H)
    e_r = layer_err(W, r.dequantize(), H)
    assert e_r < 0.9 * e_off and e_r <= layer_err(W, s.dequantize(), H) * (1 + 1e-6)
    again = gptq.refit_scales(W, r, H)
    assert layer_err(W, again.dequantize(), H) <= e_r * (1 + 1e-6)



@FAST
@given(seed=st.integers(0, 2 ** 16), bits=st.sampled_from([2, 3, 4]))
def test_refit_scales_never_raises_a_row_error(seed, bits):
    """Arbitrary codes (often anti-aligned with W, so some least-squares scales come out negative and are kept
    at their old value): every row's error is at most what it was."""
    g, m, n = 8, 8, 32
    gen = torch.Generator().manual_seed(seed)
    H, W = correlated_H(n, seed), rand_W(m, n, seed + 1)
    maxq = 2 ** bits - 1
    s = gptq.QuantState(torch.randint(0, maxq + 1, (m, n), generator=gen, dtype=torch.uint8),
                        (torch.rand(m, n // g, generator=gen) * 0.02 + 1e-3).half(),
                        torch.randint(0, maxq + 1, (m, n // g), generator=gen, dtype=torch.uint8), bits, g)
    r = gptq.refit_scales(W, s, H)
    def row_err(st_):                                                                 # (m,) fp64
        E = W.double() - st_.dequantize().double()
        return ((E @ H.double()) * E).sum(-1)
    assert (row_err(r) <= row_err(s) * (1 + 1e-9) + 1e-15).all()


POLISH = [dict(cd_passes=1), dict(refit=True), dict(cd_passes=2, refit=True), dict(clip=True, cd_passes=2),
          dict(act_order=True, clip=True, cd_passes=2, refit=True), dict(act_order=True, refit=True),
          dict(static_groups=False, block_size=32, clip=True, cd_passes=1, refit=True),
          dict(act_order=True, clip=True, cd_passes=2, refit=True, fp16_exact=True)]


@pytest.mark.parametrize("kw", POLISH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gptq_options_are_classic_gptq_then_polish_bitwise(kw, dtype):
    """gptq_quantize with cd_passes/refit is classic GPTQ (on the grid its clip option gives) followed by
    gptq.polish, bit for bit, with a dead input and an fp32 or fp64 Hessian."""
    H, W = correlated_H(64, 27).to(dtype), rand_W(10, 64, 28)
    H[9, :] = 0
    H[:, 9] = 0
    full = gptq.gptq_quantize(W, H, 3, 16, **kw)
    grid = {k: v for k, v in kw.items() if k not in ("cd_passes", "refit")}
    classic = gptq.gptq_quantize(W, H, 3, 16, **grid)
    p = gptq.polish(W, classic, H, cd_passes=kw.get("cd_passes", 0), refit=kw.get("refit", False),
                    act_order=kw.get("act_order", False), block_size=kw.get("block_size", 128),
                    fp16_exact=kw.get("fp16_exact", False))
    assert torch.equal(p.codes, full.codes) and torch.equal(p.scales, full.scales) and torch.equal(p.zeros, full.zeros)
    assert p.stats["cd_changed"] == full.stats["cd_changed"]
    assert layer_err(W, p.dequantize(), H) <= layer_err(W, classic.dequantize(), H) * (1 + 1e-6)
    nothing = gptq.polish(W, classic, H)                                              # no pass, no refit: unchanged
    assert torch.equal(nothing.codes, classic.codes) and torch.equal(nothing.scales, classic.scales)
    with pytest.raises(ValueError, match="do not match"):
        gptq.polish(W[:, :32], classic, H)
    with pytest.raises(ValueError, match="cd_passes"):
        gptq.polish(W, classic, H, cd_passes=-1)


def test_options_are_deterministic_and_default_off():
    H, W = correlated_H(64, 25), rand_W(10, 64, 26)
    kw = dict(act_order=True, clip=True, cd_passes=2, refit=True)
    a, b = gptq.gptq_quantize(W, H, 3, 16, **kw), gptq.gptq_quantize(W, H, 3, 16, **kw)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    assert a.stats["clip"] and a.stats["refit"] and len(a.stats["cd_changed"]) == 2
    plain = gptq.gptq_quantize(W, H, 3, 16)
    off = gptq.gptq_quantize(W, H, 3, 16, clip=False, cd_passes=0, refit=False)
    assert torch.equal(plain.codes, off.codes) and plain.stats["cd_changed"] == []
    assert a.stats["rel_err"] < plain.stats["rel_err"]


# --------------------------------------------------------------------------------------------- MagR
def test_linf_prox_is_moreau_of_l1_ball_projection():
    g = torch.Generator().manual_seed(13)
    V = torch.randn(200, 16, generator=g) * torch.rand(200, 1, generator=g)
    V[:3] = 0
    for tau in (1e-4, 0.05, 1.0, 50.0):
        P = gptq.project_l1_ball(V, tau)
        assert (P.abs().sum(-1) <= tau * (1 + 1e-5) + 1e-6).all()                    # in the ball
        assert close(gptq.prox_linf_groups(V, tau, 16), V - P, atol=1e-6)


def test_l1_ball_projection_against_brute_force():
    """Projection optimality: the KKT form P = sign(v)·max(|v| − θ, 0) with ‖P‖₁ = τ, checked by bisection on θ."""
    g = torch.Generator().manual_seed(14)
    V = torch.randn(50, 8, generator=g, dtype=torch.float64)
    tau = 0.7
    P = gptq.project_l1_ball(V, tau)
    lo, hi = torch.zeros(50, 1, dtype=torch.float64), V.abs().amax(-1, keepdim=True)
    for _ in range(100):
        mid = (lo + hi) / 2
        big = (V.abs() - mid).clamp(min=0).sum(-1, keepdim=True) > tau
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    ref = torch.sign(V) * (V.abs() - lo).clamp(min=0)
    ref = torch.where(V.abs().sum(-1, keepdim=True) <= tau, V, ref)
    assert close(P, ref, atol=1e-9)


def test_magr_lowers_group_linf_and_keeps_output_close():
    n, m, g = 128, 16, 32
    H, W = correlated_H(n, 15), rand_W(m, n, 16)
    W[:, 7] = 0.2                                                                     # an outlier column
    Wm = gptq.magr(W, H, alpha=1e-4, group_size=g, iters=100)
    linf = lambda A: A.reshape(m, n // g, g).abs().amax(-1)                          # noqa: E731
    assert (linf(Wm) <= linf(W) + 1e-6).all() and linf(Wm).mean() < 0.95 * linf(W).mean()
    # the output moves by far less than 4-bit rounding moves it
    assert layer_err(W, Wm, H) < 0.25 * layer_err(W, gptq.quantize_rtn(W, 4, g).dequantize(), H)
    assert torch.equal(gptq.magr(W, H, alpha=1e-4, group_size=g, iters=0), W)


# --------------------------------------------------------------------------------------------- packing, module, files
@FAST
@given(bits=st.sampled_from([2, 3, 4]), shape=st.tuples(st.integers(1, 7), st.integers(1, 70)),
       seed=st.integers(0, 2 ** 16))
def test_pack_unpack_roundtrip_is_bitwise(bits, shape, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, shape, generator=g, dtype=torch.uint8)
    codes.view(-1)[0] = 2 ** bits - 1                                                 # the top bit in plane b−1
    words = gptq.pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.numel() == math.ceil(codes.numel() / 32) * bits
    assert torch.equal(gptq.unpack_codes(words, bits, shape), codes)


def make_layer(bits=2, m=24, n=128, g=64, bias=True, seed=0):
    W = rand_W(m, n, seed)
    s = gptq.gptq_quantize(W, correlated_H(n, seed), bits, g)
    b = torch.randn(m, generator=torch.Generator().manual_seed(seed)) if bias else None
    return s, gptq.QuantLinear.from_state(s, bias=b), b


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantlinear_forward_and_state(bits):
    s, ql, b = make_layer(bits, m=20, n=96, g=32)
    assert (ql.in_features, ql.out_features) == (96, 20)
    st_ = ql.state()
    assert torch.equal(st_.codes, s.codes) and torch.equal(st_.zeros, s.zeros) and torch.equal(st_.scales, s.scales)
    assert torch.equal(ql.dequantize(), s.dequantize())
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ql(x), x @ ql.dequantize().T + b)
    ql.chunk_rows = 8                                                                  # 8·96 codes: word-aligned rows
    assert close(ql(x), x @ ql.dequantize().T + b, atol=1e-5, rtol=1e-5)
    assert torch.equal(ql.dequantize(rows=(8, 16)), s.dequantize()[8:16])
    assert torch.equal(ql.dequantize(rows=(3, 20)), s.dequantize()[3:20])
    assert not any(t.is_floating_point() and t.numel() >= 20 * 96 for t in ql.buffers())  # no float weight copy
    scales = ql.scales.clone()
    ql.to(torch.bfloat16)                                                              # casts the bias only
    assert torch.equal(ql.scales, scales) and ql.bias.dtype == torch.bfloat16


def test_quantlinear_2bit_group64_is_at_most_016_of_fp16():
    for m, n in ((576, 576), (1536, 576), (576, 1536), (192, 576)):                # the demo's layer shapes
        ql = gptq.QuantLinear(n, m, 2, 64)                                             # buffers of the packed sizes
        assert ql.nbytes() <= 0.16 * (m * n * 2), (m, n, ql.nbytes() / (m * n * 2))
    # exact count: 2 bits/code, 16/64 bits/weight of scale, 2/64 of zero point
    ql = gptq.QuantLinear.from_state(gptq.quantize_rtn(rand_W(576, 576, 0), 2, 64))
    assert ql.nbytes() == 576 * 576 * 2 // 8 + 576 * 9 * 2 + 576 * 9 * 2 // 8


def test_save_load_roundtrip_is_bitwise(tmp_path):
    layers = {}
    for i, bits in enumerate((2, 3, 4)):
        layers[f"model.layers.{i}.mlp.up_proj"] = make_layer(bits, bias=(i != 1), seed=i)[1]
    path = tmp_path / "q.safetensors"
    gptq.save_quantized(path, layers, {"model": "demo", "bits": "mixed"})
    loaded, meta = gptq.load_quantized(path)
    assert meta == {"model": "demo", "bits": "mixed"} and loaded.keys() == layers.keys()
    for name, ql in layers.items():
        lq = loaded[name]
        assert (lq.bits, lq.group_size, lq.in_features, lq.out_features) == (ql.bits, ql.group_size, 128, 24)
        for a, b in zip(ql.buffers(), lq.buffers()):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert torch.equal(lq.dequantize(), ql.dequantize())
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        gptq.load_quantized(tmp_path / "nope.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_cpu_grid():
    W, H = rand_W(64, 128, 0), correlated_H(128, 0)
    s = gptq.gptq_quantize(W.cuda(), H.cuda(), 3, 64)
    kw = dict(act_order=True, clip=True, cd_passes=2, refit=True)
    so, so_cpu = gptq.gptq_quantize(W.cuda(), H.cuda(), 3, 64, **kw), gptq.gptq_quantize(W, H, 3, 64, **kw)
    assert so.codes.is_cuda and abs(so.stats["rel_err"] / so_cpu.stats["rel_err"] - 1) < 1e-3
    assert (so.codes.cpu() != so_cpu.codes).float().mean() < 0.01                    # rounding ties only
    assert s.codes.is_cuda and s.stats["rel_err"] < gptq.output_error(W, gptq.quantize_rtn(W, 3, 64).dequantize(), H)[1]
    r = gptq.quantize_rtn(W.cuda(), 3, 64)
    assert torch.equal(r.codes.cpu(), gptq.quantize_rtn(W, 3, 64).codes)
    ql = gptq.QuantLinear.from_state(s).cuda()
    x = torch.randn(4, 128, device="cuda")
    assert torch.equal(ql(x), x @ ql.dequantize().T)
    assert torch.equal(gptq.unpack_codes(gptq.pack_codes(s.codes, 3), 3, s.codes.shape), s.codes)
    assert close(gptq.magr(W.cuda(), H.cuda(), iters=5).cpu(), gptq.magr(W, H, iters=5), atol=1e-6, rtol=1e-4)
