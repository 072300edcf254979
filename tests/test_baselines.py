"""baselines.py: kernels, the init of every adapter × selection, LoRA/CLoQ, modules, save/load."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import baselines as bl
import calib
import gptq
import model as model_lib
import qwha


def problem(m=24, n=32, seed=0, noise=0.1):
    """(W, E, H): a weight, a quantization-like error and a correlated, full-rank H (float64)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    E = noise * torch.randn(m, n, generator=g, dtype=torch.float64)
    E[g.seed() % m, :3] += 1.0                                       # an outlier channel
    X = torch.randn(4 * n, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return W, E, X.T @ X / X.shape[0]


def dense_delta(li, kernel, dims, m, n):
    F = torch.zeros(m, n, dtype=torch.float64)
    F[li.indices[0], li.indices[1]] = li.values.double()
    D = F @ bl.kernel_matrix(kernel, n, torch.float64)
    return bl.kernel_matrix(kernel, m, torch.float64).T @ D if dims == 2 else D


# ---------------------------------------------------------------------------------------------- kernels


@settings(max_examples=15, deadline=None)
@given(kind=st.sampled_from(["dct", "dht", "identity"]), n=st.integers(1, 97))
def test_dense_kernels_orthonormal(kind, n):
    T = bl.kernel_matrix(kind, n, torch.float64)
    assert torch.allclose(T @ T.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, n, dtype=torch.float64)
    k = bl.Kernel(kind, n)
    assert torch.allclose(k.forward(x), x @ T.T) and torch.allclose(k.inverse(k.forward(x)), x, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 16, 12, 24, 36 * 4, 20 * 8])
def test_wht_kernel_orthonormal_and_fast_path_equal(n):
    T = bl.kernel_matrix("wht", n, torch.float64)
    assert torch.allclose(T @ T.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, n, dtype=torch.float64)
    k = bl.Kernel("wht", n)
    assert torch.allclose(k.forward(x), x @ T.T, atol=1e-12) and torch.allclose(k.inverse(x), x @ T, atol=1e-12)


def test_kernel_definitions_and_errors():
    n = 8
    j = torch.arange(n, dtype=torch.float64)
    assert torch.allclose(bl.kernel_matrix("dct", n, torch.float64)[3],
                          math.sqrt(2 / n) * torch.cos(math.pi * (j + .5) * 3 / n))
    assert torch.allclose(bl.kernel_matrix("dht", n, torch.float64)[2],
                          (torch.cos(2 * math.pi * 2 * j / n) + torch.sin(2 * math.pi * 2 * j / n)) / math.sqrt(n))
    with pytest.raises(ValueError, match="kernel"):
        bl.kernel_matrix("dft", 8)
    with pytest.raises(ValueError):
        bl.Kernel("wht", 9)                                           # no Hadamard order 9


# ---------------------------------------------------------------------------------------------- init


@pytest.mark.parametrize("select", ["adaalloc", "magnitude", "random"])
@pytest.mark.parametrize("shape", [(24, 32), (40, 192)])
def test_wht_1d_equals_qwha(select, shape):
    """One problem setup (qwha.layer_problem) and one solve: the WHT baseline is QWHA's plain init bit for bit
    (float64 blocks, as baselines solve), its reported errors within round-off."""
    W, E, H = problem(*shape)
    B = 4 * sum(E.shape)
    ref = qwha.init_layer_full(E, H, B, select=select, rule="magnitude" if select == "magnitude" else "output",
                               generator=torch.Generator().manual_seed(3), fp32_min_k=None)
    li = bl.init_sparse_layer(E, H, B, "wht", 1, select=select, generator=torch.Generator().manual_seed(3))
    assert torch.equal(li.indices, ref.indices) and torch.equal(li.values, ref.values)
    assert li.err_before == pytest.approx(ref.err_before, rel=1e-12)
    assert li.err_select == pytest.approx(ref.err_select, rel=1e-9)
    assert li.err_refined == pytest.approx(ref.err_refined, rel=1e-9)


