"""QWHA end to end: load -> calibrate -> quantize (GPTQ) -> initialize the WHA adapters -> fine-tune -> save.

    python train.py --model assets/smollm2-135m --demo --bits 2 --out runs/demo     # the demo (GSM8K, ~10 min CPU)
    python train.py --model /path/to/llama --bits 4 --data alpaca.json --epochs 3 --batch-size 4 --grad-accum 16
    torchrun --nproc_per_node=8 train.py --model /path/to/llama ...   # data parallel, --batch-size per process

Stages, top to bottom (docs/method.md):
  1. validate every input (flags, model folder and shard headers, reused files against the model, data files, --out
     writable) - cheap, and nothing is written before it passes; the weights are checked finite as they are read;
  2-4. block by block (prepare.py): the block's weights read from the checkpoint, its calibration Hessians
     H = XᵀX/N from the calibration windows' activations (calib.py), GPTQ of its linears, optionally after MagR
     (gptq.py; the packed base is frozen), the QWHA initialization (AdaAlloc + refinement, qwha.py) of a sparse
     Walsh-Hadamard adapter ΔW = s·F T per linear; then its Hessians and full-precision weights are freed;
  5. training of the adapter values only: AdamW, warmup + cosine, gradient accumulation, clipping, bf16 autocast
     on CUDA, optional gradient checkpointing; loss on response tokens only; held-out loss every --eval-every steps;
     a non-finite loss, gradient norm or value stops it (nothing of that step saved); Ctrl-C or SIGTERM stops it
     after the step under way with a checkpoint (exit status 130);
  6. OUT/quantized.safetensors, OUT/adapter.safetensors, OUT/config.json, OUT/log.jsonl, OUT/checkpoint.pt
     (what --resume continues from, exactly; saved every --save-every steps and at each evaluation), with
     --merge a dense HF-style folder OUT/merged/, with --merge-requant DIR the merged weights re-quantized by GPTQ
     as a GPTQ checkpoint (after training, or later with the run's flags and --resume).
Every file is written to a temporary name and renamed, so a kill never leaves a half-written output.
Stages can be reused: --hessians FILE and --quantized FILE are loaded when the file exists, else computed and
written there.
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

import baselines
import calib
import checks
import data
import distributed
import gptq
import gptq_format
import model as model_lib
import prepare
import qwha
import wht
from checks import setting
from prepare import QUANT_KEYS, adapter_config, gptq_layer, init_workers, is_qwha, quant_settings  # noqa: F401

ASSETS = Path(os.environ.get("QWHA_ASSETS", Path(__file__).resolve().parent / "assets"))
DEMO_CALIB = ASSETS / "wikitext" / "train.txt"   # the calibration text of a run without --calib, when fetched

# --demo: the demo's settings (GSM8K on 2 CPU cores in ~10 min) for every flag not given on the command line.
# r = 8 is the paper's density (r = 64 on 3072-4096 wide layers, 3-4 % of the weights) on 576/1536 widths.
DEMO = {"data": str(ASSETS / "gsm8k" / "train.jsonl"), "rank": 8, "steps": 40, "batch_size": 2, "max_len": 256,
        "n_eval": 16}
DEMO_SUMMARY = "GSM8K from assets/gsm8k, " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO.items()
                                                       if k != "data")


@dataclass
class TrainConfig:
    """The settings of a run; every field is a flag (--group-size for group_size), its help in the metadata, and
    `resume=True` marks the settings that fix the result, which --resume must find unchanged (RESUME_KEYS)."""
    model: str = setting(help="HF-style folder: config.json, *.safetensors, tokenizer.json", resume=True)
    demo: bool = setting(False, f"the demo's settings for every flag not given ({DEMO_SUMMARY}); also what a run "
                                "without --data does")
    bits: int = setting(2, "base weight bits: 2, 3 or 4", resume=True)
    group_size: int = setting(64, "quantization group (consecutive input columns)", resume=True)
    rank: int = setting(64, "adapter budget rank·(m+n) values per linear", resume=True)
    temperature: float = setting(1.0, "AdaAlloc temperature t", resume=True)
    adapter: str = setting("wha", "wha (QWHA) | dca | dha | sparse (SHiRA) | lora (baselines.py, same budget)",
                           resume=True)
    transform_dims: int = setting(1, "spectral adapters: 1 (ΔW = F·T, as WHA) or 2 (T_mᵀ·F·T_n, as LoCA/SSH)",
                                  resume=True)
    select: str = setting("adaalloc", "support selection: adaalloc | magnitude | random | ssh | loca", resume=True)
    refine: bool = setting(True, "least-squares refinement of the selected values (eq. 9)", resume=True)
    qa_init: bool | None = setting(None, "quantization-aware values (LoRA: CLoQ) or zero (LoRA: A random, B 0); "
                                         "default on, off for loca", resume=True)
    swap_rounds: int = setting(qwha.SWAP_ROUNDS_DEFAULT, "QWHA: exchange-search rounds after refinement (0: the "
                                                         "paper's plain init)", resume=True)
    rule: str = setting(qwha.RULE_DEFAULT, "QWHA per-row selection: output (the paper's top-k) | greedy "
                                           "(qwha.select_greedy)", resume=True)
    greedy_steps: int = setting(qwha.GREEDY_STEPS, "QWHA: steps of --rule greedy", resume=True)
    init_workers: int = setting(0, "QWHA: layers initialized at once in threads (0: torch's threads on a CPU, 1 on "
                                   "a GPU)")
    magr: bool = setting(False, "MagR preprocessing before GPTQ", resume=True)
    act_order: bool = setting(True, "GPTQ: columns by decreasing diag H (static groups, no g_idx)", resume=True)
    gptq_clip: bool = setting(True, "GPTQ: per-group clipped-range grid search (gptq.fit_groups_clipped)",
                              resume=True)
    gptq_cd_passes: int = setting(2, "GPTQ: coordinate-descent passes over the codes after GPTQ (0: none)",
                                  resume=True)
    gptq_refit: bool = setting(True, "GPTQ: least-squares scale refit after each CD pass", resume=True)
    gptq_fp16_exact: bool = setting(False, "GPTQ: scales of 11 - bits significant bits, so that readers dequantizing "
                                           "in fp16 get the weights exactly (on with --export-gptq when this run "
                                           "quantizes)")
    data: str | None = setting(None, "JSON/JSONL (alpaca, gsm8k, prompt/response) or .txt; None: the demo preset "
                                     "(--demo)", resume=True)
    eval_data: str | None = setting(None, "held-out file; None: --n-eval examples split off --data", resume=True)
    n_eval: int = setting(64, "held-out examples", resume=True)
    calib: str | None = setting(None, "calibration text (train split); None: the demo Wikipedia train split",
                                resume=True)
    n_calib: int = setting(32, "calibration windows", resume=True)
    calib_len: int = setting(256, "tokens per calibration window", resume=True)
    steps: int | None = setting(None, "optimizer steps (0: init only), instead of --epochs; default 1 epoch",
                                resume=True)
    epochs: float | None = setting(None, "passes over the training examples (instead of --steps)", resume=True)
    lr: float = setting(5e-4, "AdamW peak learning rate (for scale s = 1; see qwha.py)", resume=True)
    warmup: float = setting(0.1, "fraction of the steps with linear warmup", resume=True)
    weight_decay: float = setting(0.0, "AdamW weight decay on the adapter values", resume=True)
    batch_size: int = setting(4, "examples per micro-batch", resume=True)
    grad_accum: int = setting(1, "micro-batches per optimizer step", resume=True)
    clip: float = setting(1.0, "gradient norm clipping (0: off)", resume=True)
    max_len: int = setting(512, "longest example in tokens, longer ones are dropped and counted", resume=True)
    eval_every: int | None = setting(None, "steps between held-out evaluations (default: 4 per run)")
    save_every: int = setting(50, "steps between checkpoints besides those at evaluations (0: only those)")
    out: str = setting("runs/qwha", "output folder")
    resume: bool = setting(False, "continue from OUT/checkpoint.pt")
    stop_after: int | None = setting(None, "stop (checkpointed) after this many steps of this run; --resume "
                                           "continues")
    quantized: str | None = setting(None, "reuse this base (our file or a GPTQ folder) if it exists, else write it "
                                          "there")
    export_gptq: str | None = setting(None, "also write the base as a GPTQ checkpoint folder, the adapter beside it")
    hessians: str | None = setting(None, "reuse these Hessians if the file exists, else write them there")
    merge: bool = setting(False, "also export OUT/merged/: dense Q + s·F·T in bf16, HF layout")
    merge_requant: str | None = setting(None, "also write Q + s·F·T re-quantized by GPTQ as a GPTQ checkpoint folder "
                                              "(see --merge-requant-hessians)")
    merge_requant_hessians: str = setting("adapted", "--merge-requant's Hessians: adapted (recomputed on the adapted "
                                                     "model) | calib (the --hessians file, the original model's)")
    block_inputs: str = setting("fp", "what feeds block i+1's calibration: fp (the paper) | quantized (GPTQ's "
                                      "sequential)", resume=True)
    offload_activations: bool = setting(False, "keep the calibration activations on the host, not the device")
    grad_checkpoint: bool = setting(False, "recompute block activations in the backward pass (less memory)")
    dense_base: str = setting("auto", "train on a dequantized copy of the frozen base: on, off, auto (= on CPU)")
    seed: int = setting(0, "calibration windows, held-out split, data order", resume=True)
    device: str = setting("cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda, cuda:1 ...")
    dtype: str = setting("float32", "dtype of the model's weights and activations (float32 | bfloat16)", resume=True)
    quiet: bool = setting(False, "no progress line on stderr")
    debug: bool = setting(False, "an error shows its traceback instead of one line (or QWHA_DEBUG=1)")
    plot: bool = setting(False, "write OUT/plots/*.png: loss curves, init error per layer, values per row")


# Settings that must not change between a run and its --resume (a config.json records them resolved).
RESUME_KEYS = tuple(f.name for f in fields(TrainConfig) if f.metadata.get("resume"))


def parse_args(argv=None) -> TrainConfig:
    """TrainConfig from the command line. With --demo, or without --data (a run without data is the demo, said in
    one line), DEMO gives every flag not on the command line its value."""
    notes = {k: f"--demo {v}" for k, v in DEMO.items() if k != "data"}
    given = checks.given_flags(TrainConfig, argv, __doc__.split("\n\n")[0], notes)
    if "data" not in given and not given.get("demo"):
        given["demo"] = True
        if Path(DEMO["data"]).is_file():         # else validate() says what to do, in one line
            print(f"no --data: using the demo preset (--demo): {DEMO_SUMMARY}", file=sys.stderr, flush=True)
    if given.get("demo"):
        preset = {k: v for k, v in DEMO.items() if not (k == "steps" and "epochs" in given)}
        given = {**preset, **given}              # flags given win
    return TrainConfig(**given)


# ---------------------------------------------------------------------------------------------- validation


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the defaults that depend on what is there: the calibration text (the demo's Wikipedia train split,
    when fetched) and the training length (1 epoch unless --steps or --epochs)."""
    if cfg.calib is None and DEMO_CALIB.exists():
        cfg.calib = str(DEMO_CALIB)
    if cfg.steps is None and cfg.epochs is None:
        cfg.epochs = 1.0
    if cfg.export_gptq and not cfg.resume and not (cfg.quantized and Path(cfg.quantized).exists()):
        cfg.gptq_fp16_exact = True      # the base is quantized here: fit it so fp16-dequantizing readers are exact
    return cfg


