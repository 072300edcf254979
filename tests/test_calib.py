"""calib.py: the reference Hessian XᵀX / N, the streaming collection against it on explicitly captured inputs,
damping, the whitening root, windows."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import calib

SET = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.up_proj = nn.Linear(d, h)
        self.down_proj = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down_proj(torch.tanh(self.up_proj(x)))


class ToyLM(nn.Module):
    """model.layers.<i>.{up,down}_proj + lm_head, called as model(input_ids, attention_mask=...)."""

    def __init__(self, vocab=50, d=8, h=12, n_layers=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList([Block(d, h) for _ in range(n_layers)])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        x = self.model.embed_tokens(input_ids)
        for blk in self.model.layers:
            x = blk(x)
        return self.lm_head(x)


def capture_inputs(model, batches, names):
    """Every named module's input rows (non-padded), kept explicitly: the X of calib.hessian_reference."""
    rows = {n: [] for n in names}
    state = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: rows[n].append(args[0][state["mask"].bool()].double())) for n in names]
    try:
        for b in batches:
            state["mask"] = b["attention_mask"]
            model(b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def padded_batches(seed=0, n_batches=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, 50, (2, 7), generator=g)
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 4:] = 0                                            # right padding
        ids[1, 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


NAMES = [f"model.layers.{i}.{p}" for i in range(3) for p in ("up_proj", "down_proj")]


@SET
@given(st.integers(1, 30), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_hessian_reference_is_the_mean_outer_product(N, n, seed):
    """H = XᵀX / N = (1/N) Σ_t x_t x_tᵀ, float64, symmetric positive semi-definite, whatever the leading shape."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n, generator=g)
    H = calib.hessian_reference(X)
    want = sum(torch.outer(x, x) for x in X.double()) / N
    assert H.dtype == torch.float64 and H.shape == (n, n)
    torch.testing.assert_close(H, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)
    assert torch.linalg.eigvalsh(H).min() > -1e-10
    torch.testing.assert_close(calib.hessian_reference(X.reshape(1, N, n)), H, rtol=0, atol=0)


def test_hessian_reference_errors():
    with pytest.raises(ValueError, match="no token rows"):
        calib.hessian_reference(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="last dimension"):
        calib.hessian_reference(torch.tensor(1.0))


def test_default_names_skip_lm_head():
    assert calib._default_names(ToyLM()) == NAMES
    assert calib.block_of("model.layers.12.mlp.up_proj") == "model.layers.12"
    assert calib.block_of("lm_head") == "lm_head"


@pytest.mark.parametrize("offload,product", [(False, torch.float64), (True, torch.float64), (False, torch.float32)])
def test_hessians_equal_explicit_xtx_over_unpadded_tokens(offload, product):
    model = ToyLM()
    batches = padded_batches()
    H = calib.collect_hessians(model, batches, offload=offload, product_dtype=product)
    X = capture_inputs(model, batches, NAMES)
    assert sorted(H) == sorted(NAMES)
    for name in NAMES:
        assert X[name].shape[0] == 3 * (7 + 4)                     # padded positions excluded
        assert H[name].dtype == torch.float64 and H[name].device.type == "cpu"
        tol = 1e-12 if product == torch.float64 else 1e-6
        torch.testing.assert_close(H[name], calib.hessian_reference(X[name]), rtol=tol, atol=tol)
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks gone


def test_forward_stops_after_the_last_target_and_hooks_go_on_error():
    model = ToyLM()
    ran_head = []
    model.lm_head.register_forward_pre_hook(lambda m, a: ran_head.append(1))
    calib.collect_hessians(model, padded_batches())
    assert ran_head == []                                          # truncated before lm_head
    n_hooks = len(model.lm_head._forward_pre_hooks)

    class Boom(Exception):
        pass

    def bad_batches():
        yield padded_batches()[0]
        raise Boom

    with pytest.raises(Boom):
        calib.collect_hessians(model, bad_batches())
    assert all(not m._forward_pre_hooks for n, m in model.named_modules() if n != "lm_head")
    assert len(model.lm_head._forward_pre_hooks) == n_hooks
    with pytest.raises(ValueError, match="no module"):
        calib.collect_hessians(model, padded_batches(), ["model.layers.9.up_proj"])


def test_sequential_mode_sees_the_quantized_preceding_blocks():
    batches = padded_batches(seed=1)
    seen_blocks = []

    def quantize_block(block, hs):                                 # crude 'quantization' of the block just done
        seen_blocks.append((block, sorted(hs)))
        for name in hs:
            lin = model.get_submodule(name)
            with torch.no_grad():
                lin.weight.copy_(torch.round(lin.weight * 4) / 4)

    model = ToyLM(seed=3)
    H_seq = calib.collect_hessians(model, batches, sequential=True, on_block=quantize_block)
    assert [b for b, _ in seen_blocks] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert seen_blocks[0][1] == ["model.layers.0.down_proj", "model.layers.0.up_proj"]
    # reference: quantize blocks 0..i-1 of a fresh copy, capture block i's inputs
    ref = ToyLM(seed=3)
    for i in range(3):
        names = [f"model.layers.{i}.up_proj", f"model.layers.{i}.down_proj"]
        X = capture_inputs(ref, batches, names)
        for name in names:
            torch.testing.assert_close(H_seq[name], calib.hessian_reference(X[name]))
        with torch.no_grad():
            for name in names:
                ref.get_submodule(name).weight.copy_(torch.round(ref.get_submodule(name).weight * 4) / 4)
    # and block 1 differs from the full-precision (paper) Hessian of the same layer
    H_fp = calib.collect_hessians(ToyLM(seed=3), batches)
    assert not torch.allclose(H_fp["model.layers.1.up_proj"], H_seq["model.layers.1.up_proj"])
    torch.testing.assert_close(H_fp["model.layers.0.up_proj"], H_seq["model.layers.0.up_proj"])
    with pytest.raises(ValueError, match="re-iterable"):
        calib.collect_hessians(ToyLM(), iter(batches), sequential=True)


def test_linears_sharing_one_input_get_the_same_hessian():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.o = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, input_ids, attention_mask=None):
            x = torch.sin(input_ids[..., None].float() * torch.arange(1, 7))
            return self.o(self.q(x) * self.k(x))

    model = Shared()
    batches = padded_batches()
    H = calib.collect_hessians(model, batches, ["q", "k", "o"])
    X = capture_inputs(model, batches, ["q", "k", "o"])
    for name in ("q", "k", "o"):
        torch.testing.assert_close(H[name], calib.hessian_reference(X[name]))
    assert H["q"] is not H["k"] and torch.equal(H["q"], H["k"])


def test_bare_id_tensors_and_all_padded_layer():
    model = ToyLM()
    ids = torch.randint(0, 50, (2, 5))
    H = calib.collect_hessians(model, [ids], ["model.layers.0.up_proj"])
    X = model.model.embed_tokens(ids).reshape(-1, 8).double()
    torch.testing.assert_close(H["model.layers.0.up_proj"], calib.hessian_reference(X))
    with pytest.raises(ValueError, match="no unmasked token"):
        calib.collect_hessians(model, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}])


@SET
@given(st.integers(1, 40), st.integers(0, 2**31 - 1), st.floats(0, 0.1))
def test_damp_and_whitening_root(n, seed, lam):
    g = torch.Generator().manual_seed(seed)
    N = max(1, n // 2)                                             # often rank-deficient
    X = torch.randn(N, n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64)
    H = X.T @ X / N
    Hd = calib.damp(H, lam)
    torch.testing.assert_close(Hd - H, lam * H.diagonal().mean() * torch.eye(n, dtype=torch.float64))
    for A in (H, Hd):
        R = calib.whitening_root(A)
        torch.testing.assert_close(R.T @ R, A, atol=1e-10 * float(A.abs().max()) + 1e-14, rtol=1e-8)
    R = calib.whitening_root(H)
    M = torch.randn(3, n, generator=g, dtype=torch.float64)
    lhs = (X @ M.T).norm() ** 2                                    # ‖X Mᵀ‖² = N ‖M Rᵀ‖²
    torch.testing.assert_close(lhs, N * (M @ R.T).norm() ** 2, rtol=1e-8, atol=1e-10)


def test_damp_zero_and_errors():
    Z = torch.zeros(3, 3)
    torch.testing.assert_close(calib.damp(Z, 0.01), 0.01 * torch.eye(3))
    with pytest.raises(ValueError, match="square"):
        calib.damp(torch.zeros(2, 3), 0.01)
    with pytest.raises(ValueError, match="square"):
        calib.whitening_root(torch.zeros(2, 3))


def test_calibration_windows_are_seeded_slices():
    stream = torch.arange(1000) * 3
    w1 = calib.calibration_windows(stream, 8, 32, torch.Generator().manual_seed(4))
    w2 = calib.calibration_windows(stream.tolist(), 8, 32, torch.Generator().manual_seed(4))
    w3 = calib.calibration_windows(stream, 8, 32, torch.Generator().manual_seed(5))
    assert w1.shape == (8, 32) and w1.dtype == torch.long
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)
    assert bool((w1[:, 1:] - w1[:, :-1] == 3).all())               # contiguous windows of the stream
    assert int(w1.max()) <= 2997
    full = calib.calibration_windows(stream[:32], 2, 32, torch.Generator())
    assert torch.equal(full[0], stream[:32])
    with pytest.raises(ValueError, match="fewer than seq_len"):
        calib.calibration_windows(stream[:10], 1, 32, torch.Generator())
    batches = calib.window_batches(w1, 3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 2]
    assert all(bool(b["attention_mask"].all()) for b in batches)


def test_save_load_hessians(tmp_path):
    H = calib.collect_hessians(ToyLM(), padded_batches())
    calib.save_hessians(tmp_path / "h.safetensors", H, {"n_windows": 3})
    back, meta = calib.load_hessians(tmp_path / "h.safetensors")
    assert meta == {"n_windows": 3}
    assert sorted(back) == sorted(H) and all(torch.equal(back[k], H[k]) for k in H)
    with pytest.raises(FileNotFoundError):
        calib.load_hessians(tmp_path / "nope.safetensors")
