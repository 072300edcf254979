"""bench/bench_memory.py: random checkpoints of any shape, the computed estimate, and a tiny end-to-end run."""
import json
import sys
from pathlib import Path

import pytest
import torch

import model as model_lib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_memory  # noqa: E402

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "tie_word_embeddings": False}


@pytest.mark.demo_assets
def test_random_checkpoint_is_sharded_per_block_and_loads(tmp_path, assets):
    folder = bench_memory.random_checkpoint(tmp_path / "m", {**TINY, "vocab_size": 300, "num_hidden_layers": 3},
                                            seed=1, tokenizer_src=assets / "smollm2-135m")
    index = json.loads((folder / model_lib.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) == 4                 # 3 blocks + the rest
    m = model_lib.from_pretrained(folder)
    w = m.model.layers[2].mlp.down_proj.weight
    assert w.shape == (64, 128) and 0.015 < float(w.detach().std()) < 0.025
    assert torch.equal(m.model.layers[0].input_layernorm.weight, torch.ones(64))
    again = bench_memory.random_checkpoint(tmp_path / "m2", {**TINY, "vocab_size": 300, "num_hidden_layers": 3},
                                           seed=1)
    assert torch.equal(model_lib.from_pretrained(again).model.layers[2].mlp.down_proj.weight, w)
    assert (folder / "tokenizer.json").exists()


def test_estimate_counts_what_it_says():
    cfg = {**TINY, "vocab_size": 1000, "num_hidden_layers": 2}
    est = bench_memory.estimate(cfg, n_calib=8, calib_len=32, bits=2, rank=4)
    gb = 2**30
    assert est["embeddings_gb"] * gb == 2 * 1000 * 64 * 4                       # untied: embedding and head
    assert est["activations_gb"] * gb == 8 * 32 * 64 * 4
    assert est["block_hessians_gb"] * gb == (64 * 64 * 3 + 128 * 128) * 8       # q/k/v, o, gate/up, down
    values = 2 * sum(min(4 * (m + n), m * n) for m, n in
                     [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)])
    assert est["adapters_gb"] * gb == values * 8


@pytest.mark.demo_assets
def test_tiny_run_reports_rows_and_growth(tmp_path, assets, capsys):
    res = bench_memory.main(["--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
                             "--vocab", "49152", "--layers", "1,2", "--n-calib", "4", "--calib-len", "32",
                             "--rank", "4", "--workdir", str(tmp_path), "--extra", "--group-size 32"])
    assert [r["blocks"] for r in res["rows"]] == [1, 2]
    assert all(r["peak_anon_gb"] > 0 and r["quantize_s"] > 0 for r in res["rows"])
    assert "anon_gb_per_block" in res and "growth_over_fp32_linears" in res
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bench"] == "memory"