def block_shapes(mc: model_lib.ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the 7 linears of a block, by their short names."""
    return {k.rpartition(".")[2]: v for k, v in prepare.block_shapes(mc).items()}


def validate(cfg: TrainConfig) -> model_lib.ModelConfig:
    """Every check that needs no model weights, so a bad flag stops in a second, not after calibration: the
    flags, the headers of the model's and the reused files, the data files, the writability of the outputs.
    Nothing is written (OUT is not even created) before it passes."""
    folder = Path(cfg.model)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {folder}: no such folder (expected an HF-style model folder)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {folder}: no config.json in the folder")
    validate_numbers(cfg)
    checks.check_device(cfg.device)
    if cfg.bits not in gptq.SUPPORTED_BITS:
        raise ValueError(f"--bits {cfg.bits}: expected one of {gptq.SUPPORTED_BITS}")
    if cfg.init_workers < 0:
        raise ValueError(f"--init-workers {cfg.init_workers}: expected 0 (auto) or a number of threads")
    if cfg.swap_rounds < 0:
        raise ValueError(f"--swap-rounds {cfg.swap_rounds}: expected 0 (no exchange search) or more rounds")
    if cfg.gptq_cd_passes < 0:
        raise ValueError(f"--gptq-cd-passes {cfg.gptq_cd_passes}: expected 0 (plain GPTQ codes) or more passes")
    if cfg.rule not in ("output", "greedy"):
        raise ValueError(f"--rule {cfg.rule}: expected output (the paper's top-k) or greedy")
    if cfg.greedy_steps < 1:
        raise ValueError(f"--greedy-steps {cfg.greedy_steps}: expected 1 or more")
    mc = model_lib.ModelConfig.from_json(folder / "config.json")
    for name, (m, n) in block_shapes(mc).items():
        if cfg.group_size <= 0 or n % cfg.group_size:
            raise ValueError(f"--group-size {cfg.group_size} does not divide the input width {n} of {name}")
        try:
            if cfg.adapter == "wha":
                wht.factorize(n)                 # the adapter transforms along the input width
                if cfg.transform_dims == 2:
                    wht.factorize(m)             # ... and along the output width
        except ValueError as e:
            raise ValueError(f"{name} of {folder}: {e}") from None
        budget = min(cfg.rank * (m + n), m * n)  # init_qwha caps the budget at a dense F
        if cfg.rank < 1 or budget < 2 * m:
            raise ValueError(f"--rank {cfg.rank}: the budget rank·(m+n) = {budget} of {name} ({m}×{n}) is below "
                             f"2 values per output channel (2·m = {2 * m})")
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--model {folder}: no tokenizer.json in the folder (only fast tokenizers are read)")
    try:
        for f in sorted(set(model_lib.checkpoint_files(folder).values())):
            checks.safetensors_header(f)     # random bytes or a truncated file, named, before any weight is read
    except ValueError as e:
        raise ValueError(f"--model {e}") from None
    if cfg.data is None:
        raise ValueError("--data: a training file is needed (JSON/JSONL or .txt), or --demo for the demo's")
    if cfg.demo and cfg.data == DEMO["data"] and not Path(cfg.data).is_file():
        raise FileNotFoundError(f"--demo (what a run without --data does): no demo data at {cfg.data}: run `python "
                                f"data.py fetch-demo --out {ASSETS}`, or pass --data FILE for your own")
    for flag in ("data", "eval_data", "calib"):
        path = getattr(cfg, flag)
        if path is not None:
            checks.check_text_file(path, f"--{flag.replace('_', '-')}")   # exists, UTF-8, not binary
    if cfg.calib is None:
        raise ValueError(f"--calib: a calibration text file is needed (no demo text at {ASSETS / 'wikitext'})")
    for flag, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if path is not None and Path(path).suffix not in data.TEXT_SUFFIXES:
            try:
                data.detect_format(data.read_records(path), path)  # raises naming the file and the fields expected
            except ValueError as e:
                raise ValueError(f"{flag} {e}") from None
    if cfg.steps is not None and cfg.steps < 0 or cfg.epochs is not None and cfg.epochs <= 0:
        raise ValueError("--steps must be >= 0 (0: initialize and save, no training) and --epochs > 0")
    if cfg.steps is not None and cfg.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if min(cfg.batch_size, cfg.grad_accum, cfg.max_len, cfg.n_calib, cfg.calib_len) < 1:
        raise ValueError("--batch-size, --grad-accum, --max-len, --n-calib and --calib-len must be >= 1")
    adapter_config(cfg)                          # ValueError naming the flag for a bad adapter combination
    if cfg.dense_base not in ("auto", "on", "off"):
        raise ValueError(f"--dense-base {cfg.dense_base}: expected auto, on or off")
    if cfg.block_inputs not in ("fp", "quantized"):
        raise ValueError(f"--block-inputs {cfg.block_inputs}: expected fp (the paper) or quantized")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {cfg.dtype}: expected float32 or bfloat16")
    if cfg.resume and not (Path(cfg.out) / "checkpoint.pt").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {Path(cfg.out) / 'checkpoint.pt'}")
    checks.check_output_dir(cfg.out, "--out")
    if cfg.resume:
        validate_resume(cfg, mc)
    validate_stage_files(cfg, mc)
    for flag in ("export_gptq", "merge_requant"):
        if getattr(cfg, flag):
            validate_export_dir(cfg, flag)
    if cfg.merge_requant_hessians not in ("adapted", "calib"):
        raise ValueError(f"--merge-requant-hessians {cfg.merge_requant_hessians}: expected adapted or calib")
    if cfg.merge_requant and cfg.merge_requant_hessians == "calib" and not (
            cfg.hessians and (Path(cfg.hessians).is_file() or not cfg.resume)):
        raise ValueError("--merge-requant-hessians calib: needs --hessians FILE (an existing file, or one this run's "
                         "preparation writes)")
    model_lib.CheckpointReader(folder, mc)       # every shard's header against the config: names, shapes, dtypes, sizes
    return mc


def validate_numbers(cfg: TrainConfig) -> None:
    """The numeric flags: finite and in range (--lr nan or inf would train to NaN values)."""
    checks.check_number(cfg.lr, "--lr")
    checks.check_number(cfg.temperature, "--temperature")
    checks.check_number(cfg.weight_decay, "--weight-decay", low_ok=True)
    checks.check_number(cfg.warmup, "--warmup", low_ok=True, high=1.0)
    checks.check_number(cfg.clip, "--clip", low_ok=True)
    if cfg.epochs is not None:
        checks.check_number(cfg.epochs, "--epochs")
    for flag, value, low in (("--n-eval", cfg.n_eval, 0), ("--save-every", cfg.save_every, 0),
                             ("--eval-every", cfg.eval_every, 1), ("--stop-after", cfg.stop_after, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} {value}: expected {low} or more")


def validate_stage_files(cfg: TrainConfig, mc: model_lib.ModelConfig) -> None:
    """--hessians and --quantized: an existing file must be of this model (shapes from its header, names and
    settings from its metadata); a new one must be writable."""
    if cfg.hessians:
        if Path(cfg.hessians).exists() and not Path(cfg.hessians).is_dir():
            checks.check_hessians_file(cfg.hessians, mc, cfg.model)
        else:
            checks.check_output_file(cfg.hessians, "--hessians")
    if not cfg.quantized or cfg.resume:
        return
    if Path(cfg.quantized).is_dir():             # a GPTQ checkpoint folder: its quantization_config against the flags
        if not gptq_format.is_gptq_folder(cfg.quantized):
            raise ValueError(f"--quantized {cfg.quantized}: a folder without a config.json quantization_config "
                             f"(expected a GPTQ checkpoint folder or a quantized.safetensors file)")
        qc = gptq_format.quant_config(cfg.quantized)
        if qc["bits"] != cfg.bits or qc["group_size"] not in (cfg.group_size, -1):
            raise ValueError(f"--quantized {cfg.quantized} is {qc['bits']}-bit with group size {qc['group_size']} "
                             f"(its quantization_config): pass --bits {qc['bits']} --group-size {qc['group_size']}")
        return
    if not Path(cfg.quantized).exists():
        checks.check_output_file(cfg.quantized, "--quantized")
        return
    q = checks.check_quantized_file(cfg.quantized, mc, cfg.model)
    wrong = [n for n, li in q["layers"].items() if (li.get("bits"), li.get("group_size")) != (cfg.bits, cfg.group_size)]
    if wrong:
        li = q["layers"][wrong[0]]
        raise ValueError(f"--quantized {cfg.quantized}: {wrong[0]} is {li.get('bits')}-bit with group size "
                         f"{li.get('group_size')}, this run asks for --bits {cfg.bits} --group-size {cfg.group_size}")
    if not cfg.gptq_fp16_exact:                  # not asked for: the reused base records how its scales were fitted
        cfg.gptq_fp16_exact = bool(q["settings"].get("gptq_fp16_exact", False))
    for key in QUANT_KEYS:
        if key in q["settings"] and q["settings"][key] != getattr(cfg, key):
            raise ValueError(f"--quantized {cfg.quantized} was made with {key}={q['settings'][key]!r}, but this run "
                             f"has {key}={getattr(cfg, key)!r}: pass the same setting or another --quantized path")


def validate_export_dir(cfg: TrainConfig, flag: str) -> None:
    """--export-gptq / --merge-requant DIR: a folder that export_gptq may replace (new, empty or a GPTQ folder), not
    the folder of another input or output of the run, nor one that holds them."""
    path, opt = Path(getattr(cfg, flag)), "--" + flag.replace("_", "-")
    others = {"--out": cfg.out, "--model": cfg.model, "--quantized": cfg.quantized, "--hessians": cfg.hessians,
              "--data": cfg.data, "--eval-data": cfg.eval_data, "--calib": cfg.calib,
              "--merge": Path(cfg.out) / "merged" if cfg.merge else None,
              "--export-gptq": cfg.export_gptq if flag == "merge_requant" else None}
    here = path.resolve()
    for other_flag, other in others.items():
        if other is not None and (here == Path(other).resolve() or here in Path(other).resolve().parents):
            raise ValueError(f"{opt} {path}: is or holds {other_flag} {other} (the folder is replaced): "
                             f"give a folder of its own")
    if path.is_dir() and any(path.iterdir()) and not gptq_format.is_gptq_folder(path):
        raise ValueError(f"{opt} {path}: a folder with other files (it would be replaced): give a new or empty "
                         f"folder, or a GPTQ checkpoint folder to overwrite")
    checks.check_output_dir(path, opt)


def validate_resume(cfg: TrainConfig, mc: model_lib.ModelConfig) -> None:
    """--resume: OUT holds a readable checkpoint, config.json, and a quantized base and adapter of this model, and
    the settings that fix the result are those of the run being continued."""
    out = Path(cfg.out)
    read_checkpoint(out / "checkpoint.pt", mmap=True)
    path = out / "config.json"
    try:
        prev = json.loads(path.read_text(encoding="utf-8"))["train"]
        if not isinstance(prev, dict):
            raise TypeError
    except FileNotFoundError:
        raise FileNotFoundError(f"--resume: no {path} (the run's settings)") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"--resume: {path} is not a config.json written by train.py") from None
    changed = [k for k in RESUME_KEYS if prev.get(k) != getattr(cfg, k)]
    if changed:
        diffs = [f"--{k.replace('_', '-')} {prev.get(k)} -> {getattr(cfg, k)}" for k in changed]
        raise ValueError(f"--resume: settings differ from the run in {out}: " + ", ".join(diffs))
    cfg.gptq_fp16_exact = bool(prev.get("gptq_fp16_exact", False))   # how the continued run's base was fitted
    checks.check_quantized_file(out / "quantized.safetensors", mc, cfg.model, "--resume")
    checks.check_adapter_file(out / "adapter.safetensors", mc, cfg.model, "--resume")


def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """OUT/checkpoint.pt as train() saves it; ValueError naming the file when it is truncated or not one."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:   # a truncated zip (RuntimeError), other bytes (UnpicklingError, EOFError), ...
        detail = str(e).splitlines()[0].split(". ")[0][:100] if str(e) else "no detail"
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}: {detail}); start "
                         f"over without --resume or with another --out") from None
    need = {"step", "values", "optimizer", "scheduler", "rng"}
    if not isinstance(ck, dict) or not need <= set(ck) or not isinstance(ck["step"], int):
        raise ValueError(f"--resume: {path} is not a checkpoint written by train.py (expected the keys {sorted(need)})")
    return ck


