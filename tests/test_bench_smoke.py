"""bench/bench_wht.py, bench/bench_gptq.py and bench/bench_merged.py run end to end on tiny inputs (no demo
checkpoint needed), so a change to the modules they call cannot leave them broken unnoticed; their figures come
from the full runs in docs/performance.md."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import adapter  # noqa: E402
import bench_gptq  # noqa: E402
import bench_merged  # noqa: E402
import bench_wht  # noqa: E402


def test_bench_wht_runs_and_matches_the_dense_transform(capsys):
    res = bench_wht.main(["--rows", "8", "--widths", "64", "96", "--repeats", "1", "--no-radix2"])
    assert [r["n"] for r in res["results"]] == [64, 96]
    for r in res["results"]:
        assert r["max_rel_err_wht"] < 1e-5 and r["wht_ms"] > 0 and r["dense_ms"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bench"] == "wht"


def test_bench_wht_kernel_table_runs_on_a_cpu_for_every_dtype_width_and_direction(capsys):
    res = bench_wht.main(["--kernel-only", "--kernel-table", "--kernel-rows", "8", "--kernel-widths", "96", "448",
                          "--kernel-dtypes", "bfloat16,float32", "--directions", "forward,inverse", "--burst", "1",
                          "--repeats", "1"])
    assert res["results"] == [] and res["kernel_rows"] == 8
    rows = res["kernel"]
    assert [(r["dtype"], r["n"], r["direction"]) for r in rows] == [
        (d, n, s) for d in ("bfloat16", "float32") for n in (96, 448) for s in ("forward", "inverse")]
    for r in rows:
        assert r["GBps"] > 0 and r["copy_GBps"] > 0 and r["pct_copy"] == pytest.approx(100 * r["GBps"] / r["copy_GBps"])
        assert r["max_rel_err_vs_torch"] == 0 and not r["cuda_kernel"]     # on a CPU both sides are the torch path
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bench"] == "wht"
    with pytest.raises(SystemExit):
        bench_wht.main(["--kernel-only", "--kernel-dtypes", "float8"])


def test_bench_gptq_runs_on_random_weights_with_every_option(tmp_path, capsys):
    cfg = bench_gptq.parse(["--weights", str(tmp_path / "absent.safetensors"), "--blocks", "1", "--bits", "2",
                            "--act-order", "--clip", "--cd-passes", "1", "--refit", "--magr-blocks", "0",
                            "--magr-iters", "2", "--quiet"])
    res = bench_gptq.run(cfg)
    bench_gptq.report(res, cfg)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "gptq" and out["weights"] == "random" and out["layers"] == 7
    assert 0 < res["ratio_gptq_rtn"][2] < 1 and 0 < res["ratio_opt_rtn"][2] < 1   # GPTQ beats RTN on correlated H
    assert res["sampled"]["layers"] == 7 and res["bytes_2bit_g64_vs_fp16"] <= 0.16
    assert 0 < res["abs_ratio_gptq_rtn"][2] < 1 and 0 < res["abs_ratio_opt_rtn"][2] < 1
    # the absolute aggregate is the plain mean of ‖(W − Q)Rᵀ‖ over the layers (checked here for RTN, recomputed)
    weights, _ = bench_gptq.load_weights(cfg)
    hessians, _ = bench_gptq.load_hessians(cfg, weights)
    rtn = [bench_gptq.gptq.output_error(W, bench_gptq.gptq.quantize_rtn(W, 2, 64).dequantize(), hessians[n])[0]
           for n, W in weights.items()]
    assert abs(res["abs_err_rtn"][2] - sum(rtn) / len(rtn)) <= 1e-9 * res["abs_err_rtn"][2]
    assert abs(out["abs_ratio_gptq_rtn"]["2"] - res["abs_err_gptq"][2] / res["abs_err_rtn"][2]) < 1e-12


def test_bench_merged_runs_both_formations_and_the_shared_transform(capsys):
    res = bench_merged.main(["--shapes", "8x48,24x40", "--rank", "2", "--tokens", "6", "--siblings", "8,4",
                             "--sibling-in", "24", "--repeats", "1", "--vg-tokens", "40"])
    f = res["formation"]
    assert [(r["m"], r["n"]) for r in f] == [(8, 48), (24, 40)]
    assert all(r["max_abs_diff"] < 1e-5 and r["wht_ms"] > 0 and r["csr_ms"] > 0 for r in f)
    assert [r["chosen"] for r in f] == ["csr", "csr"] and f[0]["entries_per_row"] == 2 * (8 + 48) / 8
    assert (adapter._CSR_MAX_K, adapter._CSR_MAX_N) == (res["csr_max_k"], res["csr_max_n"])   # restored after forcing
    assert res["siblings"]["same_grads"] and res["siblings"]["out"] == [8, 4]
    assert [r["route"] for r in res["value_grad"]] == ["dense", "sampled"]   # B·6 ≥ m·n for 8×48 at r = 2
    assert all(r["max_rel_diff"] < 1e-5 and r["tokens"] == 40 for r in res["value_grad"])
    with pytest.raises(SystemExit):                                                      # fewer tokens than m
        bench_merged.parse(["--shapes", "8x48", "--vg-tokens", "4"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bench"] == "merged"
