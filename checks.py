"""Cheap checks of a run's inputs, made before any heavy work, and the commands' one-line error report.

Each check reads as little as it can (a safetensors file's header, never its tensors) and raises ValueError or
FileNotFoundError naming the flag, the file and the tensor at fault and what was expected:
  safetensors_header   the header of a .safetensors file, every entry and offset checked against the file size;
  linear_shapes        {block linear: (out, in)} from a model's config, what the files below must match;
  check_hessians_file, check_quantized_file, check_adapter_file   train.py's outputs against a model's config;
  base_mismatch        the settings in which an adapter's recorded base and a quantized file differ;
  check_finite         NaN/Inf in named tensors; check_device; check_text_file (UTF-8, not binary);
  check_output_dir, check_output_file   that an output path can be written, without writing it.
`ArgumentParser` and `run_cli` are the commands' side: bad input prints `error: ...` on one line and exits 1
(QWHA_DEBUG=1 or --debug shows the traceback instead); Ctrl-C exits 130. `setting` declares a config dataclass
field that is also a flag (its help and resume-relevance in the field's metadata), `given_flags` parses them.
"""
from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import sys
import tempfile
from dataclasses import MISSING, field, fields
from pathlib import Path

MAX_HEADER_BYTES = 100 * 2**20       # what the safetensors library itself accepts
QUANTIZED_FORMAT = "qwha-gptq"       # gptq.save_quantized's safetensors metadata "format"
LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


class Interrupted(Exception):
    """A run stopped on request (SIGINT) after saving what --resume continues from; the message says where."""


# ---------------------------------------------------------------------------------------------- safetensors


def _label(path, flag: str | None) -> str:
    return f"{flag} {path}" if flag else str(path)