def rank_warnings(cfg: TrainConfig, mc: model_lib.ModelConfig) -> list[str]:
    """One line when --rank exceeds what some linears can hold: a sparse adapter's budget rank·(m+n) is capped
    at m·n (a dense adapter, every weight trainable), LoRA's rank at min(m, n)."""
    if cfg.adapter == "lora":
        capped = [name for name, (m, n) in block_shapes(mc).items() if cfg.rank > min(m, n)]
        what = "LoRA rank capped at min(m, n), a full-rank update"
    else:
        capped = [name for name, (m, n) in block_shapes(mc).items() if cfg.rank * (m + n) >= m * n]
        what = "rank·(m+n) reaches m·n: capped to a dense adapter (every weight trainable, m·n values)"
    return [f"--rank {cfg.rank}: {what} for {', '.join(capped)}"] if capped else []


# ---------------------------------------------------------------------------------------------- stages
# The whole model at once: calibrate every block linear, quantize them all, initialize them all. The CLI prepares
# block by block instead (prepare.py), which gives the same result in a memory bounded by one block; these three
# are that path's reference (tests compare the two) and what a reader can follow on one screen.


def calibrate(model, tok, cfg: TrainConfig, log) -> dict[str, torch.Tensor]:
    """Hessians of every block linear's input, from seeded random windows of the calibration text."""
    if cfg.hessians and Path(cfg.hessians).exists():
        hessians, _ = calib.load_hessians(cfg.hessians)
        log(f"hessians: loaded {len(hessians)} from {cfg.hessians}")
        return hessians
    t0 = time.time()
    windows = prepare.calibration_windows(tok, cfg)                              # (n_calib, calib_len)
    batches = calib.window_batches(windows, prepare.CALIB_BATCH)
    hessians = calib.collect_hessians(model, batches, model_lib.linear_names(model), progress=not cfg.quiet,
                                      product_dtype=torch.float32)   # float64 running sums of float32 products
    log(f"hessians: {len(hessians)} layers from {cfg.n_calib}x{cfg.calib_len} tokens of {cfg.calib} "
        f"({time.time() - t0:.1f}s)")
    if cfg.hessians:
        data.atomic_write(Path(cfg.hessians), lambda p: calib.save_hessians(
            p, hessians, {"calib": cfg.calib, "n_calib": cfg.n_calib, "calib_len": cfg.calib_len, "seed": cfg.seed}))
    return hessians


