"""The optional fused CUDA WHT kernel (kernels/wht_cuda.cu).

On a machine without CUDA only the loader's behaviour is checked (it must say why it cannot build, and wht.py must
not depend on it); everything else needs a CUDA device and skips without one."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import wht

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def loader():
    spec = importlib.util.spec_from_file_location("wht_cuda_loader_under_test", ROOT / "kernels" / "wht_cuda.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_loader_without_cuda_says_why():
    mod = loader()
    if not CUDA:
        assert mod.load() is None                      # no device: nothing to build, no warning
    if torch.version.cuda is None:                     # the CPU-only torch of CI
        with pytest.raises(RuntimeError, match="CPU-only"):
            mod.build()
    assert mod.SOURCE.is_file()
    assert mod.MAX_P == 16 * 32 * 64
    assert mod.shared_bytes(4096, 1) == 4 * 4096 and mod.shared_bytes(576, 36) == 4 * (576 + 36 * 40)


def test_cache_dir_is_per_torch_version(monkeypatch, tmp_path):
    monkeypatch.setenv("QWHA_KERNEL_CACHE", str(tmp_path))
    d = loader().cache_dir()
    assert d.parent == tmp_path and torch.__version__.split("+")[0] in d.name


def widths(limit=14336):
    """Every n = K·2^p ≤ limit with K a supported core order."""
    out = set()
    for K in wht.SUPPORTED_K:
        P = 1
        while K * P <= limit:
            out.add(K * P)
            P *= 2
    return sorted(out)


def torch_path(x, inverse, monkeypatch):
    monkeypatch.setenv("QWHA_DISABLE_CUDA_WHT", "1")
    try:
        return wht.wht(x, inverse=inverse)
    finally:
        monkeypatch.delenv("QWHA_DISABLE_CUDA_WHT")


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@needs_cuda
def test_kernel_is_built_and_used():
    fn = wht._cuda_wht()
    assert fn is not None, "the CUDA kernel did not build (see the warning)"
    x = torch.randn(4, 4096, device="cuda")
    y = fn(x, wht.hadamard_core(1), False)
    assert y is not None and y.shape == x.shape and y.dtype == x.dtype


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_width_matches_torch_path_and_dense(dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    for n in widths():
        x = torch.randn(5, n, generator=g).to("cuda", dtype)
        T = wht.hadamard_matrix(n, dtype=torch.float64)
        for inverse in (False, True):
            y = wht.wht(x, inverse=inverse)
            assert y.dtype == dtype and y.shape == x.shape
            ref = torch_path(x, inverse, monkeypatch)
            assert rel(y, ref) <= TOL[dtype], (n, inverse, dtype)
            dense = x.double().cpu() @ (T if inverse else T.T)
            assert rel(y.cpu(), dense) <= TOL[dtype] * 2, (n, inverse, dtype)


@needs_cuda
def test_inverse_roundtrip_and_gradient():
    g = torch.Generator().manual_seed(1)
    for n in (576, 1536, 4096, 11008, 14336, 16384):                                    # 16384: P2 = 64
        x = torch.randn(3, n, generator=g).cuda().requires_grad_()
        y = wht.wht(x)
        assert rel(wht.wht(y, inverse=True), x) < 1e-5
        gy = torch.randn(3, n, generator=g).cuda()
        (y * gy).sum().backward()
        T = wht.hadamard_matrix(n, dtype=torch.float64)
        assert rel(x.grad.cpu(), gy.double().cpu() @ T) < 1e-5, n


@needs_cuda
def test_batched_noncontiguous_and_unaligned_inputs(monkeypatch):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 3, 1536, generator=g).cuda()
    assert rel(wht.wht(base), torch_path(base, False, monkeypatch)) < 1e-5            # batched (2, 3, n)
    xt = torch.randn(1536, 6, generator=g).cuda().T                                       # non-contiguous
    assert not xt.is_contiguous()
    assert rel(wht.wht(xt), torch_path(xt.contiguous(), False, monkeypatch)) < 1e-5
    flat = torch.randn(4 * 4096 + 1, generator=g).cuda().to(torch.bfloat16)
    xu = flat[1:].view(4, 4096)                                                           # 2-byte offset: scalar loads
    assert xu.data_ptr() % 16 != 0
    assert rel(wht.wht(xu), torch_path(xu, False, monkeypatch)) <= TOL[torch.bfloat16]
    y = torch.empty(4, 4096, device="cuda", dtype=torch.bfloat16)
    wht.wht_(y.copy_(xu))                                                                 # in place
    assert rel(y, torch_path(xu, False, monkeypatch)) <= TOL[torch.bfloat16]


@needs_cuda
def test_width_beyond_kernel_falls_back(monkeypatch):
    fn = wht._cuda_wht()
    x = torch.randn(2, 1 << 15).cuda()                                                    # P = 32768 = MAX_P: kernel
    assert fn(x, wht.hadamard_core(1), False) is not None
    assert rel(wht.wht(x), torch_path(x, False, monkeypatch)) < 1e-5
    for n in (1 << 16, 12 << 13):             # P = 65536 > MAX_P;
                                              # 12·8192: 384 KiB of shared memory, more than a block has
        x = torch.randn(2, n).cuda()
        assert fn(x, wht.hadamard_core(wht.factorize(n)[0]), False) is None, n
        assert rel(wht.wht(x), torch_path(x, False, monkeypatch)) < 1e-5
        assert math.isclose(wht.wht(x).norm().item(), x.norm().item(), rel_tol=1e-4)
