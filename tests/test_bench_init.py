"""bench/bench_init.py's GPTQ settings (--gptq) and their cache (the benchmark itself needs the demo checkpoint)."""
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gptq
import train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_init  # noqa: E402


def tiny_layer(m=8, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    X = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    return W, X.T @ X / X.shape[0]                                    # (m, n), (n, n) SPD


def test_refined_is_train_defaults_and_classic_is_all_off():
    defaults = {f.name: f.default for f in dataclasses.fields(train.TrainConfig) if f.name in train.QUANT_KEYS}
    assert bench_init.gptq_settings("refined") == defaults
    assert defaults["act_order"] and defaults["gptq_clip"] and defaults["gptq_cd_passes"] > 0   # train.py's defaults
    assert not any(bench_init.gptq_settings("classic").values())
    with pytest.raises(ValueError, match="--gptq 'fancy'"):
        bench_init.gptq_settings("fancy")


def test_cache_names_keep_classic_and_tell_every_setting_apart():
    cfg = bench_init.BenchConfig()
    classic = bench_init.gptq_settings("classic")
    assert bench_init.gptq_cache_path(cfg, 3, classic).name == "gptq-3b-32x256.safetensors"   # the files made before
    combos = [dict(magr=a, act_order=b, gptq_clip=c, gptq_cd_passes=p, gptq_refit=d)
              for a, b, c, d in itertools.product((False, True), repeat=4) for p in (0, 1, 2)]
    tags = {bench_init.gptq_tag(s) for s in combos}
    assert len(tags) == len(combos)                                    # injective: no two settings share a file
    with pytest.raises(ValueError, match="damp"):
        bench_init.gptq_tag({**classic, "damp": 0.1})


@pytest.mark.parametrize("kind", bench_init.GPTQ_KINDS)
def test_quantize_layer_is_gptq_with_the_settings(kind):
    W, H = tiny_layer()
    s = bench_init.gptq_settings(kind)
    ref = gptq.gptq_quantize(W, H, 3, 64, act_order=s["act_order"], clip=s["gptq_clip"],
                             cd_passes=s["gptq_cd_passes"], refit=s["gptq_refit"]).dequantize()
    assert torch.equal(bench_init.quantize_layer(W, H, 3, s), ref)
    if kind == "classic":
        assert torch.equal(ref, gptq.gptq_quantize(W, H, 3, 64).dequantize())


def test_get_quantized_caches_by_settings_and_refuses_a_mislabelled_file(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_init, "ROOT", tmp_path)
    W, H = tiny_layer()
    weights, Hs, names = {"a": W}, {"a": H}, ["a"]
    cfg = {k: bench_init.BenchConfig(quiet=True, gptq=k) for k in bench_init.GPTQ_KINDS}
    Q = {k: bench_init.get_quantized(c, weights, Hs, names, 2)["a"] for k, c in cfg.items()}
    assert not torch.equal(Q["refined"], Q["classic"])                 # two files, neither overwrote the other
    for k, c in cfg.items():
        path = bench_init.gptq_cache_path(c, 2, bench_init.gptq_settings(k))
        assert path.exists() and torch.equal(load_file(str(path))["a"], Q[k])
        assert torch.equal(bench_init.get_quantized(c, {"a": W + 1}, Hs, names, 2)["a"], Q[k])   # from the cache
    path = bench_init.gptq_cache_path(cfg["refined"], 2, bench_init.gptq_settings("refined"))
    save_file({"a": Q["classic"]}, str(path), metadata={"gptq": json.dumps(bench_init.gptq_settings("classic"))})
    with pytest.raises(ValueError, match="was made with GPTQ settings"):
        bench_init.get_quantized(cfg["refined"], weights, Hs, names, 2)


def test_whole_model_init_with_workers_times_init_qwha_and_gets_the_same_errors():
    names = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    weights, H, Q = {}, {}, {}
    for i, name in enumerate(names):
        W, Hn = tiny_layer(m=8 + 8 * i, n=64, seed=i)
        weights[name], H[name] = W, Hn
        Q[name] = gptq.quantize_rtn(W, 2, 64).dequantize()
    cfg = dataclasses.replace(bench_init.BenchConfig(), timing_rank=2, workers=2, quiet=True,
                              timing_methods="AdaAlloc,Random")
    out = bench_init.whole_model_init(cfg, weights, H, Q, names)
    assert set(out) == {"AdaAlloc", "Random", "AdaAlloc, 2 workers"}   # no threaded run for the random selection
    threaded = out["AdaAlloc, 2 workers"]
    assert threaded["same_errors"] is True and threaded["workers"] == 2 and threaded["max_rel_err_gap"] == 0
    assert threaded["ratio"] == out["AdaAlloc"]["ratio"] < 1
    assert bench_init.parse(["--workers", "1"]).workers == 1
    with pytest.raises(SystemExit):
        bench_init.parse(["--workers", "0"])


def test_white_noise_reference_matches_a_monte_carlo_and_is_a_row_of_the_error_table(monkeypatch):
    """white_noise_ratio(p): the error left when the largest fraction p of i.i.d. Gaussian coefficients is cancelled
    (an exact formula, checked by sampling); error_table adds it per layer (bare error × the ratio at the layer's
    density B/(m·n)) as its reference row."""
    z = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).square().sort().values
    for p in (0.02, 0.15, 0.5):
        kept = z[: round((1 - p) * z.numel())].sum() / z.sum()                  # the smallest 1 − p stay
        assert bench_init.white_noise_ratio(p) == pytest.approx(float(kept.sqrt()), abs=2e-3)
    assert bench_init.white_noise_ratio(0.0) == pytest.approx(1.0) and bench_init.white_noise_ratio(1.0) == 0.0
    names = ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"]
    weights, H = {}, {}
    for i, name in enumerate(names):
        weights[name], H[name] = tiny_layer(m=8 + 8 * i, n=64, seed=i)
    cfg = dataclasses.replace(bench_init.BenchConfig(), quantizer="rtn", ranks=(2,), methods="AdaAlloc", quiet=True)
    rows = bench_init.error_table(cfg, weights, H, names, 2)
    white = rows["2b r=2 white"]
    assert white["method"] == bench_init.WHITE and set(white["per_type"]) == {"up_proj", "q_proj"}
    e0 = [float(bench_init.qwha.layer_error(weights[n].double() - gptq.quantize_rtn(weights[n], 2, 64).dequantize()
                                            .double(), H[n])) for n in names]
    want = [e * bench_init.white_noise_ratio(2 * sum(weights[n].shape) / weights[n].numel()) for e, n in zip(e0, names)]
    assert white["ratio"] == pytest.approx(sum(want) / sum(e0), rel=1e-9)
    assert rows["2b r=2 AdaAlloc"]["gptq_err"] == pytest.approx(white["gptq_err"], rel=1e-9)