def quantize(model, hessians, cfg: TrainConfig, log) -> dict[str, torch.Tensor]:
    """Replace every block linear by its GPTQ QuantLinear (or the ones in --quantized).

    Returns the original weights {name: W (m, n)} (on the CPU), which the initialization needs for E = W - Q."""
    names = model_lib.linear_names(model)
    loaded = None
    if cfg.quantized and Path(cfg.quantized).exists():
        loaded = prepare.load_quantized_checked(cfg.quantized, names, cfg, model.config)
    originals, t0 = {}, time.time()
    for i, name in enumerate(names):
        lin = model_lib.get_module(model, name)
        W = lin.weight.detach()                                                      # (m, n)
        if loaded is not None:
            ql = loaded[name].to(W.device)
        else:
            H = hessians[name].to(W.device)
            state = gptq_layer(W, H, cfg.bits, cfg.group_size, quant_settings(cfg), name=name)
            ql = gptq.QuantLinear.from_state(state, bias=lin.bias)
        originals[name] = W.cpu()
        model_lib.set_module(model, name, ql)
        _progress(cfg, f"gptq {i + 1}/{len(names)} {name}", t0, i + 1, len(names))
    _progress_end(cfg)
    log(f"quantized: {len(names)} linears to {cfg.bits} bits, group {cfg.group_size}"
        + (f" (loaded from {cfg.quantized})" if loaded else f", GPTQ{' + MagR' if cfg.magr else ''}")
        + f" ({time.time() - t0:.1f}s)")
    if cfg.quantized and loaded is None:
        prepare.save_quantized(model, Path(cfg.quantized), cfg)
    return originals