def safetensors_header(path, flag: str | None = None) -> tuple[dict, dict, int]:
    """({tensor: {dtype, shape, data_offsets}}, metadata {str: str}, where the data starts) of a .safetensors
    file, from its first bytes only; ValueError naming the flag and file for anything malformed or truncated."""
    path, what = Path(path), _label(path, flag)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{what}: not a safetensors file (header length {n} in a file of {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        raise ValueError(f"{what}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{what}: not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{what}: malformed safetensors metadata (expected an object of strings)")
    end = 0
    for name, info in header.items():
        ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
        offsets = info.get("data_offsets") if ok else None
        ok = ok and all(isinstance(d, int) and d >= 0 for d in info["shape"]) and isinstance(offsets, list) \
            and len(offsets) == 2 and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]
        if not ok:
            raise ValueError(f"{what}: malformed safetensors header entry for tensor {name}")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise ValueError(f"{what}: truncated ({size} bytes; its header describes {8 + n + end})")
    return header, meta, 8 + n


def _json_meta(meta: dict, key: str, what: str, default=None):
    """A JSON value stored as a string in safetensors metadata; ValueError naming the file when unreadable."""
    if key not in meta:
        if default is not None:
            return default
        raise ValueError(f"{what}: its metadata has no {key!r} entry")
    try:
        return json.loads(meta[key])
    except ValueError:
        raise ValueError(f"{what}: its metadata {key!r} is not valid JSON") from None


def linear_shapes(mc) -> dict[str, tuple[int, int]]:
    """{model.layers.i.<attn|mlp>.<proj>: (out_features, in_features)} of every block linear of a ModelConfig."""
    D, ff, hd = mc.hidden_size, mc.intermediate_size, mc.head_dim
    q, kv = mc.num_attention_heads * hd, mc.num_key_value_heads * hd
    one = {"q_proj": (q, D), "k_proj": (kv, D), "v_proj": (kv, D), "o_proj": (D, q),
           "gate_proj": (ff, D), "up_proj": (ff, D), "down_proj": (D, ff)}
    return {f"model.layers.{i}.{part}.{p}": one[p]
            for i in range(mc.num_hidden_layers) for part, projs in LINEARS.items() for p in projs}


def _same_layers(found: dict, expected: dict, what: str, model: str, kind: str) -> None:
    """found and expected {name: shape} name the same linears with the same shapes, else one ValueError."""
    fmt = lambda s: "×".join(map(str, s))  # noqa: E731
    for name, shape in expected.items():
        if name not in found:
            raise ValueError(f"{what}: no entry for {name} (the {kind} of a model with other layers?)")
        if tuple(found[name]) != tuple(shape):
            raise ValueError(f"{what}: {name} is {fmt(found[name])} there, but {model}'s config.json gives "
                             f"{fmt(shape)} (the {kind} of another model?)")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ValueError(f"{what}: {extra[0]} is not a linear of {model} (the {kind} of another model?)")


def check_hessians_file(path, mc, model: str, flag: str = "--hessians") -> None:
    """A Hessian file (calib.save_hessians or calib.HessianWriter) holds an n×n Hessian for every block linear of
    the model, n its input width (linears that share an input may name another's entry); read from the header."""
    header, meta, _ = safetensors_header(path, flag)
    want = {name: (n, n) for name, (_, n) in linear_shapes(mc).items()}
    found = {k: v["shape"] for k, v in header.items()}
    aliases = _json_meta(meta, "aliases", _label(path, flag), default={})   # linears stored once per shared input
    found.update({a: found[b] for a, b in aliases.items() if isinstance(b, str) and b in found})
    _same_layers(found, want, _label(path, flag), model, "Hessians")


def check_quantized_file(path, mc, model: str, flag: str = "--quantized") -> dict:
    """A quantized base (gptq.save_quantized) has every block linear of the model at its shape; returns its
    per-layer settings {name: {bits, group_size, ...}} and its recorded settings (model, bits, GPTQ ...)."""
    what = _label(path, flag)
    header, meta, _ = safetensors_header(path, flag)
    if meta.get("format") != QUANTIZED_FORMAT:
        raise ValueError(f"{what}: not a quantized base written by train.py (format {meta.get('format')!r}, "
                         f"expected {QUANTIZED_FORMAT!r})")
    layers = _json_meta(meta, "layers", what)
    shapes = {k: (v.get("out_features"), v.get("in_features")) for k, v in layers.items() if isinstance(v, dict)}
    _same_layers(shapes, linear_shapes(mc), what, model, "quantized base")
    missing = [f"{k}.{t}" for k in layers for t in ("qweight", "scales", "qzeros") if f"{k}.{t}" not in header]
    if missing:
        raise ValueError(f"{what}: tensor {missing[0]} is missing")
    return {"layers": layers, "settings": _json_meta(meta, "user", what, default={})}


def check_adapter_file(path, mc, model: str, flag: str = "--adapter") -> dict:
    """An adapter file (qwha / baselines save_adapters) adapts linears the model has, at their shapes; returns
    the settings it records (rank, adapter, and the base it was initialized for)."""
    what = _label(path, flag)
    header, meta, _ = safetensors_header(path, flag)
    if meta.get("format") not in ("qwha-adapters/1", "qwha-baselines/1"):
        raise ValueError(f"{what}: not an adapter file written by train.py (format {meta.get('format')!r})")
    layers = _json_meta(meta, "layers", what)
    expected = linear_shapes(mc)
    shapes = {k: (v.get("out_features"), v.get("in_features")) for k, v in layers.items() if isinstance(v, dict)}
    _same_layers(shapes, {k: expected[k] for k in shapes if k in expected}, what, model, "adapter")
    return _json_meta(meta, "settings", what, default={})


def base_mismatch(adapter_settings: dict, quantized_settings: dict) -> list[str]:
    """'key: adapter's value != quantized's value' for every setting of the base an adapter records (under
    "base") that the quantized file records differently; the model folders are compared by name."""
    base = adapter_settings.get("base")
    if not isinstance(base, dict):             # an older adapter: only its bit width was recorded
        base = {k: adapter_settings[k] for k in ("bits",) if k in adapter_settings}
    out = []
    for key, want in base.items():
        have = quantized_settings.get(key)
        if key == "model" and want is not None and have is not None:
            want, have = Path(str(want)).name, Path(str(have)).name
        if have is not None and want != have and key != "sha256":
            out.append(f"{key} {want} != {have}")
    if not out and None not in (base.get("sha256"), quantized_settings.get("sha256")) \
            and base["sha256"] != quantized_settings["sha256"]:   # same settings, other weights (calibration, model)
        out.append(f"packed weights sha256 {base['sha256'][:12]}… != {quantized_settings['sha256'][:12]}…")
    return out


# ---------------------------------------------------------------------------------------------- values, devices


def check_finite(named_tensors, what: str) -> None:
    """ValueError naming the first tensor of `named_tensors` ((name, tensor) pairs) that holds NaN or Inf."""
    import torch
    for name, t in named_tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{what}: tensor {name} holds {bad} NaN/Inf value{'s' * (bad > 1)}")


def check_number(value: float, flag: str, low: float = 0.0, low_ok: bool = False, high: float = math.inf) -> None:
    """value is finite and in (low, high] ([low, high] with low_ok); ValueError naming the flag otherwise."""
    if not (math.isfinite(value) and (value >= low if low_ok else value > low) and value <= high):
        rng = f"{'>=' if low_ok else '>'} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
        raise ValueError(f"{flag} {value:g}: expected a finite number {rng}")


def check_device(device: str, flag: str = "--device") -> None:
    """A device string torch parses and this machine has: cpu, cuda, cuda:N (N < the GPU count), mps."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {device}: not a device (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: this torch has no CUDA device (torch.cuda.is_available() is False); "
                             f"use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: there are {torch.cuda.device_count()} CUDA devices")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag} {device}: no MPS device here; use {flag} cpu")
    elif dev.type != "cpu":
        raise ValueError(f"{flag} {device}: expected cpu, cuda, cuda:N or mps")


# ---------------------------------------------------------------------------------------------- files


def check_text_file(path, flag: str, chunk: int = 2**20) -> None:
    """The file exists and is UTF-8 text (no NUL byte), read through in chunks; ValueError naming flag and file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: file not found")
    dec, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if b"\0" in block:
                raise ValueError(f"{flag} {path}: a binary file (NUL byte at offset {offset + block.index(0)}); "
                                 f"expected UTF-8 text")
            try:
                dec.decode(block)
            except UnicodeDecodeError as e:
                raise ValueError(f"{flag} {path}: not UTF-8 text (byte 0x{block[e.start]:02x} at offset "
                                 f"{offset + e.start})") from None
            offset += len(block)
    try:
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {path}: not UTF-8 text (it ends inside a character)") from None


def _probe_dir(folder: Path, what: str) -> None:
    """Create and remove a temporary file in `folder`: the one test of writability that also holds for root
    and read-only file systems."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".qwha-probe")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ValueError(f"{what}: cannot write in {folder} ({e.strerror})") from None


def _existing_ancestor(path: Path, what: str) -> Path:
    parent = path.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what}: {parent} is a file, so no folder can be made below it")
    return parent


def check_output_dir(path, flag: str = "--out") -> None:
    """An output folder that exists and is writable, or can be created (nothing is created here)."""
    path, what = Path(path), _label(path, flag)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what}: exists and is not a folder (expected a folder to write the run into)")
    _probe_dir(_existing_ancestor(path, what), what)


def check_output_file(path, flag: str) -> None:
    """An output file path that is not a folder and whose folder is writable or can be created."""
    path, what = Path(path), _label(path, flag)
    if path.is_dir():
        raise ValueError(f"{what}: is a folder (expected a file path)")
    _probe_dir(_existing_ancestor(path.parent, what), what)


# ---------------------------------------------------------------------------------------------- the commands


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, its usage errors in one line (`error: ...`, exit status 2) like every other error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def setting(default=MISSING, help: str = "", resume: bool = False, choices: tuple | None = None):
    """A config dataclass field that is also a command-line flag: its help text, and whether --resume must find it
    unchanged (it fixes the result)."""
    return field(default=default, metadata={"help": help, "resume": resume, "choices": choices})


def given_flags(cls, argv=None, description: str = "", notes: dict[str, str] | None = None) -> dict:
    """The flags given on the command line, {field: value}: one flag per field of the dataclass `cls` (--group-size
    for group_size), typed by its annotation, its help from the field's metadata with the default (and `notes`,
    e.g. a preset's value) appended. Flags not given are absent, so cls(**given) takes the fields' defaults."""
    p = ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    for f in fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), str(f.type).split("|")[0].strip()
        said = [f"default {f.default}"] if f.default not in (None, MISSING) and kind != "bool" else []
        said += [notes[f.name]] if notes and f.name in notes else []
        help_ = f.metadata.get("help", "") + (f" ({'; '.join(said)})" if said else "")
        if kind == "bool":                       # off by default: --flag; on (or auto): --flag / --no-flag
            action = "store_true" if f.default is False else argparse.BooleanOptionalAction
            p.add_argument(flag, action=action, help=help_)
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(kind, str), required=f.default is MISSING,
                           choices=f.metadata.get("choices"), help=help_)
    return vars(p.parse_args(argv))


def _one_line(e: BaseException) -> str:
    msg = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return msg or type(e).__name__


def run_cli(main, argv=None) -> None:
    """Call main(argv) for a command line; bad input (ValueError, OSError, a safetensors or JSON error, out of
    memory) ends in one `error: ...` line and exit status 1, Ctrl-C in exit status 130. With QWHA_DEBUG=1 (or
    --debug) the exception propagates with its traceback."""
    args = sys.argv[1:] if argv is None else argv
    if os.environ.get("QWHA_DEBUG", "") not in ("", "0") or "--debug" in args:
        main(argv)
        return
    import torch
    from safetensors import SafetensorError
    clear = "\r\033[K" if sys.stderr.isatty() else ""      # over a progress line left unfinished
    try:
        main(argv)
    except Interrupted as e:
        print(f"{clear}interrupted: {_one_line(e)}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print(f"{clear}interrupted: nothing saved by this stage", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, SafetensorError, MemoryError, torch.cuda.OutOfMemoryError) as e:
        print(f"{clear}error: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:                                # a bug, not bad input: say how to see where
        print(f"{clear}error: {type(e).__name__}: {_one_line(e)} (QWHA_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