@pytest.mark.parametrize("kernel", bl.KERNELS)
def test_layer_problem_with_a_kernel_is_the_dense_problem(kernel):
    """qwha.layer_problem with a baseline's kernel as its transform: C = E Tᵀ, G = T H Tᵀ, P = C G with the dense T,
    damped and undamped."""
    W, E, H = problem(seed=6)
    n = E.shape[1]
    pb = qwha.layer_problem(E, H, 1e-2, transform=bl.Kernel(kernel, n).forward)
    T = bl.kernel_matrix(kernel, n, torch.float64)
    Hd = calib.damp(H, 1e-2)
    for got, want in ((pb.C, E @ T.T), (pb.G, T @ Hd @ T.T), (pb.P, E @ Hd @ T.T), (pb.G_raw, T @ H @ T.T),
                      (pb.P_raw, E @ H @ T.T)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))
    assert torch.equal(pb.G, pb.G.T)


@pytest.mark.parametrize("kernel", bl.KERNELS)
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("select", ["adaalloc", "magnitude", "random", "ssh", "loca"])
def test_selection_budget_and_reported_error(kernel, dims, select):
    W, E, H = problem(seed=1)
    m, n = E.shape
    B = 3 * (m + n)
    li = bl.init_sparse_layer(E, H, B, kernel, dims, select=select, W=W, generator=torch.Generator().manual_seed(0))
    flat = li.indices[0] * n + li.indices[1]
    assert li.indices.shape == (2, B) and flat.unique().numel() == B               # exactly B, no duplicate
    assert torch.equal(flat, flat.sort().values)                                     # CSR order
    err = float(qwha.layer_error(E, H, dense_delta(li, kernel, dims, m, n)))
    assert li.err_refined == pytest.approx(err, rel=1e-8)
    if select == "loca":
        assert (li.values == 0).all() and li.err_refined == pytest.approx(li.err_before)
    else:
        assert li.err_refined <= li.err_select * (1 + 1e-9) and li.err_refined < li.err_before


def test_refine_off_and_qa_init_off():
    W, E, H = problem(seed=2)
    m, n = E.shape
    kw = dict(select="adaalloc", generator=torch.Generator().manual_seed(0))
    off = bl.init_sparse_layer(E, H, 80, "dct", 1, refine=False, **kw)
    C = E @ bl.kernel_matrix("dct", n, torch.float64).T
    assert torch.allclose(off.values.double(), C[off.indices[0], off.indices[1]].float().double())
    assert off.err_refined == off.err_select
    zero = bl.init_sparse_layer(E, H, 80, "dct", 1, qa_init=False, **kw)
    assert (zero.values == 0).all() and torch.equal(zero.indices, off.indices)


def test_full_budget_is_exact_and_2d_rotates_rows():
    W, E, H = problem(m=8, n=12, seed=4)
    for kernel in ("dct", "dht"):
        li = bl.init_sparse_layer(E, H, 8 * 12, kernel, 2)
        assert li.err_refined < 1e-6 * li.err_before