def init_adapters(model, hessians, originals, cfg: TrainConfig, log) -> dict:
    """Wrap every QuantLinear with a WHA adapter initialized by AdaAlloc + refinement (paper eqs. 5-9), or with
    the baseline adapter of --adapter/--transform-dims/--select/--refine/--qa-init (baselines.init_adapters).

    Returns the mean layer-output errors (bare quantization, after selection, after refinement) and the
    per-layer report."""
    t0 = time.time()
    rows = prepare.init_layers(model, hessians, originals, cfg)
    summary = prepare.init_summary(rows, time.time() - t0)
    log(f"{cfg.adapter} init: {len(rows)} adapters, rank-equivalent {cfg.rank}, mean layer output error "
        f"{summary['err_before']:.4g} -> {summary['err_refined']:.4g} ({summary['seconds']:.1f}s)")
    return summary


def save_adapter(model, path: Path, cfg: TrainConfig) -> None:
    meta = {"model": cfg.model, "rank": cfg.rank, "temperature": cfg.temperature, "bits": cfg.bits,
            "adapter": cfg.adapter, "transform_dims": cfg.transform_dims, "select": cfg.select,
            "swap_rounds": cfg.swap_rounds, "rule": cfg.rule, "greedy_steps": cfg.greedy_steps,
            "base": prepare.base_record(model, cfg)}
    # QWHA keeps qwha's file format; the other adapters use baselines' (whose loader also reads qwha's)
    save = qwha.save_adapters if is_qwha(cfg) else baselines.save_adapters
    data.atomic_write(path, lambda p: save(p, model, meta))
    info = gptq_format.adapter_config(model, {**meta, "group_size": cfg.group_size, "quantized": cfg.quantized})
    data.atomic_write(path.with_name("adapter_config.json"), lambda p: p.write_text(json.dumps(info, indent=1)))
    if cfg.export_gptq:                          # the adapter beside the GPTQ checkpoint
        Path(cfg.export_gptq).mkdir(parents=True, exist_ok=True)
        data.atomic_write(Path(cfg.export_gptq) / "adapter.safetensors", lambda p: save(p, model, meta))
        data.atomic_write(Path(cfg.export_gptq) / "adapter_config.json",
                          lambda p: p.write_text(json.dumps(info, indent=1)))


# ---------------------------------------------------------------------------------------------- training


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def loss_sum(model, batch, device, autocast: bool) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the response tokens of a batch, and their count."""
    input_ids, labels, mask = (t.to(device) for t in batch)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids, attention_mask=mask)                              # (B, T, V)
    target = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), reduction="sum",
                           ignore_index=data.IGNORE_INDEX)
    return loss, int((target != data.IGNORE_INDEX).sum())


@torch.no_grad()
def heldout_loss(model, examples, cfg: TrainConfig, pad_id: int) -> float:
    """Mean cross-entropy per response token over the held-out examples (under torchrun each rank takes a shard
    of every batch and the sums are all-reduced)."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    total, count = 0.0, 0
    size = cfg.batch_size * distributed.world()
    for b in range(0, len(order), size):
        idx = distributed.shard(order[b:b + size])
        if not idx:
            continue
        batch = data.collate_right([examples[i] for i in idx], pad_id)
        s, n = loss_sum(model, batch, cfg.device, cfg.device.startswith("cuda"))
        total, count = total + s.item(), count + n
    total, count = distributed.all_reduce_sum([total, count], cfg.device)
    model.train(was_training)
    return total / max(count, 1)


