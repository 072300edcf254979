"""--merge-requant: the adapter merged into its base and re-quantized by GPTQ into one standard GPTQ checkpoint, on a
tiny random model: what it writes, that it is GPTQ of Q + ΔW against the stated Hessians, and its bad inputs."""
import json

import pytest
import torch

import calib
import gptq
import gptq_format as gf
import model as model_lib
import prepare
import train
import wht
from adapter import WHALinear
from eval import load_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """train.py --hessians FILE --merge-requant DIR (two steps; the default Hessians, recomputed on the adapted
    model), and its files."""
    from test_train import CORPUS, GSM, make_tiny_model
    root = tmp_path_factory.mktemp("requant")
    make_tiny_model(root / "model")
    (root / "gsm.jsonl").write_text("\n".join(json.dumps(r) for r in GSM) + "\n")
    (root / "calib.txt").write_text("\n\n".join(CORPUS * 4))
    base = ["--model", str(root / "model"), "--bits", "3", "--group-size", "32", "--rank", "4", "--data",
            str(root / "gsm.jsonl"), "--calib", str(root / "calib.txt"), "--n-calib", "4", "--calib-len", "32",
            "--n-eval", "2", "--batch-size", "2", "--max-len", "128", "--quiet", "--device", "cpu",
            "--gptq-cd-passes", "1", "--steps", "2", "--out", str(root / "out"),
            "--hessians", str(root / "h.safetensors")]
    rec = train.main([*base, "--merge-requant", str(root / "mq")])
    return root, base, rec


def merged_weights(root):
    """{name: Q + ΔW (fp32)} of the run's base and trained adapter, as eval.py loads them."""
    m, _ = load_model(root / "model", root / "out" / "quantized.safetensors", root / "out" / "adapter.safetensors")
    return m, {n: model_lib.get_module(m, n).merge() for n in model_lib.linear_names(m)}


def test_the_checkpoint_is_gptq_of_the_merged_weights_against_the_adapted_models_hessians(run, tmp_path):
    root, base, rec = run
    qc = gf.quant_config(root / "mq")
    assert qc["bits"] == 3 and qc["group_size"] == 32 and not (root / "mq" / "adapter.safetensors").exists()
    ours, _ = load_model(root / "model", root / "mq")                         # as eval.py --quantized DIR reads it
    m, merged = merged_weights(root)
    cfg = train.resolve_defaults(train.parse_args(base))
    windows = prepare.calibration_windows(model_lib.Tokenizer.from_pretrained(root / "model"), cfg)
    H = calib.collect_hessians(m, calib.window_batches(windows, prepare.CALIB_BATCH), model_lib.linear_names(m),
                               product_dtype=torch.float32)            # the whole adapted model at once
    settings = {**prepare.quant_settings(train.parse_args(base)), "gptq_fp16_exact": True}   # the run's, fp16-exact
    for name, W in merged.items():
        want = prepare.gptq_layer(W, H[name], 3, 32, settings).dequantize()
        assert torch.equal(model_lib.get_module(ours, name).dequantize(), want), name
    assert gf.fp16_inexact(gf.quantized_linears(ours)) == []                    # exact for fp16 readers too
    info = rec["merge_requant"]
    assert info["hessians"] == "recomputed on the adapted model" and info["folder"] == str(root / "mq")
    losses = info["heldout_loss"]
    assert set(losses) == {"base", "base_adapter", "merged_requant"} and all(v > 0 for v in losses.values())
    assert losses["base_adapter"] == pytest.approx(rec["eval_loss"]["after"], rel=1e-6)
    assert losses["base"] != losses["base_adapter"] and losses["merged_requant"] != losses["base_adapter"]
    again = train.main([*base, "--resume", "--merge-requant", str(tmp_path / "later")])   # after training, later
    layers, _ = gf.load_gptq(tmp_path / "later")
    assert all(torch.equal(layers[n].dequantize(), model_lib.get_module(ours, n).dequantize()) for n in layers)
    assert again["merge_requant"]["heldout_loss"] == losses


def test_calib_hessians_give_gptq_of_the_merged_weights_against_the_hessian_file(run, tmp_path):
    root, base, _ = run
    rec = train.main([*base, "--resume", "--merge-requant", str(tmp_path / "mqc"), "--merge-requant-hessians",
                      "calib"])
    assert rec["merge_requant"]["hessians"] == str(root / "h.safetensors")
    _, merged = merged_weights(root)
    H, _ = calib.load_hessians(root / "h.safetensors")
    layers, _ = gf.load_gptq(tmp_path / "mqc")
    settings = prepare.requant_settings(train.resolve_defaults(train.parse_args(base)))
    for name, W in merged.items():
        assert torch.equal(layers[name].dequantize(), prepare.gptq_layer(W, H[name], 3, 32, settings).dequantize())
    adapted, _ = gf.load_gptq(root / "mq")                                     # the other Hessians, other weights
    assert any(not torch.equal(layers[n].dequantize(), adapted[n].dequantize()) for n in layers)


