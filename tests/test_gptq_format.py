"""Standard GPTQ checkpoints: packing layout, v1/v2 zero points, export -> read back bitwise, act-order g_idx,
the reference client's fixture, bad inputs."""
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gptq
import gptq_format as gf
import model as model_lib

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gptq_reference.safetensors"


def stream_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The layout by definition: bit t of code j (along dim 0) is bit b·j + t of a little-endian stream of 32-bit
    words, one stream per column and per 32 codes."""
    k, c = codes.shape
    kp = -(-k // 32) * 32
    x = torch.cat([codes.long(), codes.new_zeros(kp - k, c).long()])
    bitseq = ((x[:, None, :] >> torch.arange(bits)[None, :, None]) & 1).reshape(kp * bits, c)   # stream order
    words = (bitseq.reshape(-1, 32, c) << torch.arange(32)[None, :, None]).sum(1)               # (kp·b/32, c)
    return words[: -(-k * bits // 32)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k", [32, 64, 96, 40, 8])
def test_pack_rows_is_the_little_endian_stream_and_inverts(bits, k):
    codes = torch.randint(0, 2 ** bits, (k, 7), generator=torch.Generator().manual_seed(k + bits))
    words = gf.pack_rows(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (-(-k * bits // 32), 7)
    assert torch.equal(words.long() & 0xFFFFFFFF, stream_words(codes, bits))
    assert torch.equal(gf.unpack_rows(words, bits, k).long(), codes)
    assert torch.equal(gf.unpack_cols(gf.pack_cols(codes.T, bits), bits, k).long(), codes.T)


def test_three_bit_codes_10_and_21_straddle_words():
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[10], codes[21] = 0b101, 0b011
    w = gf.pack_rows(codes, 3).long()[:, 0] & 0xFFFFFFFF
    assert w.tolist() == [1 << 30, 1 | 1 << 31, 0b01]            # code 10: bits 30, 31 | bit 0 of word 1;
    codes[21] = 0b110
    w = gf.pack_rows(codes, 3).long()[:, 0] & 0xFFFFFFFF
    assert w.tolist() == [1 << 30, 1, 0b11]                      # code 21: bit 31 of word 1 | bits 0, 1 of word 2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_v1_zero_points_store_z_minus_one_and_convert_back(bits):
    m = 64
    z = torch.randint(1, 2 ** bits, (5, m), generator=torch.Generator().manual_seed(bits))
    z[0, :9] = 0                                                  # zero points 0 in row 0: the v1 borrow case
    v2 = gf.pack_cols(z, bits)
    v1 = gf.zeros_v2_to_v1(v2, bits, m)
    assert torch.equal(gf.zeros_v1_to_v2(v1, bits, m), v2)
    if bits == 3:                                                 # field by field, modulo 8
        assert torch.equal(gf.unpack_cols(v1, 3, m).long(), (z - 1) % 8)
    else:                                                         # whole words minus 0x55555555 / 0x11111111
        word = {2: 0x55555555, 4: 0x11111111}[bits]
        assert torch.equal(v1.long() & 0xFFFFFFFF, ((v2.long() & 0xFFFFFFFF) - word) % 2 ** 32)
        fields = gf.unpack_cols(v1, bits, m).long()
        assert torch.equal(fields[1:], z[1:] - 1)                 # rows without a zero point 0: z − 1 per field
        assert not torch.equal(fields[0], (z[0] - 1) % 2 ** bits)  # row 0: the borrow reaches the neighbours


def tiny_model(seed=0, tied=True):
    cfg = model_lib.ModelConfig(vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    return model_lib.init_weights(model_lib.LlamaForCausalLM(cfg), torch.Generator().manual_seed(seed))


def quantize_all(m, bits, g=32, seed=0):
    """RTN every block linear, with zero points 0 and 2^b − 1 forced into some groups."""
    gen = torch.Generator().manual_seed(seed)
    for name in model_lib.linear_names(m):
        W = model_lib.get_module(m, name).weight.detach().clone()
        W[: W.shape[0] // 2, :g] = W[: W.shape[0] // 2, :g].abs()          # min 0 -> zero point 0
        W[W.shape[0] // 2:, g:2 * g] = -W[W.shape[0] // 2:, g:2 * g].abs()
        st = gptq.quantize_rtn(W + 1e-3 * torch.randn(W.shape, generator=gen).abs(), bits, g)
        model_lib.set_module(m, name, gptq.QuantLinear.from_state(st))
    return m


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("fmt", ["gptq_v2", "gptq"])
def test_export_then_read_is_bitwise(tmp_path, bits, fmt):
    m = quantize_all(tiny_model(), bits)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    gf.export_gptq(tmp_path / "out", m, tok, checkpoint_format=fmt)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"] == {**cfg["quantization_config"], "quant_method": "gptq", "bits": bits,
                                          "group_size": 32, "desc_act": False, "sym": False,
                                          "checkpoint_format": fmt}
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    sd = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in sd and cfg["tie_word_embeddings"]          # tied head kept tied
    assert sd["model.embed_tokens.weight"].dtype == torch.float16
    name = "model.layers.0.mlp.down_proj"                                     # (64, 128)
    assert sd[f"{name}.qweight"].shape == (128 * bits // 32, 64) and sd[f"{name}.qzeros"].shape == (4, 64 * bits // 32)
    assert sd[f"{name}.scales"].dtype == torch.float16 and torch.equal(sd[f"{name}.g_idx"].long(),
                                                                        torch.arange(128) // 32)
    zeros = torch.cat([model_lib.get_module(m, n).state().zeros.flatten() for n in model_lib.linear_names(m)])
    assert (zeros == 0).any() and (zeros == 2 ** bits - 1).any()
    layers, qc = gf.load_gptq(tmp_path / "out")
    assert qc["checkpoint_format"] == fmt and set(layers) == set(model_lib.linear_names(m))
    for n, ql in layers.items():
        assert torch.equal(ql.dequantize(), model_lib.get_module(m, n).dequantize()), n
    m2 = tiny_model(seed=0)
    gf.apply_gptq(m2, tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 13, 40]])
    with torch.no_grad():
        assert torch.equal(m2(ids), m(ids))


def test_act_order_permutation_round_trip(tmp_path):
    n, m_out, g = 128, 64, 32
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(m_out, n, generator=gen)
    perm = torch.randperm(n, generator=gen)
    ql = gptq.QuantLinear.from_state(gptq.quantize_rtn(W[:, perm], 3, g))  # groups over permuted columns
    ql.in_perm = perm
    Wq = ql.dequantize()
    assert torch.equal(Wq[:, perm], ql.state().dequantize())
    x = torch.randn(5, n, generator=gen)
    assert torch.allclose(ql(x), x @ Wq.T, atol=1e-5)
    t = gf.layer_tensors(ql, "gptq")
    assert torch.equal(t["g_idx"][perm].long(), torch.arange(n) // g)
    back = gf.layer_from_tensors("l", t, 3, g, "gptq")
    assert torch.equal(back.dequantize(), Wq) and back.in_perm is not None
    gptq.save_quantized(tmp_path / "q.safetensors", {"l": ql})              # our own format keeps it too
    again = gptq.load_quantized(tmp_path / "q.safetensors")[0]["l"]
    assert torch.equal(again.in_perm, perm) and torch.equal(again.dequantize(), Wq)


def fixture_cases():
    with safe_open(str(FIXTURE), "pt") as f:
        return json.loads(f.metadata()["cases"])


@pytest.mark.parametrize("case", fixture_cases(), ids=lambda c: c["name"])
def test_reference_client_fixture_reads_exactly(case):
    with safe_open(str(FIXTURE), "pt") as f:
        t = {k: f.get_tensor(f"{case['name']}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
        ref = f.get_tensor(case["ref"])
    ql = gf.layer_from_tensors(case["name"], t, case["bits"], case["group_size"], case["checkpoint_format"])
    assert torch.equal(ql.dequantize(), ref)
    assert (ql.in_perm is not None) == case["desc_act"]
    st = ql.state()
    if not case["desc_act"]:                                       # the fixture does hold zero points 0
        assert case["zero_groups"] > 0 and int((st.zeros == 0).sum()) == case["zero_groups"]
    fmt = case["checkpoint_format"]                                # and our writer gives the client's words back
    ours = gf.layer_tensors(ql, fmt)
    for field in ("qweight", "qzeros", "g_idx"):
        assert torch.equal(ours[field], t[field].to(ours[field].dtype)), field
    assert torch.equal(ours["scales"], t["scales"])


def test_v1_fixture_needs_whole_word_conversion_at_2_and_4_bits():
    """A per-field z − 1 reading gets the neighbours of a zero point 0 wrong: the fixture exercises the borrow."""
    with safe_open(str(FIXTURE), "pt") as f:
        for bits in (2, 4):
            qz = f.get_tensor(f"b{bits}_static_v1.qzeros")
            right = gf.unpack_cols(gf.zeros_v1_to_v2(qz, bits, 32), bits, 32).long()
            per_field = (gf.unpack_cols(qz, bits, 32).long() + 1) % 2 ** bits
            assert not torch.equal(per_field, right)


def write_folder(path, tensors, qc):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    return path


def one_layer(bits=4, g=32, m=64, n=128):
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(1))
    return gf.layer_tensors(gptq.QuantLinear.from_state(gptq.quantize_rtn(W, bits, g)))


QC = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
      "checkpoint_format": "gptq_v2"}


@pytest.mark.parametrize("change, match", [
    ({"bits": 8}, r"quantization_config\.bits=8"),
    ({"quant_method": "awq"}, r"quant_method='awq'"),
    ({"checkpoint_format": "marlin"}, r"checkpoint_format='marlin'"),
    ({"pack_dtype": "int16"}, r"pack_dtype='int16'"),
    ({"group_size": 0}, r"group_size=0"),
])
def test_unsupported_configs_fail_naming_the_field(tmp_path, change, match):
    folder = write_folder(tmp_path / "f", {f"a.{k}": v for k, v in one_layer().items()}, {**QC, **change})
    with pytest.raises(ValueError, match=match):
        gf.load_gptq(folder)


def test_bad_tensors_fail_naming_tensor_and_field(tmp_path):
    t = one_layer()
    cases = [
        ({k: v for k, v in t.items() if k != "qzeros"}, r"a\.qzeros: missing"),
        ({**t, "scales": t["scales"][:2], "qzeros": t["qzeros"][:2]}, r"a\.scales: 2 groups"),
        ({**t, "qzeros": t["qzeros"][:, :-1]}, r"a\.qzeros: shape \(4, 7\); expected \(4, 8\)"),
        ({**t, "qweight": t["qweight"][:-1]}, r"a\.qweight: shape"),
        ({**t, "qweight": t["qweight"].to(torch.int64)}, r"a\.qweight: torch\.int64"),
        ({**t, "g_idx": torch.zeros(128, dtype=torch.int32)}, r"a\.g_idx: groups of unequal sizes"),
        ({**t, "g_idx": torch.full((128,), 9, dtype=torch.int32)}, r"a\.g_idx: 128 entries in \[9, 9\]"),
        ({**t, "scales": t["scales"].float() * (1 + 2 ** -14)}, r"a\.scales: torch\.float32 values that fp16"),
    ]
    for i, (tensors, match) in enumerate(cases):
        folder = write_folder(tmp_path / str(i), {f"a.{k}": v for k, v in tensors.items()}, QC)
        with pytest.raises(ValueError, match=match):
            gf.load_gptq(folder)


def test_model_shape_mismatch_and_missing_layers_fail(tmp_path):
    m = quantize_all(tiny_model(), 4)
    gf.export_gptq(tmp_path / "out", m)
    other = model_lib.LlamaForCausalLM(model_lib.ModelConfig(
        vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.gate_proj\.scales: out_features 128; the model expects 96"):
        gf.apply_gptq(other, tmp_path / "out")
    deeper = model_lib.LlamaForCausalLM(model_lib.ModelConfig(
        vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.q_proj\.qweight: missing"):
        gf.apply_gptq(deeper, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        gf.load_gptq(tmp_path / "nowhere")
    assert gf.is_gptq_folder(tmp_path / "out") and not gf.is_gptq_folder(tmp_path / "nowhere")


def test_export_needs_quantized_linears(tmp_path):
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj is Linear"):
        gf.export_gptq(tmp_path / "out", tiny_model())


# --------------------------------------------------------------------------------------------- fp16-exact scales
def fp16_reader(t: dict[str, torch.Tensor], bits: int, n: int) -> torch.Tensor:
    """W (m, n) as an fp16-dequantizing reader forms it from GPTQ v2 tensors (gptqmodel's torch kernel): every
    operand and the product s·(q − z) in fp16."""
    q = gf.unpack_rows(t["qweight"], bits, n).half()                            # (n, m)
    z = gf.unpack_cols(t["qzeros"], bits, t["scales"].shape[1]).half()         # (G, m)
    g_idx = t["g_idx"].long()
    return (t["scales"][g_idx] * (q - z[g_idx])).T                              # (m, n) fp16


@settings(max_examples=200, deadline=None, derandomize=True)
@given(bits=st.sampled_from([2, 3, 4]), raw=st.integers(1, 0x7BFF))
def test_fp16_exact_scales_make_every_weight_exact_in_fp16(bits, raw):
    s = torch.tensor([raw], dtype=torch.int16).view(torch.float16)            # every positive finite fp16
    r = gptq.fp16_exact_scales(s, bits)
    assert r.dtype == torch.float16 and float(r) > 0
    assert abs(float(r) - float(s)) <= float(s) * 2.0 ** -(11 - bits)          # rounded to 11 − b significant bits
    assert torch.equal(gptq.fp16_exact_scales(r, bits), r)                     # idempotent: already representable
    u = torch.arange(-(2 ** bits - 1), 2 ** bits, dtype=torch.float64)         # every q − z
    exact = float(r) * u                                                       # float64: the true products
    ok = exact.abs() <= 65504                                                  # (larger ones overflow any fp16)
    assert torch.equal((r.half() * u.half())[ok].double(), exact[ok])


def test_fp16_exact_scales_are_needed():
    """Without the option the same grid has weights that fp16 rounds (the test above could fail)."""
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    W[:32] = W[:32].abs()                                                      # zero point 0: q − z up to 2^b − 1
    for bits in (2, 3, 4):
        plain = gptq.QuantLinear.from_state(gptq.quantize_rtn(W, bits, 32))
        exact = gptq.QuantLinear.from_state(gptq.quantize_rtn(W, bits, 32, fp16_exact=True))
        assert gf.fp16_inexact({"l": plain}) == ["l"] and gf.fp16_inexact({"l": exact}) == []


def test_default_scales_are_the_plain_fp16_rounding():
    """fp16_exact off: every site that stores a scale rounds it to fp16 and nothing else, as before the option."""
    s = torch.cat([torch.rand(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10,
                   torch.tensor([0.0, 1e-9, 7e4], dtype=torch.float64)])
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(gptq._store_scales(s.to(dtype), 3), s.to(dtype).clamp(2.0 ** -24, 65504.0).half())
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    ref = W.reshape(16, 2, 32)
    lo, hi = ref.amin(-1).clamp(max=0), ref.amax(-1).clamp(min=0)
    assert torch.equal(gptq.fit_groups(W, 2, 32)[0], ((hi - lo) / 3).clamp(2.0 ** -24, 65504.0).half())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_fp16_exact_every_option(bits):
    from test_gptq import correlated_H, layer_err
    H = correlated_H(128, bits)
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(bits)) * 0.02
    kw = dict(act_order=True, clip=True, cd_passes=1, refit=True)
    plain = gptq.gptq_quantize(W, H, bits, 32, **kw)
    exact = gptq.gptq_quantize(W, H, bits, 32, fp16_exact=True, **kw)
    assert exact.stats["fp16_exact"] and not plain.stats["fp16_exact"]
    assert torch.equal(gptq.fp16_exact_scales(exact.scales, bits), exact.scales)   # grid, clip polish and refit
    assert gf.fp16_inexact({"l": gptq.QuantLinear.from_state(exact)}) == []
    for fit in (gptq.fit_groups(W, bits, 32, True)[0], gptq.fit_groups_clipped(W, bits, 32, fp16_exact=True)[0]):
        assert torch.equal(gptq.fp16_exact_scales(fit, bits), fit)
    e0, e1 = layer_err(W, plain.dequantize(), H), layer_err(W, exact.dequantize(), H)
    assert e1 < 1.1 * e0                                                       # GPTQ compensates on the final grid


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_export_of_fp16_exact_base_read_in_fp16_is_ours_bitwise(tmp_path, bits):
    from test_gptq import correlated_H
    found = {}
    for exact in (True, False):
        m = tiny_model(seed=bits)
        for i, name in enumerate(model_lib.linear_names(m)):
            W = model_lib.get_module(m, name).weight.detach()
            st_ = gptq.gptq_quantize(W, correlated_H(W.shape[1], i), bits, 32, act_order=True, clip=True,
                                     refit=True, fp16_exact=exact)
            model_lib.set_module(m, name, gptq.QuantLinear.from_state(st_))
        folder = tmp_path / f"e{int(exact)}"
        gf.export_gptq(folder, m, dtype=gf.dense_dtype(m))
        sd = load_file(folder / "model.safetensors")
        assert sd["model.embed_tokens.weight"].dtype == torch.float32          # random fp32 weights: kept exact
        assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float32"
        found[exact] = all(
            torch.equal(fp16_reader({k: sd[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, bits,
                                    model_lib.get_module(m, name).in_features).float(),
                        model_lib.get_module(m, name).dequantize())
            for name in model_lib.linear_names(m))
    assert found == {True: True, False: False}


def test_dense_dtype_is_the_narrowest_exact_one():
    m = quantize_all(tiny_model(), 4)
    assert gf.dense_dtype(m) == torch.float32
    with torch.no_grad():
        m.model.embed_tokens.weight[0, 0] = 1e-7                               # below fp16's normal range
    m.to(torch.bfloat16)                                                       # (the QuantLinears keep fp16 scales)
    assert gf.dense_dtype(m) == torch.bfloat16
    m.half()
    assert gf.dense_dtype(m) == torch.float16


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """train.py --export-gptq on the tiny model of test_train (init only), and the files it leaves."""
    import train
    from test_train import CORPUS, GSM, make_tiny_model
    root = tmp_path_factory.mktemp("gptq_run")
    make_tiny_model(root / "model")
    (root / "gsm.jsonl").write_text("\n".join(json.dumps(r) for r in GSM) + "\n")
    (root / "calib.txt").write_text("\n\n".join(CORPUS * 4))
    base = ["--model", str(root / "model"), "--group-size", "32", "--rank", "4", "--data", str(root / "gsm.jsonl"),
            "--calib", str(root / "calib.txt"), "--n-calib", "4", "--calib-len", "32", "--n-eval", "2",
            "--batch-size", "2", "--max-len", "128", "--quiet", "--device", "cpu", "--gptq-cd-passes", "0"]
    train.main([*base, "--bits", "3", "--steps", "1", "--out", str(root / "out"), "--export-gptq", str(root / "gq")])
    return root, base


def test_train_export_gptq_writes_the_base_and_the_adapter_beside_it(tiny_run):
    from eval import load_model
    root, _ = tiny_run
    gq, out = root / "gq", root / "out"
    qc = gf.quant_config(gq)
    assert qc["bits"] == 3 and qc["group_size"] == 32 and qc["checkpoint_format"] == "gptq_v2"
    assert (gq / "tokenizer.json").is_file() and (gq / "adapter.safetensors").is_file()
    info = json.loads((gq / "adapter_config.json").read_text())
    assert info == json.loads((out / "adapter_config.json").read_text())
    assert info["method"] == "wha" and info["budget_rank"] == 4 and info["transform"] == "wht"
    assert set(info["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"}
    assert info["layers"]["model.layers.0.mlp.down_proj"]["shape"] == [64, 128]
    ours, _ = load_model(root / "model", out / "quantized.safetensors", out / "adapter.safetensors")
    theirs, _ = load_model(root / "model", gq, gq / "adapter.safetensors")
    ids = torch.tensor([[1, 7, 20, 33, 5]])
    with torch.no_grad():
        assert torch.equal(ours(ids), theirs(ids))


def test_train_starts_from_a_gptq_folder(tiny_run, tmp_path):
    import train
    root, base = tiny_run
    rec = train.main([*base, "--bits", "3", "--steps", "0", "--out", str(tmp_path / "o"),
                      "--quantized", str(root / "gq")])
    assert rec["init"]["err_refined"] < rec["init"]["err_before"]
    a = gptq.load_quantized(tmp_path / "o" / "quantized.safetensors")[0]
    b = gptq.load_quantized(root / "out" / "quantized.safetensors")[0]
    assert all(torch.equal(a[n].dequantize(), b[n].dequantize()) for n in b)
    with pytest.raises(ValueError, match=r"is 3-bit with group size 32 .*pass --bits 3 --group-size 32"):
        train.main([*base, "--bits", "2", "--steps", "0", "--out", str(tmp_path / "o2"), "--quantized",
                    str(root / "gq")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder without a config.json quantization_config"):
        train.main([*base, "--bits", "3", "--steps", "0", "--out", str(tmp_path / "o3"), "--quantized",
                    str(tmp_path / "empty")])


def test_export_run_fits_fp16_exact_scales_and_records_it(tiny_run):
    root, _ = tiny_run
    layers, meta = gptq.load_quantized(root / "out" / "quantized.safetensors")
    assert meta["gptq_fp16_exact"] is True and gf.fp16_inexact(layers) == []
    with safe_open(str(root / "out" / "adapter.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["settings"])["base"]["gptq_fp16_exact"] is True   # in the adapter's base
    assert json.loads((root / "gq" / "config.json").read_text())["torch_dtype"] == "float32"
    assert load_file(root / "gq" / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.float32


def test_reused_base_keeps_its_scales_and_a_plain_one_gets_a_note(tiny_run, tmp_path, capsys):
    import train
    root, base = tiny_run
    plain = tmp_path / "plain.safetensors"
    args = [*base, "--bits", "3", "--steps", "0"]
    train.main([*args, "--out", str(tmp_path / "p"), "--quantized", str(plain)])        # no export: plain scales
    layers, meta = gptq.load_quantized(plain)
    assert meta["gptq_fp16_exact"] is False and gf.fp16_inexact(layers)
    capsys.readouterr()
    loud = [a for a in args if a != "--quiet"]
    train.main([*loud, "--out", str(tmp_path / "p2"), "--quantized", str(plain), "--export-gptq", str(tmp_path / "g")])
    notes = [line for line in capsys.readouterr().err.splitlines() if "note: --export-gptq" in line]
    assert len(notes) == 1 and "fp32" in notes[0] and "fp16" in notes[0]
    back, _ = gf.load_gptq(tmp_path / "g")
    assert all(torch.equal(back[n].dequantize(), layers[n].dequantize()) for n in layers)  # exported as it is
    with pytest.raises(ValueError, match="made with gptq_fp16_exact=False, but this run has gptq_fp16_exact=True"):
        train.main([*args, "--out", str(tmp_path / "p3"), "--quantized", str(plain), "--gptq-fp16-exact"])
    rec = train.main([*args, "--out", str(tmp_path / "e"), "--quantized", str(root / "out" / "quantized.safetensors")])
    assert rec["train"]["gptq_fp16_exact"] is True                             # the reused exact base, recorded


def test_eval_reads_a_gptq_folder_with_its_adapter_and_refuses_another_base(tiny_run, tmp_path):
    import eval as ev
    import train
    root, base = tiny_run
    common = ["--model", str(root / "model"), "--task", "ppl", "--data", str(root / "calib.txt"), "--seq-len", "16",
              "--quiet"]
    folder = ev.main([*common, "--quantized", str(root / "gq"), "--adapter", str(root / "gq" / "adapter.safetensors")])
    ours = ev.main([*common, "--quantized", str(root / "out" / "quantized.safetensors"), "--adapter",
                    str(root / "out" / "adapter.safetensors")])
    assert folder["ppl"] == ours["ppl"]
    train.main([*base, "--bits", "3", "--steps", "0", "--seed", "1", "--out", str(tmp_path / "s1")])   # another base
    other = ["--quantized", str(root / "gq"), "--adapter", str(tmp_path / "s1" / "adapter.safetensors")]
    with pytest.raises(ValueError, match=r"initialized for another base than --quantized .*packed weights sha256"):
        ev.main([*common, *other])
    assert ev.main([*common, *other, "--allow-base-mismatch"])["ppl"] > 0


def test_resume_with_export_gptq_writes_the_continued_runs_base(tiny_run, tmp_path, capsys):
    """--export-gptq added on --resume exports the base the run was prepared with (no new fit), the adapter beside
    it, and a note that its scales were not fitted fp16-exact."""
    import train
    from eval import load_model
    root, base = tiny_run
    out, gq = tmp_path / "o", tmp_path / "gq"
    train.main([*base, "--bits", "3", "--steps", "2", "--stop-after", "1", "--out", str(out)])
    capsys.readouterr()
    loud = [a for a in base if a != "--quiet"]                                        # the note is a log line
    rec = train.main([*loud, "--bits", "3", "--steps", "2", "--out", str(out), "--resume", "--export-gptq", str(gq)])
    assert rec["train"]["gptq_fp16_exact"] is False
    assert "not fitted with --gptq-fp16-exact" in capsys.readouterr().err
    ours = gptq.load_quantized(out / "quantized.safetensors")[0]
    theirs, _ = load_model(root / "model", gq)
    for name, q in ours.items():
        assert torch.equal(theirs.get_submodule(name).dequantize(), q.dequantize())
    assert (gq / "adapter.safetensors").is_file() and (gq / "adapter_config.json").is_file()
