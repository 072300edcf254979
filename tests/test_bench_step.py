"""bench/bench_step.py's measuring helpers on a tiny model (the benchmark itself needs the demo checkpoint)."""
import gc
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

import gptq
import model as M
import wht

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_step  # noqa: E402


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():    # isinstance on torch.distributed.reduce_op warns that it is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


def test_saved_bytes_counts_activations_and_keeps_none_alive():
    cfg = M.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = M.init_weights(M.LlamaForCausalLM(cfg), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    ids1, ids4 = (torch.randint(0, 64, (b, 16), generator=g) for b in (1, 4))
    bench_step.saved_bytes(model, ids1, "full")                         # warm-up: lazily built buffers
    before = live_tensors()
    s1 = bench_step.saved_bytes(model, ids1, "full")
    s4 = bench_step.saved_bytes(model, ids4, "full")
    # the counting pass must free its graph (a node holding its own output would keep every activation alive)
    assert live_tensors() == before
    # distinct storages are counted once each, and all stay alive during the pass, so 4x the tokens save
    # about 4x the bytes (freed and reused memory would collapse them)
    assert s1 > 0 and 3.0 * s1 < s4 < 5.0 * s1


def tiny_config(path, **over) -> str:
    cfg = {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500000.0,
           **over}
    path.write_text(json.dumps(cfg))
    return str(path)


def test_config_mode_builds_only_the_asked_blocks_on_packed_bases(tmp_path):
    cfg = bench_step.parse(["--config", tiny_config(tmp_path / "cfg.json"), "--layers", "2", "--base", "packed",
                            "--rank", "2"])
    model, names, variants = bench_step.build(cfg)
    assert len(model.model.layers) == 2 and len(names) == 14                     # not the config's 8 blocks
    assert all(isinstance(variants[bench_step.BASE][n], gptq.QuantLinear) for n in names)
    assert all(v.base is variants[bench_step.BASE][n] for n in names for k, vs in variants.items()
               if k != bench_step.BASE for v in [vs[n]])
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in lin] == [64]                                  # only the (unused) lm_head
    dense = bench_step.build(bench_step.parse(["--config", cfg.config, "--layers", "1", "--base", "dense"]))
    assert all(isinstance(dense[2][bench_step.BASE][n], torch.nn.Linear) for n in dense[1])


def test_config_mode_runs_end_to_end_with_equal_trainable_counts(tmp_path, capsys):
    path = tiny_config(tmp_path / "tiny-llama.json")
    res = bench_step.main(["--config", path, "--layers", "1", "--batch", "2", "--seq-len", "16", "--reps", "1",
                           "--rank", "2", "--base", "packed", "--quiet"])
    assert res["model"] == "tiny-llama" and res["packed_base"] and not res["autocast"]     # CPU: no autocast
    assert sorted(map(tuple, res["shapes"])) == [(32, 64), (64, 64), (64, 128), (128, 64)]
    budget = sum(2 * (m + n) for m, n in [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)])
    r = res["results"]["2"]
    assert {v: r[v]["trainable"] for v in bench_step.VARIANTS} == {
        v: 0 if v == bench_step.BASE else budget for v in bench_step.VARIANTS}
    assert all(r[v]["step_s"] > 0 and r[v]["saved_mb"] > 0 for v in bench_step.VARIANTS)
    assert res["summary"]["2"]["qwha_over_lora_step"] > 0
    out = capsys.readouterr().out
    assert "tiny-llama with 1 block(s)" in out and "packed 2-bit base" in out
    assert json.loads(out.strip().splitlines()[-1])["bench"] == "step"
    with pytest.raises(FileNotFoundError, match="--config"):
        bench_step.main(["--config", str(tmp_path / "absent.json")])


def test_shipped_configs_have_the_published_widths():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import bench_init_gpu
    folder = Path(__file__).resolve().parent.parent / "bench" / "configs"
    want = {"llama-3.1-8b": (4096, 14336, 1024, 128256), "llama-3.2-3b": (3072, 8192, 1024, 128256),
            "mistral-7b": (4096, 14336, 1024, 32000)}
    for name, (d, inter, kv, vocab) in want.items():
        mc = M.ModelConfig.from_json(folder / f"{name}.json")
        shapes = bench_init_gpu.block_linears(mc)
        assert shapes == {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
                          "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}
        assert mc.vocab_size == vocab and mc.num_hidden_layers in (28, 32)
        for w in {d, inter, kv}:
            wht.factorize(w)                                      # every width has a Hadamard transform
