"""Block-streamed preparation (prepare.py) against the all-at-once path (train.calibrate, quantize,
init_adapters on the whole model), on tiny random models in seconds."""
import json

import pytest
import torch

import calib
import gptq
import model as model_lib
import prepare
import qwha
import train
from test_train import GSM, argv, make_tiny_model


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    """Three blocks (one more than test_train's), so a block's inputs come from a block that is itself streamed."""
    root = tmp_path_factory.mktemp("tiny3")
    make_tiny_model(root / "model", seed=1)
    cfg = json.loads((root / "model" / "config.json").read_text())
    m = model_lib.from_pretrained(root / "model")
    big = model_lib.LlamaForCausalLM(model_lib.ModelConfig.from_dict({**cfg, "num_hidden_layers": 3}))
    model_lib.init_weights(big, torch.Generator().manual_seed(3), std=0.08)
    big.model.embed_tokens.weight.data.copy_(m.model.embed_tokens.weight)
    model_lib.save_pretrained(big, root / "model")
    (root / "gsm.jsonl").write_text("\n".join(json.dumps(r) for r in GSM) + "\n")
    from test_train import CORPUS
    (root / "calib.txt").write_text("\n\n".join(CORPUS * 4))
    return root


def config(tiny, out, *extra):
    cfg = train.resolve_defaults(train.parse_args(argv(tiny, out, "--n-calib", "6", *extra)))
    train.validate(cfg)
    return cfg


def all_at_once(cfg):
    """The reference: the whole model loaded, every Hessian, every GPTQ, every init."""
    tok = model_lib.Tokenizer.from_pretrained(cfg.model)
    m = model_lib.from_pretrained(cfg.model)
    m.requires_grad_(False)
    hessians = train.calibrate(m, tok, cfg, lambda s: None)
    originals = train.quantize(m, hessians, cfg, lambda s: None)
    summary = train.init_adapters(m, hessians, originals, cfg, lambda s: None)
    return m, hessians, summary


def streamed(cfg):
    tok = model_lib.Tokenizer.from_pretrained(cfg.model)
    return prepare.prepare(cfg, tok, lambda s: None)


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("extra", [(), ("--adapter", "wha", "--select", "random"), ("--adapter", "lora")],
                         ids=["qwha", "random-support", "cloq"])
def test_streamed_equals_all_at_once_bitwise(tiny3, tmp_path, extra):
    """fp block inputs: the same Hessians, codes, supports and values as the whole-model path, bit for bit (one
    thread; conftest pins it). A random support draws from one generator across blocks, as in one call."""
    cfg = config(tiny3, tmp_path / "a", *extra)
    ref, _, ref_summary = all_at_once(cfg)
    got, summary, stats = streamed(cfg)
    assert_same_model(ref, got)
    assert [r["err_refined"] for r in summary["layers"]] == [r["err_refined"] for r in ref_summary["layers"]]
    assert set(stats) >= {"calibrate_s", "quantize_s", "init_s", "peak_host_gb"}


def test_hessian_file_is_shared_per_input_and_reused(tiny3, tmp_path):
    """--hessians written block by block holds one matrix per distinct input (q/k/v one, gate/up one); reading
    it back gives the whole-model Hessians bitwise and the same prepared model without a calibration pass."""
    hfile = tmp_path / "h.safetensors"
    cfg = config(tiny3, tmp_path / "a", "--hessians", str(hfile))
    first, _, _ = streamed(cfg)
    _, ref_h, _ = all_at_once(config(tiny3, tmp_path / "b"))
    loaded, meta = calib.load_hessians(hfile)
    assert meta["n_calib"] == 6
    assert loaded.keys() == ref_h.keys()
    for k in ref_h:
        assert torch.equal(loaded[k], ref_h[k]), k
    assert loaded["model.layers.1.self_attn.k_proj"] is loaded["model.layers.1.self_attn.q_proj"]
    assert loaded["model.layers.1.mlp.up_proj"] is loaded["model.layers.1.mlp.gate_proj"]
    from safetensors import safe_open
    with safe_open(str(hfile), "pt") as f:
        assert len(list(f.keys())) == 4 * 3                       # q, o, gate, down per block
    cfg.calib = str(tmp_path / "absent.txt")                      # reuse must not read the calibration text
    second, _, _ = streamed(cfg)
    assert_same_model(first, second)


def test_quantized_file_reused(tiny3, tmp_path):
    qfile = tmp_path / "q.safetensors"
    cfg = config(tiny3, tmp_path / "a", "--quantized", str(qfile))
    first, _, _ = streamed(cfg)
    layers, meta = gptq.load_quantized(qfile)
    assert len(layers) == 21 and meta["bits"] == 2
    second, _, stats = streamed(cfg)
    assert_same_model(first, second)


