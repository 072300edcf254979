"""model.py against the reference implementation's fixtures (tests/fixtures, made by make_fixtures.py with
transformers 5.23), and the invariants: padding, KV cache, save/load, errors, tokenizer, checkpointing."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import model as M

FIX = Path(__file__).resolve().parent / "fixtures"
CASES = ["llama_gqa", "llama3_tied", "mistral_sw", "llama_dyn_bias"]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    # dynamic NTK recomputes the frequencies from the current length at each step, so cached keys keep the
    # frequencies of their own step (as in the reference): cache-vs-no-cache equality holds for the others only
    ref = load_file(str(FIX / request.param / "reference.safetensors"))
    return request.param, M.from_pretrained(FIX / request.param).eval(), ref


def plain_rope(m):
    """The same weights with the RoPE scaling removed."""
    m = copy.deepcopy(m)
    m.config.rope_scaling = None
    return m


def prompts_of(ref):
    ids, mask = ref["input_ids"], ref["attention_mask"].bool()
    return [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]


# ------------------------------------------------------------------------------------------ parity with the reference
@torch.no_grad()
def test_logits_match_reference(case):
    name, m, ref = case
    ids, mask, want = ref["input_ids"], ref["attention_mask"], ref["logits"]
    assert m.dtype == torch.float32
    full = m(ids[:1])                                   # unpadded row: the plain causal path
    assert (full[0] - want[0]).abs().max() < 1e-4, name
    got = m(ids, mask)                                  # left-padded batch: the masked path
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() < 1e-4, name


@torch.no_grad()
def test_greedy_generation_matches_reference(case):
    name, m, ref = case
    out = M.generate(m, prompts_of(ref), max_new_tokens=ref["gen_tokens"].shape[1])
    assert out == ref["gen_tokens"].tolist(), name


def test_sliding_window_changes_mistral_logits():
    m = M.from_pretrained(FIX / "mistral_sw").eval()
    ids = load_file(str(FIX / "mistral_sw" / "reference.safetensors"))["input_ids"][:1]
    with torch.no_grad():
        windowed = m(ids)
        m.config.sliding_window = None
        plain = m(ids)
    w = 6
    assert torch.equal(windowed[:, :w], plain[:, :w])   # the window only binds after w tokens
    assert (windowed[:, w:] - plain[:, w:]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------ padding / cache
@torch.no_grad()
def test_left_padded_row_equals_unpadded(case):
    name, m, ref = case
    if name == "llama_dyn_bias":  # dynamic NTK depends on the batch's longest row, by design (as the reference)
        m = plain_rope(m)
    ids, mask = ref["input_ids"], ref["attention_mask"]
    padded = m(ids, mask)[1][mask[1].bool()]
    alone = m(ids[1:, mask[1].bool()])[0]
    assert (padded - alone).abs().max() < 1e-5


@torch.no_grad()
def test_kv_cache_logits_equal_full_forward(case):
    name, m, ref = case
    if name == "llama_dyn_bias":
        m = plain_rope(m)
    ids, mask = ref["input_ids"], ref["attention_mask"]
    full = m(ids, mask)
    cache = M.KVCache(m.config, 2, ids.shape[1], dtype=m.dtype)
    steps = [m(ids[:, :10], mask[:, :10], cache)]
    for t in range(10, ids.shape[1]):
        steps.append(m(ids[:, t:t + 1], mask[:, t:t + 1], cache))
    real = mask.bool()
    assert (torch.cat(steps, dim=1)[real] - full[real]).abs().max() < 1e-5


@torch.no_grad()
def test_generation_with_cache_equals_without(case):
    name, m, ref = case
    if name == "llama_dyn_bias":
        m = plain_rope(m)
    prompts = prompts_of(ref) + [[5, 6, 7]]
    assert M.generate(m, prompts, 6, use_cache=True) == M.generate(m, prompts, 6, use_cache=False)
    sampled = [M.generate(m, prompts, 6, temperature=0.8, top_p=0.9, use_cache=c,
                          generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    assert sampled[0] == sampled[1]


@torch.no_grad()
def test_generation_stops_at_eos():
    m = M.from_pretrained(FIX / "llama_gqa").eval()
    free = M.generate(m, [[5, 6, 7], [9, 10]], 8)
    eos = free[0][3]
    stopped = M.generate(m, [[5, 6, 7], [9, 10]], 8, eos_id=eos)
    assert stopped[0] == free[0][:free[0].index(eos)]
    assert eos not in stopped[1] and stopped[1] == free[1][:len(stopped[1])]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 0.99))
def test_top_p_samples_only_from_the_nucleus(seed, top_p):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 50, generator=g) * 3
    tok = M.sample_next(logits, temperature=1.0, top_p=top_p, generator=g)
    p = torch.softmax(logits, -1)
    for b in range(4):
        sorted_p = p[b].sort(descending=True).values
        k = int((sorted_p.cumsum(0) < top_p).sum()) + 1        # smallest prefix whose mass reaches top_p
        assert p[b, tok[b]] >= sorted_p[k - 1] - 1e-7


def test_mask_matches_brute_force():
    key_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]]).bool()
    for window in (None, 3):
        m = M.attention_mask_4d(key_mask, 5, window)
        for b in range(2):
            for t in range(5):
                q = 3 + t
                for k in range(8):
                    want = k <= q and bool(key_mask[b, k]) and (window is None or q - k < window)
                    assert bool(m[b, 0, t, k]) == (want or k == q)


# ------------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip_is_bitwise(tmp_path):
    for name in ("llama3_tied", "llama_dyn_bias"):
        m = M.from_pretrained(FIX / name)
        files = M.save_pretrained(m, tmp_path / name)
        assert [f.name for f in files] == ["model.safetensors"]
        stored = load_file(str(files[0]))
        assert ("lm_head.weight" in stored) == (not m.config.tie_word_embeddings)
        back = M.from_pretrained(tmp_path / name)
        a, b = m.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert back.lm_head.weight is back.model.embed_tokens.weight or not m.config.tie_word_embeddings


def test_sharded_save_and_load(tmp_path):
    m = M.from_pretrained(FIX / "llama_gqa")
    files = M.save_pretrained(m, tmp_path, max_shard_size=60_000)
    assert len(files) > 2 and all(f.name.startswith("model-") for f in files)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(m.state_dict())
    assert all(f.stat().st_size < 60_000 + 10_000 for f in files)
    back = M.from_pretrained(tmp_path)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in m.state_dict().items())
    M.save_pretrained(m, tmp_path)  # saving unsharded over it removes the stale shards and index
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_load_in_bf16_and_fp16():
    ref = load_file(str(FIX / "llama_gqa" / "reference.safetensors"))
    for dtype in (torch.bfloat16, torch.float16):
        m = M.from_pretrained(FIX / "llama_gqa", dtype=dtype)
        assert all(p.dtype == dtype for p in m.parameters())
        with torch.no_grad():
            out = m(ref["input_ids"][:1])
        assert out.dtype == dtype and (out[0].float() - ref["logits"][0]).abs().max() < 0.2


def test_model_names_and_module_swap():
    m = M.from_pretrained(FIX / "llama_gqa")
    names = M.linear_names(m)
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj" and names[-1].endswith("down_proj")
    assert all(isinstance(M.get_module(m, n), nn.Linear) for n in names)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        before = m(ids)
        M.set_module(m, names[3], nn.Identity())  # o_proj: (64 -> 64) so Identity keeps the shapes
        assert (m(ids) - before).abs().max() > 1e-3
    with pytest.raises(ValueError, match="model.layers.9"):
        M.get_module(m, "model.layers.9.mlp")


# ----------------------------------------------------------------------------------------------------------- errors
def test_config_errors_name_the_field():
    base = json.loads((FIX / "llama_gqa" / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type"):
        M.ModelConfig.from_dict({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope_scaling.rope_type='yarn'"):
        M.ModelConfig.from_dict({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_act"):
        M.ModelConfig.from_dict({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="low_freq_factor"):
        M.ModelConfig.from_dict({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_transformers4_config_layout_reads_the_same():
    v5 = json.loads((FIX / "llama3_tied" / "config.json").read_text())
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    rp = dict(v5["rope_parameters"])
    v4["rope_theta"], v4["torch_dtype"] = rp.pop("rope_theta"), v4.pop("dtype")
    v4["rope_scaling"] = {**rp, "type": rp.pop("rope_type")}
    a, b = M.ModelConfig.from_dict(v5), M.ModelConfig.from_dict(v4)
    assert torch.equal(M.rope_inv_freq(a), M.rope_inv_freq(b)) and a.rope_type == b.rope_type == "llama3"
    assert a.torch_dtype == b.torch_dtype == "bfloat16" and a.rope_theta == b.rope_theta == 500000.0
    assert not torch.equal(M.rope_inv_freq(a), M.rope_inv_freq(M.ModelConfig(**{**a.__dict__, "rope_scaling": None})))
    c = M.ModelConfig.from_dict({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4})
    assert c.head_dim == 16 and c.num_key_value_heads == 4 and c.sliding_window == 4096  # the reference's default
    assert M.ModelConfig.from_dict({"model_type": "mistral", "sliding_window": None}).sliding_window is None
    llama = M.ModelConfig.from_dict({"model_type": "llama", "sliding_window": 8})  # not a llama field: ignored
    assert llama.sliding_window is None and llama.to_dict()["sliding_window"] == 8


def test_checkpoint_mismatch_lists_every_tensor(tmp_path):
    shutil.copy(FIX / "llama_gqa" / "config.json", tmp_path / "config.json")
    sd = load_file(str(FIX / "llama_gqa" / "model.safetensors"))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"][:16]
    sd["model.extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        M.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected tensor model.extra.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight in model.safetensors: shape (16, 64), config expects (32, 64)" in msg


def test_missing_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.from_pretrained(tmp_path)
    shutil.copy(FIX / "llama_gqa" / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        M.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-1.safetensors"):
        M.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        M.Tokenizer.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------------- tokenizer
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                   "{% endif %}")


def make_tokenizer(path: Path, specials: list[str], tcfg: dict, gcfg: dict | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["hello", "there", "user", "assistant", "system", "hi", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    if gcfg is not None:
        (path / "generation_config.json").write_text(json.dumps(gcfg))
    return M.Tokenizer.from_pretrained(path)


def test_chatml_template_and_special_ids(tmp_path):
    tok = make_tokenizer(tmp_path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                         {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                          "chat_template": SMOL_TEMPLATE})
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    text = tok.apply_chat_template([{"role": "user", "content": "hello there"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
    own = tok.apply_chat_template([{"role": "system", "content": "hi"}, {"role": "user", "content": "hello"}],
                                  add_generation_prompt=False)
    assert own == "<|im_start|>system\nhi<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>")
    assert ids == [1, tok.tok.token_to_id("user"), tok.tok.token_to_id("hello"), 2]
    assert tok.encode("hello", add_bos=True) == [1, tok.tok.token_to_id("hello")]
    assert tok.decode(ids, skip_special_tokens=True).split() == ["user", "hello"]


def test_llama3_template_and_eos_list(tmp_path):
    tok = make_tokenizer(tmp_path, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                    "<|end_header_id|>", "<|eot_id|>"],
                         {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                          "chat_template": LLAMA3_TEMPLATE},
                         {"eos_token_id": [1, 4]})
    assert tok.bos_id == 0 and tok.eos_id == 4 and tok.eos_ids == [4, 1] and tok.pad_id is None
    text = tok.apply_chat_template([{"role": "user", "content": " hello "}])
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="eos_token='<nope>'"):
        make_tokenizer(tmp_path / "a", ["<s>"], {"eos_token": "<nope>"})
    tok = make_tokenizer(tmp_path / "b", ["<s>"], {"eos_token": {"content": "<s>"}})
    assert tok.eos_id == 0
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="ChatML"):
        make_tokenizer(tmp_path / "c", ["<s>"], {"chat_template": "{{ messages }}"})


# ------------------------------------------------------------------------------------------ gradient checkpointing
def test_gradient_checkpointing_gives_the_same_gradients():
    ref = load_file(str(FIX / "mistral_sw" / "reference.safetensors"))
    ids, mask = ref["input_ids"], ref["attention_mask"]
    grads = []
    for ckpt in (False, True):
        m = M.from_pretrained(FIX / "mistral_sw").train()
        m.gradient_checkpointing = ckpt
        logits = m(ids, mask)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][mask[:, 1:].bool()], ids[:, 1:][mask[:, 1:].bool()])
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


def test_init_weights_is_seeded_and_tied_head_follows():
    cfg = M.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True)
    a = M.init_weights(M.LlamaForCausalLM(cfg), torch.Generator().manual_seed(5))
    b = M.init_weights(M.LlamaForCausalLM(cfg), torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.lm_head.weight is a.model.embed_tokens.weight and float(a.model.norm.weight.detach().mean()) == 1.0
    assert float(a.model.layers[0].self_attn.q_proj.bias.detach().abs().sum()) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_load_and_generate_match_cpu():
    ref = load_file(str(FIX / "mistral_sw" / "reference.safetensors"))
    m = M.from_pretrained(FIX / "mistral_sw", device="cuda").eval()
    assert all(p.device.type == "cuda" for p in m.parameters())
    ids, mask = ref["input_ids"].cuda(), ref["attention_mask"].cuda()
    with torch.no_grad():
        got = m(ids, mask).cpu()
    real = ref["attention_mask"].bool()
    assert (got[real] - ref["logits"][real]).abs().max() < 1e-3
    assert M.generate(m, prompts_of(ref), 8) == ref["gen_tokens"].tolist()
    bf16 = M.from_pretrained(FIX / "mistral_sw", dtype=torch.bfloat16, device="cuda")
    out = M.generate(bf16, prompts_of(ref), 4, temperature=0.7, generator=torch.Generator("cuda").manual_seed(0))
    assert [len(o) for o in out] == [4, 4]


def test_llama31_template_opens_with_the_dated_system_turn(tmp_path):
    template = ('{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}'
                "{{- bos_token }}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
                '{{- "Cutting Knowledge Date: December 2023\\n" }}' + LLAMA3_TEMPLATE)
    tok = make_tokenizer(tmp_path, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                         {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template})
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                    "December 2023\nToday Date: 26 Jul 2024\n\nbe brief<|eot_id|><|start_header_id|>user"
                    "<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