def test_block_streamed_hessians_of_the_adapted_model_equal_the_whole_model_pass(run):
    root, base, _ = run
    m, _ = merged_weights(root)
    cfg = train.resolve_defaults(train.parse_args(base))
    windows = prepare.calibration_windows(model_lib.Tokenizer.from_pretrained(root / "model"), cfg)
    whole = calib.collect_hessians(m, calib.window_batches(windows, prepare.CALIB_BATCH), model_lib.linear_names(m),
                                   product_dtype=torch.float32)
    streamed = {n: h for _, hs in prepare.adapted_block_hessians(m, windows) for n, h in hs.items()}
    assert set(streamed) == set(whole) and all(torch.equal(streamed[n], whole[n]) for n in whole)


def test_requant_recovers_a_merged_weight_that_lies_on_a_grid():
    """ΔW = Q (a dense F = Q Tᵀ): W' = 2Q lies on the grid (2s, z), so GPTQ of W' must land on it, while Q alone
    misses W' by all of ΔW."""
    from test_gptq import correlated_H
    from test_gptq_format import tiny_model
    m, bits, g = tiny_model(), 2, 32
    gen = torch.Generator().manual_seed(0)
    hessians = {}
    for i, name in enumerate(model_lib.linear_names(m)):
        rows, n = model_lib.get_module(m, name).weight.shape
        codes = torch.randint(0, 2 ** bits, (rows, n), generator=gen)
        codes[:, ::g], codes[:, 1::g] = 0, 2 ** bits - 1                     # every group spans the whole grid
        zeros = torch.randint(1, 2 ** bits - 1, (rows, n // g), generator=gen)
        scales = gptq.fp16_exact_scales((torch.rand(rows, n // g, generator=gen) * 0.05 + 0.01).half(), bits)
        ql = gptq.QuantLinear.from_state(gptq.QuantState(codes.to(torch.uint8), scales, zeros.to(torch.uint8),
                                                         bits, g))
        Q = ql.dequantize()
        F = Q @ wht.hadamard_matrix(n).T                                       # F T = Q
        model_lib.set_module(m, name, WHALinear(ql, torch.arange(rows * n), F.flatten()))
        hessians[name] = correlated_H(n, i)
    blocks = [(i, {n: h for n, h in hessians.items() if n.startswith(f"model.layers.{i}.")})
              for i in range(m.config.num_hidden_layers)]
    settings = {"magr": False, "act_order": True, "gptq_clip": True, "gptq_cd_passes": 2, "gptq_refit": True,
                "gptq_fp16_exact": True}
    layers, rows = prepare.merge_requant(m, blocks, bits, g, settings)
    assert set(layers) == set(hessians) and len(rows) == len(hessians)
    for r in rows:
        assert r["err_q"] > 0 and r["err_requant"] <= 1e-5 * r["err_q"], r


def test_merge_requant_needs_every_block_linear_adapted():
    from test_gptq_format import quantize_all, tiny_model
    m = quantize_all(tiny_model(), 4)
    H = {n: torch.eye(model_lib.get_module(m, n).in_features) for n in model_lib.linear_names(m)}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj has no adapter to merge"):
        prepare.merge_requant(m, [(0, H)], 4, 32, prepare.requant_settings(train.TrainConfig(model="m")))


def test_bad_merge_requant_folders_fail_before_any_work(run, tmp_path):
    root, base, _ = run
    out = tmp_path / "o"
    args = [str(out) if a == str(root / "out") else a for a in base[:-2]]     # without --hessians
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("x")
    cases = [
        (str(out), r"--merge-requant .*: is or holds --out"),
        (str(tmp_path), r"--merge-requant .*: is or holds --out"),
        (str(root / "model"), r"is or holds --model"),
        (str(tmp_path / "busy"), r"a folder with other files \(it would be replaced\)"),
        (str(tmp_path / "file"), r"exists and is not a folder"),
    ]
    for folder, match in cases:
        with pytest.raises(ValueError, match=match):
            train.main([*args, "--merge-requant", folder])
    with pytest.raises(ValueError, match=r"--merge-requant .*: is or holds --export-gptq"):
        train.main([*args, "--export-gptq", str(tmp_path / "g"), "--merge-requant", str(tmp_path / "g")])
    with pytest.raises(ValueError, match=r"--merge-requant-hessians calib: needs --hessians FILE"):
        train.main([*args, "--merge-requant", str(tmp_path / "m"), "--merge-requant-hessians", "calib"])
    with pytest.raises(ValueError, match=r"--merge-requant-hessians fp: expected adapted or calib"):
        train.main([*args, "--merge-requant", str(tmp_path / "m"), "--merge-requant-hessians", "fp"])
    assert not out.exists() and (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
