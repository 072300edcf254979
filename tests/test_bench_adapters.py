"""bench/bench_adapters.py's wiring to bench_init's caches (the benchmark itself needs the demo checkpoint)."""
import sys
from pathlib import Path

import pytest
import torch

import gptq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_adapters  # noqa: E402
import bench_init  # noqa: E402


@pytest.mark.parametrize("kind", bench_init.GPTQ_KINDS)
def test_config_reaches_the_gptq_cache_of_bench_init(tmp_path, monkeypatch, kind):
    """bench_adapters' config carries everything bench_init.get_quantized reads (it once lacked `gptq` and
    failed there), and gives the bases of the chosen settings, cached under bench_init's name for them."""
    monkeypatch.setattr(bench_init, "ROOT", tmp_path)
    cfg = bench_adapters.parse(["--gptq", kind, "--quiet"])
    assert cfg.gptq == kind
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 64, generator=g)
    X = torch.randn(256, 64, generator=g, dtype=torch.float64)
    H = X.T @ X / X.shape[0]
    Q = bench_init.get_quantized(cfg, {"a": W}, {"a": H}, ["a"], 3)
    s = bench_init.gptq_settings(kind)
    assert torch.equal(Q["a"], bench_init.quantize_layer(W, H, 3, s))
    assert bench_init.gptq_cache_path(cfg, 3, s).exists()
    if kind == "classic":
        assert torch.equal(Q["a"], gptq.gptq_quantize(W, H, 3, 64).dequantize())
    assert bench_adapters.parse([]).gptq == bench_init.BenchConfig().gptq == "refined"