def test_hessian_writer_leaves_nothing_when_stopped(tiny3, tmp_path, monkeypatch):
    """A run killed mid-way (here: an error in block 2's GPTQ) leaves no --hessians file, complete or not."""
    hfile = tmp_path / "h.safetensors"
    cfg = config(tiny3, tmp_path / "a", "--hessians", str(hfile))
    real = prepare.gptq_layer

    def failing(W, H, *a, name="", **k):
        if ".layers.2." in name:
            raise RuntimeError("stopped")
        return real(W, H, *a, name=name, **k)

    monkeypatch.setattr(prepare, "gptq_layer", failing)
    with pytest.raises(RuntimeError):
        streamed(cfg)
    assert list(tmp_path.iterdir()) == []


def test_quantized_block_inputs_differ_and_stay_close(tiny3, tmp_path):
    """GPTQ's sequential mode: blocks after the first see the prepared blocks' outputs, so their Hessians (and
    hence the model) differ from the fp mode's; block 0 is the same in both."""
    fp, _, _ = streamed(config(tiny3, tmp_path / "a"))
    sq, summary, _ = streamed(config(tiny3, tmp_path / "b", "--block-inputs", "quantized"))
    a, b = fp.state_dict(), sq.state_dict()
    block0 = [k for k in a if k.startswith("model.layers.0.")]
    assert all(torch.equal(a[k], b[k]) for k in block0)
    later = [k for k in a if k.startswith("model.layers.2.") and k.endswith(".values")]
    assert any(not torch.equal(a[k], b[k]) for k in later)
    assert summary["err_refined"] < summary["err_before"]


def test_no_full_precision_linear_is_left(tiny3, tmp_path):
    m, _, _ = streamed(config(tiny3, tmp_path / "a"))
    assert not any(isinstance(mod, torch.nn.Linear) and name != "lm_head" for name, mod in m.named_modules())
    assert len(qwha.adapters(m)) == 21
    assert not any(p.is_meta for p in m.parameters())
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {f"{n}.values" for n in qwha.adapters(m)}


def test_checkpoint_reader_reads_one_prefix(tiny3):
    reader = model_lib.CheckpointReader(tiny3 / "model")
    with torch.device("meta"):
        m = model_lib.LlamaForCausalLM(reader.config, init=False)
    reader.load(m, "model.layers.1.")
    loaded = {n for n, p in m.named_parameters() if not p.is_meta}
    assert loaded and all(n.startswith("model.layers.1.") for n in loaded)
    full = model_lib.from_pretrained(tiny3 / "model")
    assert torch.equal(m.model.layers[1].mlp.up_proj.weight, full.model.layers[1].mlp.up_proj.weight)


def _sharded_copy(src, dst):
    """src's checkpoint written again as one shard per block plus an index."""
    import shutil
    shutil.copytree(src, dst)
    m = model_lib.from_pretrained(dst)
    (dst / "model.safetensors").unlink()
    model_lib.save_pretrained(m, dst, max_shard_size=60_000)
    assert (dst / model_lib.INDEX_NAME).exists()
    return dst


@pytest.mark.parametrize("damage", ["truncated", "dtype", "uncovered"])
def test_bad_shard_is_named_before_any_work(tiny3, tmp_path, damage):
    """A truncated shard, a weight stored as integers, or an index that leaves a tensor out: one line naming the
    shard and the tensor, from the validation stage (nothing written to --out)."""
    folder = _sharded_copy(tiny3 / "model", tmp_path / "model")
    index = json.loads((folder / model_lib.INDEX_NAME).read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    shard = folder / index["weight_map"][name]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "dtype":
        from safetensors.torch import load_file, save_file
        t = load_file(str(shard))
        t[name] = torch.zeros(t[name].shape, dtype=torch.int32)
        save_file(t, str(shard))
    else:
        del index["weight_map"][name]
        (folder / model_lib.INDEX_NAME).write_text(json.dumps(index))
    args = argv(tiny3, tmp_path / "out")
    args[args.index("--model") + 1] = str(folder)
    with pytest.raises(ValueError) as e:
        train.main(args)
    msg = str(e.value)
    assert "\n" not in msg
    assert ("truncated" in msg) if damage == "truncated" else (name in msg)  # the shard's last tensor is cut
    assert damage == "uncovered" or shard.name in msg
    assert not (tmp_path / "out").exists()