class Schedule:
    """Micro-batches of example indices, epoch after epoch; depends only on (seed, epoch), so resumable."""

    def __init__(self, lengths, batch_size, seed):
        self.lengths, self.batch_size, self.seed, self._epochs = lengths, batch_size, seed, {}
        self.per_epoch = len(self.epoch(0))

    def epoch(self, e):
        if e not in self._epochs:
            self._epochs = {e: data.length_sorted_batches(self.lengths, self.batch_size, self.seed, e)}
        return self._epochs[e]

    def __getitem__(self, k):
        return self.epoch(k // self.per_epoch)[k % self.per_epoch]


class StopRequest:
    """Ctrl-C (SIGINT), or SIGTERM (a scheduler's or `kill`'s stop) in a single process, during training: the
    step under way finishes, a checkpoint is saved and the run stops; a second signal interrupts at once.
    Under torchrun SIGTERM keeps its default (torchrun sends it to end the other ranks when one fails, and they
    could not finish a step alone). Installed from the main thread only (signal's rule)."""

    def __init__(self, sigterm: bool = True):
        self.requested, self._prev = False, {}
        self.signals = (signal.SIGINT, signal.SIGTERM) if sigterm else (signal.SIGINT,)

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._prev = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def uninstall(self) -> None:
        for s, prev in self._prev.items():
            signal.signal(s, prev)
        self._prev = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{what}: stopping after this step with a checkpoint (Ctrl-C again stops at once)",
              file=sys.stderr, flush=True)


def _diverged(step: int, total: int, what: str, ckpt: Path, saved: int | None) -> str:
    keep = (f"the last good checkpoint, {ckpt}, holds step {saved}" if saved else
            f"no checkpoint was saved yet; {ckpt.parent / 'adapter.safetensors'} holds the initialized adapter")
    return f"step {step}/{total}: {what}; training stopped and saved nothing of it ({keep}); try a lower --lr"