def test_ssh_half_by_weight_spectrum():
    W, E, H = problem(seed=5)
    m, n = W.shape
    B = 101
    sup = bl.select_ssh(W, B, torch.Generator().manual_seed(0))
    flat = (sup[0] * n + sup[1]).tolist()
    top = set(W.abs().reshape(-1).topk(B // 2).indices.tolist())
    assert len(flat) == len(set(flat)) == B and top <= set(flat)
    other = bl.select_ssh(W, B, torch.Generator().manual_seed(1))
    assert not torch.equal(sup, other)                                # the random half follows the seed


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(1, 8), damp=st.sampled_from([0.0, 1e-2]))
def test_cloq_error_is_the_svd_tail(seed, r, damp):
    W, E, H = problem(m=10, n=16, seed=seed)
    A, B = bl.cloq_init(E, H, r, damp=damp)
    Hd = calib.damp(H, damp)
    R = calib.whitening_root(Hd)
    s = torch.linalg.svdvals(E @ R.T)
    err = float(qwha.layer_error(E, Hd, B.double() @ A.double()))
    assert err == pytest.approx(float(s[r:].square().sum().sqrt()), rel=1e-4, abs=1e-6)
    # split symmetrically: ‖B‖_F = ‖A Rᵀ‖_F (both carry Σ^{1/2})
    assert float(B.double().norm()) == pytest.approx(float((A.double() @ R.T).norm()), rel=1e-4)


def test_outlier_coverage_bounds():
    W, E, H = problem(seed=6)
    m, n = E.shape
    full = torch.stack(torch.meshgrid(torch.arange(m), torch.arange(n), indexing="ij")).reshape(2, -1)
    assert bl.outlier_coverage(E, full, "wht")["energy"] == pytest.approx(1.0)
    # identity kernel: the outlier positions themselves capture everything
    k = round(0.1 * m * n)
    flat = E.abs().reshape(-1).topk(k).indices.sort().values
    cov = bl.outlier_coverage(E, torch.stack([flat // n, flat % n]), "identity")
    assert cov["energy"] == pytest.approx(1.0) and cov["abs"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- modules


def quant_base(m, n, seed=0, bias=False):
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    b = torch.randn(m) if bias else None
    return gptq.QuantLinear.from_state(gptq.quantize_rtn(W, 3, 16), bias=b)


@pytest.mark.parametrize("kernel,dims", [("dct", 1), ("dht", 2), ("identity", 1), ("wht", 2), ("dct", 2)])
@pytest.mark.parametrize("path", ["activations", "merged"])
def test_spectral_forward_equals_merged_weight(kernel, dims, path):
    m, n = 24, 32
    base = quant_base(m, n, bias=True)
    idx = torch.randperm(m * n, generator=torch.Generator().manual_seed(0))[:50].sort().values
    mod = bl.SpectralLinear(base, idx, torch.randn(50), kernel, dims, scale=0.5, path=path)
    x = torch.randn(2, 3, n)
    ref = x @ mod.merge().T + base.bias
    assert torch.allclose(mod(x), ref, atol=1e-4)
    assert torch.allclose(mod.merged_linear()(x), ref, atol=1e-4)
    assert torch.equal(mod.disable()(x), base(x))


def test_lora_forward_and_param_count():
    m, n, r = 24, 32, 4
    base = quant_base(m, n, bias=True)
    A, B = bl.lora_plain_init(m, n, r, torch.Generator().manual_seed(0))
    assert (B == 0).all() and A.abs().max() <= 1 / math.sqrt(n)
    mod = bl.LoRALinear(base, A, torch.randn(m, r), scale=2.0)
    x = torch.randn(5, n)
    assert torch.allclose(mod(x), x @ mod.merge().T + base.bias, atol=1e-4)
    assert sum(p.numel() for p in mod.parameters() if p.requires_grad) == r * (m + n)


def tiny_llama(seed=0):
    cfg = model_lib.ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                rms_norm_eps=1e-5, tie_word_embeddings=True)
    m = model_lib.init_weights(model_lib.LlamaForCausalLM(cfg), torch.Generator().manual_seed(seed))
    names = model_lib.linear_names(m)
    weights = {n: model_lib.get_module(m, n).weight.detach().clone() for n in names}
    g = torch.Generator().manual_seed(seed + 1)
    hess = {}
    for n in names:
        k = weights[n].shape[1]
        X = torch.randn(64, k, generator=g, dtype=torch.float64)
        hess[n] = X.T @ X / 64
        model_lib.set_module(m, n, gptq.QuantLinear.from_state(gptq.quantize_rtn(weights[n], 2, 16)))
    for p in m.parameters():
        p.requires_grad_(False)
    return m, weights, hess, names


@pytest.mark.parametrize("cfg", [
    bl.AdapterConfig("lora", rank=2), bl.AdapterConfig("lora", rank=2, qa_init=False),
    bl.AdapterConfig("dca", rank=2), bl.AdapterConfig("dha", 2, "ssh", rank=2),
    bl.AdapterConfig("sparse", select="random", rank=2), bl.AdapterConfig("dca", 2, "loca", rank=2),
    bl.AdapterConfig("wha", rank=2), bl.AdapterConfig("wha", 2, "magnitude", refine=False, rank=2)])
def test_init_adapters_counts_grads_and_round_trip(cfg, tmp_path):
    m, weights, hess, names = tiny_llama()
    report = bl.init_adapters(m, weights, hess, cfg, quiet=True)
    mods = bl.adapter_modules(m)
    assert len(report) == len(mods) == len(names)
    for row in report:
        a, b = row["shape"]
        assert row["budget"] == 2 * (a + b)
        if cfg.use_qa_init:
            assert row["err_refined"] < row["err_before"]
        else:
            assert row["err_refined"] == pytest.approx(row["err_before"])
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == sum(r["budget"] for r in report)
    if cfg.adapter == "wha" and cfg.transform_dims == 1:
        assert all(isinstance(x, qwha.WHALinear) for x in mods.values())
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    m(ids).square().mean().backward()
    assert all(p.grad is not None for p in trainable.values())
    assert all(p.grad is None for n, p in m.named_parameters() if n not in trainable)
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.01)                                              # something a round trip could lose
    bl.save_adapters(tmp_path / "a.safetensors", m, {"adapter": cfg.adapter})
    m2, _, _, _ = tiny_llama()
    assert bl.load_adapters(tmp_path / "a.safetensors", m2) == {"adapter": cfg.adapter}
    for n, p in m2.named_parameters():
        if n in trainable:
            assert torch.equal(p, trainable[n])
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))


def test_load_delegates_qwha_format_and_config_errors(tmp_path):
    m, weights, hess, names = tiny_llama()
    qwha.init_qwha(m, hess, weights, budget_rank=2, quiet=True)
    qwha.save_adapters(tmp_path / "q.safetensors", m)
    m2, _, _, _ = tiny_llama()
    bl.load_adapters(tmp_path / "q.safetensors", m2)
    assert len(qwha.adapters(m2)) == len(names)
    with pytest.raises(FileNotFoundError):
        bl.load_adapters(tmp_path / "missing.safetensors", m2)
    with pytest.raises(ValueError, match="--select loca"):
        bl.AdapterConfig("dca", select="loca", qa_init=True)
    with pytest.raises(ValueError, match="--transform-dims"):
        bl.AdapterConfig("lora", transform_dims=2)
    with pytest.raises(ValueError, match="--adapter"):
        bl.AdapterConfig("dft")


# ---------------------------------------------------------------------------------------------- train.py


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import json

    from test_train import CORPUS, GSM, make_tiny_model
    root = tmp_path_factory.mktemp("tiny_baselines")
    make_tiny_model(root / "model")
    (root / "gsm.jsonl").write_text("\n".join(json.dumps(r) for r in GSM) + "\n")
    (root / "calib.txt").write_text("\n\n".join(CORPUS * 4))
    return root


@pytest.mark.parametrize("extra", [["--adapter", "lora"],
                                   ["--adapter", "dca", "--transform-dims", "2", "--select", "ssh"]])
def test_train_pipeline_with_baseline_adapters(tiny_run, tmp_path, extra):
    import json

    import train
    from test_train import argv
    out = tmp_path / "run"
    record, m = train.run(train.parse_args(argv(tiny_run, out, "--steps", "2", "--stop-after", "1", *extra)))
    mods = bl.adapter_modules(m)
    assert len(mods) == 14 and not qwha.adapters(m)                   # no WHALinear: the baseline was attached
    kind = {"lora": bl.LoRALinear}.get(extra[1], bl.SpectralLinear)
    assert all(isinstance(x, kind) for x in mods.values())
    init = json.loads((out / "config.json").read_text())["init"]
    assert init["err_refined"] < init["err_before"]
    # resume the second step from the checkpoint (LoRA only, for time), reload the adapter file: same outputs
    if extra[1] == "lora":
        record2, m = train.run(train.parse_args(argv(tiny_run, out, "--steps", "2", "--resume", *extra)))
        assert record2["train_result"]["steps_done"] == 2
    from eval import load_model
    base, _ = load_model(tiny_run / "model", out / "quantized.safetensors")
    bl.load_adapters(out / "adapter.safetensors", base)
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    m.eval()
    with torch.no_grad():
        assert torch.allclose(base(ids), m(ids), atol=1e-5)


def test_train_flags():
    import train
    cfg = train.parse_args(["--model", "x", "--adapter", "dha", "--transform-dims", "2", "--no-refine", "--no-qa-init"])
    assert (cfg.adapter, cfg.transform_dims, cfg.refine, cfg.qa_init) == ("dha", 2, False, False)
    cfg = train.parse_args(["--model", "x"])
    assert (cfg.adapter, cfg.refine, cfg.qa_init) == ("wha", True, None) and train.is_qwha(cfg)
    with pytest.raises(ValueError, match="--select loca"):
        train.adapter_config(train.parse_args(["--model", "x", "--select", "loca", "--qa-init"]))
