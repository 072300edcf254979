"""bench/bench_init_gpu.py on a tiny config: the timed init is qwha's init unchanged, and every stage is reported."""
import json
import sys
from pathlib import Path

import pytest
import torch

import qwha
import qwha_fast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_init_gpu  # noqa: E402


def tiny_config(path) -> str:
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 192,
                                "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2}))
    return str(path)


def test_random_hessian_is_symmetric_positive_definite_and_seeded():
    H = bench_init_gpu.random_hessian(48, 96, "cpu", seed=3)
    assert torch.equal(H, bench_init_gpu.random_hessian(48, 96, "cpu", seed=3))
    assert torch.allclose(H, H.T) and torch.linalg.eigvalsh(H.double()).min() > 0
    d = H.diagonal()
    assert d.max() / d.min() > 2                                       # channel scales differ, as in real activations


def test_timed_init_equals_plain_init_and_restores_qwha():
    W, base = bench_init_gpu.make_layer((32, 64), 2, 64, "cpu", seed=1)
    H = bench_init_gpu.random_hessian(64, 128, "cpu", seed=2)
    plain, _, _ = bench_init_gpu.init_one(W, base, H, 4, 2, qwha.RULE_DEFAULT)
    originals = {a: getattr(*bench_init_gpu.stage_owner(a)) for a, _ in bench_init_gpu.STAGES + bench_init_gpu.DETAIL}
    timer = bench_init_gpu.StageTimer("cpu")
    with timer.patched(detail=True):
        assert qwha.layer_problem is not originals["qwha.layer_problem"]
        assert qwha_fast.solve_support is not originals["qwha_fast.solve_support"]
        timed, t_e, total = bench_init_gpu.init_one(W, base, H, 4, 2, qwha.RULE_DEFAULT)
    assert all(getattr(*bench_init_gpu.stage_owner(a)) is fn for a, fn in originals.items())
    assert torch.equal(timed.indices, plain.indices) and torch.equal(timed.values, plain.values)
    assert timed.err_refined < timed.err_before
    assert timer.calls["problem>G=THTᵀ"] == 1 and timer.calls["refine"] == 1 and timer.calls["refine 2"] == 1
    assert 0 < sum(timer.seconds.values()) + t_e <= total


def test_main_reports_every_linear_and_stage(tmp_path, capsys):
    res = bench_init_gpu.main(["--config", tiny_config(tmp_path / "tiny.json"), "--rank", "4", "--detail", "--quiet"])
    assert [r["layer"] for r in res["rows"]] == [f"0.{x}" for x in bench_init_gpu.LINEARS]
    assert [tuple(r["shape"]) for r in res["rows"]] == [(64, 64), (32, 64), (32, 64), (64, 64), (192, 64),
                                                        (192, 64), (64, 192)]
    for r in res["rows"]:
        assert r["budget"] == min(4 * sum(r["shape"]), r["shape"][0] * r["shape"][1])
        assert all(r["stages"][k] > 0 for k in ("G=THTᵀ", "C=ETᵀ", "AdaAlloc", "top-k", "refine", "swaps"))
        assert abs(sum(r["stages"].values()) - r["seconds"]) < 1e-9 and r["rel_refined"] < 1
        assert any(k.startswith("refine>") for k in r["paths"])        # --detail: the solve's pieces
    assert res["per_block_s"] == pytest.approx(sum(r["seconds"] for r in res["rows"]))
    assert res["model_estimate_s"] == pytest.approx(6 * res["per_block_s"])
    out = capsys.readouterr().out
    assert "G=THTᵀ" in out and "AdaAlloc" in out and "6 blocks" in out
    assert json.loads(out.strip().splitlines()[-1])["bench"] == "init_gpu"


def test_a_subset_has_no_block_estimate_and_a_bad_name_says_so(tmp_path):
    path = tiny_config(tmp_path / "tiny.json")
    res = bench_init_gpu.run(bench_init_gpu.parse(["--config", path, "--linears", "k_proj", "--rank", "2",
                                                   "--swap-rounds", "0", "--quiet"]))
    assert len(res["rows"]) == 1 and res["per_block_s"] is None and "swaps" not in res["rows"][0]["paths"]
    with pytest.raises(ValueError, match="--linears qkv"):
        bench_init_gpu.run(bench_init_gpu.parse(["--config", path, "--linears", "qkv", "--quiet"]))


def test_a_stop_signal_reports_the_layers_done(tmp_path, monkeypatch):
    calls = []
    plain = bench_init_gpu.init_one

    def stop_at_third(*args):                                         # the warm-up, one layer, then the signal
        calls.append(1)
        if len(calls) == 3:
            bench_init_gpu._stop(15, None)
        return plain(*args)

    monkeypatch.setattr(bench_init_gpu, "init_one", stop_at_third)
    res = bench_init_gpu.run(bench_init_gpu.parse(["--config", tiny_config(tmp_path / "tiny.json"), "--rank", "2",
                                                   "--quiet"]))
    assert res["partial"] and [r["layer"] for r in res["rows"]] == ["0.q_proj"]
    assert res["per_block_s"] is None and res["model_estimate_s"] is None
    assert qwha.layer_problem.__name__ == "layer_problem"                # the timing wrappers are gone