def train(model, train_ex, held_ex, cfg: TrainConfig, out: Path, pad_id: int, log, write_log,
          stop: StopRequest | None = None) -> dict:
    """The fine-tuning loop over the adapter values; resumes from OUT/checkpoint.pt with --resume. A non-finite
    loss, gradient norm or value stops it with a ValueError (nothing of that step saved); `stop.requested`
    (Ctrl-C) stops it after the step under way, checkpointed.

    Under torchrun the micro-batches are those of one process with batch N·b; each rank takes a shard of every one,
    the gradients are summed over the ranks and the loss divided by the global count of target tokens."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: the adapters were not attached")
    sched = Schedule([len(ids) for ids, _ in train_ex], cfg.batch_size * distributed.world(), cfg.seed)
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * sched.per_epoch / cfg.grad_accum))
    warmup = int(cfg.warmup * total)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    start = 0
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume:
        ck = read_checkpoint(ckpt_path)
        absent = [n for n in names if n not in ck["values"]]
        if absent:
            raise ValueError(f"--resume: {ckpt_path} has no values for {absent[0]} (a checkpoint of another run?)")
        checks.check_finite(((n, ck["values"][n]) for n in names), f"--resume: {ckpt_path}")
        with torch.no_grad():
            for n, p in zip(names, params):
                p.copy_(ck["values"][n])
        opt.load_state_dict(ck["optimizer"])
        lr_sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"]["torch"])
        if torch.cuda.is_available() and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        start = ck["step"]
        log(f"resumed from {ckpt_path} at step {start}/{total}")
    distributed.broadcast(params)                # every rank starts from rank 0's values

    def save_checkpoint(step):
        if not distributed.is_main():
            return
        state = {"step": step, "values": {n: p.detach().cpu() for n, p in zip(names, params)},
                 "optimizer": opt.state_dict(), "scheduler": lr_sched.state_dict(), "config": asdict(cfg),
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
        data.atomic_write(ckpt_path, lambda p: torch.save(state, p))
        saved[0] = step

    saved = [start if cfg.resume else None]         # the step the checkpoint on disk holds

    eval_every = cfg.eval_every or max(1, total // 4)
    autocast = cfg.device.startswith("cuda")
    model.train()
    if start == 0:
        ev = heldout_loss(model, held_ex, cfg, pad_id)
        write_log({"step": 0, "eval_loss": ev})
        log(f"held-out loss before training: {ev:.4f} ({len(held_ex)} examples)")
    end = total if cfg.stop_after is None else min(total, start + cfg.stop_after)
    t0, tokens_seen, last, done = time.time(), 0, {}, start
    for step in range(start, end):
        ts = time.time()
        micro = [distributed.shard(sched[step * cfg.grad_accum + j]) for j in range(cfg.grad_accum)]
        batches = [data.collate_right([train_ex[i] for i in idx], pad_id) for idx in micro if idx]
        n_target = sum(int((b[1][:, 1:] != data.IGNORE_INDEX).sum()) for b in batches)
        n_tok = sum(int(b[2].sum()) for b in batches)
        n_target, n_tok = (int(v) for v in distributed.all_reduce_sum([n_target, n_tok], cfg.device))
        loss_total = 0.0
        for batch in batches:
            s, _ = loss_sum(model, batch, cfg.device, autocast)
            (s / n_target).backward()
            loss_total += s.item()
        distributed.all_reduce_grads(params)     # clipping and the step below see the global gradient
        loss_total, = distributed.all_reduce_sum([loss_total], cfg.device)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf")).item()
        if not (math.isfinite(loss_total) and math.isfinite(gnorm)):
            raise ValueError(_diverged(step + 1, total, f"loss {loss_total / n_target:.4g}, gradient norm {gnorm:.4g}",
                                       ckpt_path, saved[0]))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise ValueError(_diverged(step + 1, total, "the update made adapter values NaN/Inf", ckpt_path, saved[0]))
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += n_tok
        dt = time.time() - ts
        last = {"step": step + 1, "loss": loss_total / n_target, "lr": lr, "grad_norm": gnorm, "tokens": n_tok,
                "tok_per_s": n_tok / dt, "step_s": dt, "mem_gb": _memory_gb(cfg.device)}
        write_log(last)
        done = step + 1
        _progress(cfg, f"step {step + 1}/{total} loss {last['loss']:.4f} lr {lr:.2e} "
                       f"{tokens_seen / (time.time() - t0):.0f} tok/s mem {last['mem_gb']:.1f}GB",
                  t0, done - start, end - start)
        if (step + 1) % eval_every == 0 or step + 1 == total:
            ev = heldout_loss(model, held_ex, cfg, pad_id)
            write_log({"step": step + 1, "eval_loss": ev})
            if step + 1 < end:
                save_checkpoint(step + 1)
        elif cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < end:
            save_checkpoint(step + 1)
        if stop is not None and stop.requested:
            break
    _progress_end(cfg)
    save_checkpoint(done)
    return {"steps_done": done, "total_steps": total, "last": last, "seconds": time.time() - t0,
            "finished": done == total, "interrupted": done < end}


def dense_bases(model) -> dict:
    """Give every adapter a frozen nn.Linear holding its QuantLinear's dequantized weight (the base is fixed,
    so this only saves unpacking it at every forward). Returns {adapter: QuantLinear} to put back."""
    restore = {}
    for mod in baselines.adapter_modules(model).values():
        q = mod.base
        if not hasattr(q, "dequantize"):
            continue
        lin = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.qweight.device)
        lin.weight = torch.nn.Parameter(q.dequantize(model.dtype), requires_grad=False)
        if q.bias is not None:
            lin.bias = torch.nn.Parameter(q.bias.detach().clone(), requires_grad=False)
        restore[mod], mod.base = q, lin
    return restore


# ---------------------------------------------------------------------------------------------- outputs


def merge_export(model, folder: Path, tok_src: Path) -> None:
    """Dense HF-style checkpoint of Q + s·F·T (bf16) that model.from_pretrained and other tools read."""
    for name in model_lib.linear_names(model):
        model_lib.set_module(model, name, model_lib.get_module(model, name).merged_linear())
    model.to(torch.bfloat16)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model_lib.save_pretrained(model, tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if (tok_src / f).exists():
            shutil.copy2(tok_src / f, tmp / f)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def export_base(model, cfg: TrainConfig, source, log) -> None:
    """--export-gptq DIR: the quantized base as a GPTQ checkpoint (the adapter files follow with save_adapter), with
    a note where its scales were not fitted fp16-exact (a base reused from `source`)."""
    dense = gptq_format.dense_dtype(model)
    gptq_format.export_gptq(cfg.export_gptq, model, cfg.model, dtype=dense)
    log(f"GPTQ checkpoint (gptq_v2, dense tensors in {str(dense).removeprefix('torch.')}): {cfg.export_gptq}")
    if gptq_format.fp16_inexact(gptq_format.quantized_linears(model)):
        log(f"note: --export-gptq: the reused base {source} was not fitted with --gptq-fp16-exact, so the export "
            "equals it exactly for readers that dequantize in fp32, while kernels that dequantize in fp16 "
            "(gptqmodel's torch kernel) round weights s·(q - z) to fp16 (2^-11 relative at most)")


def merge_requant_export(model, tok, held_ex, cfg: TrainConfig, pad_id: int, log) -> dict:
    """--merge-requant DIR: every adapter merged into its base and re-quantized by GPTQ with the run's settings
    (prepare.merge_requant) against the Hessians of --merge-requant-hessians, written as a GPTQ checkpoint; the
    held-out losses of the base alone, the base with its adapter and the re-quantized model, and the mean layer
    output errors to Q + ΔW. The model is left as it was."""
    t0 = time.time()
    if cfg.merge_requant_hessians == "calib":
        blocks, source = prepare.file_block_hessians(cfg.hessians, model.config.num_hidden_layers), cfg.hessians
    else:
        windows = prepare.calibration_windows(tok, cfg)
        blocks = prepare.adapted_block_hessians(model, windows, cfg.offload_activations)
        source = "recomputed on the adapted model"
    layers, rows = prepare.merge_requant(model, blocks, cfg.bits, cfg.group_size, prepare.requant_settings(cfg),
                                         cfg.quiet)
    adapters = baselines.adapter_modules(model)
    losses = {"base_adapter": heldout_loss(model, held_ex, cfg, pad_id)}
    for mod in adapters.values():
        mod.disable()
    losses["base"] = heldout_loss(model, held_ex, cfg, pad_id)
    for mod in adapters.values():
        mod.enable()
    try:
        for name, ql in layers.items():
            model_lib.set_module(model, name, ql)
        losses["merged_requant"] = heldout_loss(model, held_ex, cfg, pad_id)
        dense = gptq_format.dense_dtype(model)
        gptq_format.export_gptq(cfg.merge_requant, model, cfg.model, dtype=dense)
    finally:
        for name, mod in adapters.items():
            model_lib.set_module(model, name, mod)
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    res = {"folder": cfg.merge_requant, "hessians": source, "heldout_loss": losses, "err_q": mean("err_q"),
           "err_requant": mean("err_requant"), "seconds": time.time() - t0}
    log(f"merged and re-quantized GPTQ checkpoint: {cfg.merge_requant} (Hessians {source}); held-out loss: base "
        f"{losses['base']:.4f}, base + adapter {losses['base_adapter']:.4f}, merged and re-quantized "
        f"{losses['merged_requant']:.4f}; mean layer output error to Q + ΔW {res['err_q']:.4g} (Q) -> "
        f"{res['err_requant']:.4g} ({res['seconds']:.0f}s)")
    return res


def run(cfg: TrainConfig):
    """The whole pipeline; returns (what OUT/config.json records, the trained model)."""
    cfg = resolve_defaults(cfg)
    mc = validate(cfg)
    main_rank = distributed.is_main()            # under torchrun rank 0 alone prints, logs and writes outputs
    cfg.quiet = cfg.quiet or not main_rank
    if main_rank:
        for line in rank_warnings(cfg, mc):
            print(f"warning: {line}", file=sys.stderr, flush=True)
    if cfg.plot:                                 # the optional extra, checked before any work
        import plots
        plots.require_matplotlib()
    out = Path(cfg.out)
    t_start = time.time()
    log = (lambda s: None) if cfg.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    log_path = out / "log.jsonl"

    def write_log(rec):
        if main_rank:
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    if cfg.resume:
        n_prev, n_now = json.loads((out / "config.json").read_text()).get("world_size", 1), distributed.world()
        if n_prev != n_now:
            raise ValueError(f"--resume: the run in {out} had {n_prev} processes, this one has {n_now}: the global "
                             "batch (--batch-size × processes) must not change")
    dtype = getattr(torch, cfg.dtype)
    tok = model_lib.Tokenizer.from_pretrained(cfg.model)
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    examples, report = data.load_examples(cfg.data, tok, cfg.max_len)
    log(f"data: {report}")
    if cfg.eval_data:
        train_ex = examples
        held_ex, held_report = data.load_examples(cfg.eval_data, tok, cfg.max_len)
        log(f"held-out: {held_report}")
    else:
        train_ex, held_ex = data.split_examples(examples, cfg.n_eval, cfg.seed)
    record = {"train": asdict(cfg), "model_config": mc.to_dict(), "data": asdict(report),
              "n_train": len(train_ex), "n_heldout": len(held_ex), "world_size": distributed.world()}

    if not cfg.resume and not main_rank:
        distributed.wait_for_main()              # rank 0 prepares and saves the base and adapters; the others load
    if cfg.resume or not main_rank:
        model, _ = prepare.load_model(cfg.model, out / "quantized.safetensors", None, cfg.device, dtype)
        baselines.load_adapters(out / "adapter.safetensors", model)
        model.to(cfg.device)
        for mod in baselines.adapter_modules(model).values():
            for p in mod.parameters():
                p.requires_grad_(True)
            for p in mod.base.parameters():
                p.requires_grad_(False)
        record.update({k: v for k, v in json.loads((out / "config.json").read_text()).items()
                       if k in ("init", "timings")})
        if cfg.resume and main_rank:
            truncate_log(log_path, read_checkpoint(out / "checkpoint.pt", mmap=True)["step"])
            if cfg.export_gptq:                  # the base of the run being continued
                export_base(model, cfg, out / "quantized.safetensors", log)
    else:
        model, record["init"], stats = prepare.prepare(cfg, tok, log)
        model.to(cfg.device)
        out.mkdir(parents=True, exist_ok=True)        # the first write to OUT, once every input has passed
        log_path.unlink(missing_ok=True)
        prepare.save_quantized(model, out / "quantized.safetensors", cfg)
        if cfg.export_gptq:
            export_base(model, cfg, cfg.quantized, log)
        save_adapter(model, out / "adapter.safetensors", cfg)
        record["timings"] = {k: v for k, v in stats.items() if k.endswith("_s")}
        record["memory"] = {k: v for k, v in stats.items() if k.endswith("_gb")}
        data.atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(record, indent=1, default=str)))
        distributed.wait_for_main()

    model.gradient_checkpointing = cfg.grad_checkpoint
    dense = cfg.dense_base == "on" or (cfg.dense_base == "auto" and not cfg.device.startswith("cuda")
                                       and cfg.steps != 0)   # a dense copy only pays off over training steps
    restore = dense_bases(model) if dense else {}
    stop = StopRequest(sigterm=distributed.world() == 1).install()
    try:
        result = train(model, train_ex, held_ex, cfg, out, pad_id, log, write_log, stop)
    finally:
        stop.uninstall()
        for mod, base in restore.items():
            mod.base = base
    if not main_rank:
        return record, model
    record["train_result"] = result
    record["timings"]["train_s"] = result["seconds"]
    save_adapter(model, out / "adapter.safetensors", cfg)
    evals = [json.loads(line) for line in log_path.read_text().splitlines() if "eval_loss" in line]
    record["eval_loss"] = {"before": evals[0]["eval_loss"], "after": evals[-1]["eval_loss"]} if evals else None
    if cfg.merge_requant and result["finished"]:
        record["merge_requant"] = merge_requant_export(model, tok, held_ex, cfg, pad_id, log)
    if cfg.merge and result["finished"]:
        merge_export(model, out / "merged", Path(cfg.model))
        log(f"merged dense checkpoint: {out / 'merged'}")
    record["timings"]["total_s"] = time.time() - t_start
    data.atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(record, indent=1, default=str)))
    if record["eval_loss"]:
        log(f"held-out loss: {record['eval_loss']['before']:.4f} -> {record['eval_loss']['after']:.4f}")
    log(f"saved {out}/quantized.safetensors, adapter.safetensors, config.json, log.jsonl"
        + ("" if result["finished"] else f" (stopped at step {result['steps_done']}: continue with --resume)"))
    if cfg.plot:
        log("plots: " + ", ".join(str(p) for p in plots.run_plots(out)))
    if result.get("interrupted"):
        raise checks.Interrupted(f"stopped at step {result['steps_done']}: continue with --resume")
    return record, model


def truncate_log(path: Path, step: int) -> None:
    """Keep the records of log.jsonl up to `step` (the checkpoint's), so a resumed run logs each step once; a line
    cut by a kill is dropped."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(line + "\n")
    data.atomic_write(path, lambda p: p.write_text("".join(keep), encoding="utf-8"))


def _memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: kilobytes


def _progress(cfg: TrainConfig, msg: str, t0: float, i: int, n: int) -> None:
    """The progress line: msg, the seconds since t0 and the ETA of the n - i items left."""
    if not cfg.quiet:
        dt = time.time() - t0
        eta = f", ETA {dt / i * (n - i):.0f}s" if 0 < i < n else ""
        print(f"\r{msg}  ({dt:.0f}s{eta})\033[K", end="", file=sys.stderr, flush=True)


def _progress_end(cfg: TrainConfig) -> None:
    if not cfg.quiet:
        print(file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    with distributed.process_group(cfg.device) as device:   # under torchrun; a no-op in a single process
        cfg.device = device
        return run(cfg)[0]


if __name__ == "__main__":
    checks.run_cli(main)
