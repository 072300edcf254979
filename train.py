"""QWHA end to end: load -> calibrate -> quantize (GPTQ) -> initialize the WHA adapters -> fine-tune -> save.

    python train.py --model assets/smollm2-135m --bits 2 --out runs/demo            # the demo (GSM8K, ~10 min CPU)
    python train.py --model /path/to/llama --bits 4 --data alpaca.json --epochs 3 --batch-size 4 --grad-accum 16

Stages, top to bottom (METHOD.md):
  1. validate every input (model folder and shard headers, bit width, group size against every width, data
     fields) - cheap;
  2-4. block by block (prepare.py): the block's weights read from the checkpoint, its calibration Hessians
     H = XᵀX/N from the calibration windows' activations (calib.py), GPTQ of its linears, optionally after MagR
     (gptq.py; the packed base is frozen), the QWHA initialization (AdaAlloc + refinement, qwha.py) of a sparse
     Walsh-Hadamard adapter ΔW = s·F T per linear; then its Hessians and full-precision weights are freed;
  5. training of the adapter values only: AdamW, warmup + cosine, gradient accumulation, clipping, bf16 autocast
     on CUDA, optional gradient checkpointing; loss on response tokens only; held-out loss every --eval-every steps;
  6. OUT/quantized.safetensors, OUT/adapter.safetensors, OUT/config.json, OUT/log.jsonl, OUT/checkpoint.pt
     (what --resume continues from, exactly) and with --merge a dense HF-style folder OUT/merged/.
Every file is written to a temporary name and renamed, so a kill never leaves a half-written output.
Stages can be reused: --hessians FILE and --quantized FILE are loaded when the file exists, else computed and
written there.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import resource
import shutil
import sys
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

import calib
import data
import gptq
import model as model_lib
import baselines
import prepare
import qwha
import wht
from eval import load_model
from prepare import (QUANT_KEYS, adapter_config, gptq_layer, init_workers, is_qwha,  # noqa: F401
                     quant_settings)

ASSETS = Path(os.environ.get("QWHA_ASSETS", Path(__file__).resolve().parent / "assets"))


@dataclass
class TrainConfig:
    model: str                          # HF-style folder: config.json, *.safetensors, tokenizer.json
    bits: int = 2                       # base weight bits: 2, 3 or 4
    group_size: int = 64                # quantization group (consecutive input columns)
    rank: int | None = None             # adapter budget rank·(m+n) values per linear (default 64, demo 8)
    temperature: float = 1.0            # AdaAlloc temperature t
    adapter: str = "wha"                # wha (QWHA) | dca | dha | sparse (SHiRA) | lora (baselines.py, same budget)
    transform_dims: int = 1             # spectral adapters: 1 (ΔW = F·T, as WHA) or 2 (T_mᵀ·F·T_n, as LoCA/SSH)
    select: str = "adaalloc"            # support selection: adaalloc | magnitude | random | ssh | loca
    refine: bool = True                 # least-squares refinement of the selected values (eq. 9)
    qa_init: bool | None = None         # quantization-aware values (LoRA: CLoQ) or zero (LoRA: A random, B 0); default on, off for loca
    swap_rounds: int = qwha.SWAP_ROUNDS_DEFAULT  # QWHA: exchange-search rounds after refinement (0: the paper's plain init)
    rule: str = qwha.RULE_DEFAULT       # QWHA per-row selection: output (the paper's top-k) | greedy (qwha.select_greedy)
    greedy_steps: int = qwha.GREEDY_STEPS  # QWHA: steps of --rule greedy
    init_workers: int = 0               # QWHA: layers initialized at once in threads (0: torch's threads on a CPU, 1 on a GPU)
    magr: bool = False                  # MagR preprocessing before GPTQ
    act_order: bool = True              # GPTQ: columns by decreasing diag H (static groups, no g_idx)
    gptq_clip: bool = True              # GPTQ: per-group clipped-range grid search (gptq.fit_groups_clipped)
    gptq_cd_passes: int = 2             # GPTQ: coordinate-descent passes over the codes after GPTQ (0: none)
    gptq_refit: bool = True             # GPTQ: least-squares scale refit after each CD pass
    data: str | None = None             # JSON/JSONL (alpaca, gsm8k, prompt/response) or .txt; None: demo GSM8K
    eval_data: str | None = None        # held-out file; None: --n-eval examples split off --data
    n_eval: int | None = None           # held-out examples (default 64; demo 16)
    calib: str | None = None            # calibration text (train split); None: the demo Wikipedia train split
    n_calib: int = 32                   # calibration windows
    calib_len: int = 256                # tokens per calibration window
    steps: int | None = None            # optimizer steps, 0: init only (or --epochs; default 1 epoch, demo 40)
    epochs: float | None = None         # passes over the training examples (instead of --steps)
    lr: float = 5e-4                    # AdamW peak learning rate (for scale s = 1; see qwha.py)
    warmup: float = 0.1                 # fraction of the steps with linear warmup
    weight_decay: float = 0.0           # AdamW weight decay on the adapter values
    batch_size: int | None = None       # examples per micro-batch (default 4; demo 2)
    grad_accum: int = 1                 # micro-batches per optimizer step
    clip: float = 1.0                   # gradient norm clipping (0: off)
    max_len: int | None = None          # longest example in tokens, longer ones are dropped and counted (512; demo 256)
    eval_every: int | None = None       # steps between held-out evaluations (default: 4 per run)
    out: str = "runs/qwha"              # output folder
    resume: bool = False                # continue from OUT/checkpoint.pt
    stop_after: int | None = None       # stop (checkpointed) after this many steps of this run; --resume continues
    quantized: str | None = None        # reuse this quantized base if the file exists, else write it there
    hessians: str | None = None         # reuse these Hessians if the file exists, else write them there
    merge: bool = False                 # also export OUT/merged/: dense Q + s·F·T in bf16, HF layout
    block_inputs: str = "fp"            # what feeds block i+1's calibration: fp (the paper) | quantized (GPTQ's sequential)
    offload_activations: bool = False   # keep the calibration activations on the host, not the device
    grad_checkpoint: bool = False       # recompute block activations in the backward pass (less memory)
    dense_base: str = "auto"            # train on a dequantized copy of the frozen base: on, off, auto (= on CPU)
    seed: int = 0                       # calibration windows, held-out split, data order
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cpu, cuda, cuda:1 ...
    dtype: str = "float32"              # dtype of the model's weights and activations (float32 | bfloat16)
    quiet: bool = False                 # no progress line on stderr
    plot: bool = False                  # write OUT/plots/*.png: loss curves, init error per layer, values per row


# Settings that must not change between a run and its --resume.
RESUME_KEYS = ("model", "bits", "group_size", "rank", "temperature", "adapter", "transform_dims", "select", "refine",
               "qa_init", "swap_rounds", "rule", "greedy_steps", "magr", "data", "eval_data", "n_eval", "calib",
               "n_calib", "calib_len", "steps", "epochs", "lr", "warmup", "weight_decay", "batch_size", "grad_accum",
               "clip", "max_len", "seed", "dtype", "act_order", "gptq_clip", "gptq_cd_passes", "gptq_refit",
               "block_inputs")


def parse_args(argv=None) -> TrainConfig:
    """Flags are TrainConfig's fields (--group-size for group_size), their help the fields' comments."""
    comments = dict(re.findall(r"^    (\w+): [^#\n]*#\s*(.*)$", inspect.getsource(TrainConfig), re.M))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(TrainConfig):
        flag, help_ = "--" + f.name.replace("_", "-"), comments.get(f.name, "")
        if f.default not in (None, MISSING) and not isinstance(f.default, bool) and "default" not in help_:
            help_ += f" (default {f.default})"
        if str(f.type).startswith("bool") or isinstance(f.default, bool):
            if f.default is False:
                p.add_argument(flag, action="store_true", help=help_)
            else:                                # default on (or auto): --flag / --no-flag
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        if f.name == "model":
            p.add_argument(flag, required=True, help=help_)
        else:
            p.add_argument(flag, type=kind, default=f.default, help=help_)
    return TrainConfig(**vars(p.parse_args(argv)))


# ---------------------------------------------------------------------------------------------- validation


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the settings left unset: the demo's (GSM8K on 2 CPU cores in ~10 min) when --data is absent."""
    demo = cfg.data is None
    if demo:
        cfg.data = str(ASSETS / "gsm8k" / "train.jsonl")
    if cfg.calib is None and (ASSETS / "wikitext" / "train.txt").exists():
        cfg.calib = str(ASSETS / "wikitext" / "train.txt")
    if cfg.steps is None and cfg.epochs is None:
        cfg.steps, cfg.epochs = (40, None) if demo else (None, 1.0)
    cfg.batch_size = cfg.batch_size or (2 if demo else 4)
    # demo: r = 8 is the paper's density (r = 64 on 3072-4096 wide layers, 3-4 % of the weights) on 576/1536 widths
    cfg.rank = cfg.rank if cfg.rank is not None else (8 if demo else 64)
    cfg.max_len = cfg.max_len or (256 if demo else 512)
    cfg.n_eval = cfg.n_eval if cfg.n_eval is not None else (16 if demo else 64)
    return cfg


def block_shapes(mc: model_lib.ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the 7 linears of a block."""
    D, I, hd = mc.hidden_size, mc.intermediate_size, mc.head_dim
    q, kv = mc.num_attention_heads * hd, mc.num_key_value_heads * hd
    return {"q_proj": (q, D), "k_proj": (kv, D), "v_proj": (kv, D), "o_proj": (D, q),
            "gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I)}


def validate(cfg: TrainConfig) -> model_lib.ModelConfig:
    """Every check that needs no model weights, so a bad flag stops in a second, not after calibration."""
    folder = Path(cfg.model)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {folder}: no such folder (expected an HF-style model folder)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {folder}: no config.json in the folder")
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
    for flag in ("data", "eval_data", "calib"):
        path = getattr(cfg, flag)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: file not found")
    if cfg.calib is None:
        raise ValueError(f"--calib: a calibration text file is needed (no demo text at {ASSETS / 'wikitext'})")
    for path in (cfg.data, cfg.eval_data):
        if path is not None and Path(path).suffix not in data.TEXT_SUFFIXES:
            data.detect_format(data.read_records(path), path)  # raises naming the file and the fields expected
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
    model_lib.CheckpointReader(folder, mc)       # every shard's header against the config: names, shapes, dtypes, sizes
    return mc


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
        loaded = prepare.load_quantized_checked(cfg.quantized, names, cfg)
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
            "swap_rounds": cfg.swap_rounds, "rule": cfg.rule, "greedy_steps": cfg.greedy_steps}
    # QWHA keeps qwha's file format; the other adapters use baselines' (whose loader also reads qwha's)
    save = qwha.save_adapters if is_qwha(cfg) else baselines.save_adapters
    data.atomic_write(path, lambda p: save(p, model, meta))


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
    """Mean cross-entropy per response token over the held-out examples."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    total, count = 0.0, 0
    for b in range(0, len(order), cfg.batch_size):
        batch = data.collate_right([examples[i] for i in order[b:b + cfg.batch_size]], pad_id)
        s, n = loss_sum(model, batch, cfg.device, cfg.device.startswith("cuda"))
        total, count = total + s.item(), count + n
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


def train(model, train_ex, held_ex, cfg: TrainConfig, out: Path, pad_id: int, log, write_log) -> dict:
    """The fine-tuning loop over the adapter values; resumes from OUT/checkpoint.pt with --resume."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: the adapters were not attached")
    sched = Schedule([len(ids) for ids, _ in train_ex], cfg.batch_size, cfg.seed)
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * sched.per_epoch / cfg.grad_accum))
    warmup = int(cfg.warmup * total)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    start = 0
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
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

    def save_checkpoint(step):
        state = {"step": step, "values": {n: p.detach().cpu() for n, p in zip(names, params)},
                 "optimizer": opt.state_dict(), "scheduler": lr_sched.state_dict(), "config": asdict(cfg),
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
        data.atomic_write(ckpt_path, lambda p: torch.save(state, p))

    eval_every = cfg.eval_every or max(1, total // 4)
    autocast = cfg.device.startswith("cuda")
    model.train()
    if start == 0:
        ev = heldout_loss(model, held_ex, cfg, pad_id)
        write_log({"step": 0, "eval_loss": ev})
        log(f"held-out loss before training: {ev:.4f} ({len(held_ex)} examples)")
    end = total if cfg.stop_after is None else min(total, start + cfg.stop_after)
    t0, tokens_seen, last = time.time(), 0, {}
    for step in range(start, end):
        ts = time.time()
        micro = [sched[step * cfg.grad_accum + j] for j in range(cfg.grad_accum)]
        batches = [data.collate_right([train_ex[i] for i in idx], pad_id) for idx in micro]
        n_target = sum(int((b[1][:, 1:] != data.IGNORE_INDEX).sum()) for b in batches)
        loss_total = 0.0
        for batch in batches:
            s, _ = loss_sum(model, batch, cfg.device, autocast)
            (s / n_target).backward()
            loss_total += s.item()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf")).item()
        lr = opt.param_groups[0]["lr"]
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        n_tok = sum(int(b[2].sum()) for b in batches)
        tokens_seen += n_tok
        dt = time.time() - ts
        last = {"step": step + 1, "loss": loss_total / n_target, "lr": lr, "grad_norm": gnorm, "tokens": n_tok,
                "tok_per_s": n_tok / dt, "step_s": dt, "mem_gb": _memory_gb(cfg.device)}
        write_log(last)
        eta = (time.time() - t0) / (step + 1 - start) * (end - step - 1)
        _progress(cfg, f"step {step + 1}/{total} loss {last['loss']:.4f} lr {lr:.2e} "
                       f"{tokens_seen / (time.time() - t0):.0f} tok/s mem {last['mem_gb']:.1f}GB ETA {eta:.0f}s",
                  t0, step + 1, total)
        if (step + 1) % eval_every == 0 or step + 1 == total:
            ev = heldout_loss(model, held_ex, cfg, pad_id)
            write_log({"step": step + 1, "eval_loss": ev})
            if step + 1 < end:
                save_checkpoint(step + 1)
    _progress_end(cfg)
    save_checkpoint(end)
    return {"steps_done": end, "total_steps": total, "last": last, "seconds": time.time() - t0,
            "finished": end == total}


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


def run(cfg: TrainConfig):
    """The whole pipeline; returns (what OUT/config.json records, the trained model)."""
    cfg = resolve_defaults(cfg)
    mc = validate(cfg)
    if cfg.plot:                                 # the optional extra, checked before any work
        import plots
        plots.require_matplotlib()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    log = (lambda s: None) if cfg.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    log_path = out / "log.jsonl"
    if not cfg.resume:
        log_path.unlink(missing_ok=True)

    def write_log(rec):
        with log_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    if cfg.resume:
        prev = json.loads((out / "config.json").read_text())["train"]
        changed = [k for k in RESUME_KEYS if prev.get(k) != getattr(cfg, k)]
        if changed:
            diffs = [f"--{k.replace('_', '-')} {prev.get(k)} -> {getattr(cfg, k)}" for k in changed]
            raise ValueError(f"--resume: settings differ from the run in {out}: " + ", ".join(diffs))
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
              "n_train": len(train_ex), "n_heldout": len(held_ex)}

    if cfg.resume:
        model, _ = load_model(cfg.model, out / "quantized.safetensors", None, cfg.device, dtype)
        baselines.load_adapters(out / "adapter.safetensors", model)
        model.to(cfg.device)
        for mod in baselines.adapter_modules(model).values():
            for p in mod.parameters():
                p.requires_grad_(True)
            for p in mod.base.parameters():
                p.requires_grad_(False)
        record.update({k: v for k, v in json.loads((out / "config.json").read_text()).items()
                       if k in ("init", "timings")})
    else:
        model, record["init"], stats = prepare.prepare(cfg, tok, log)
        model.to(cfg.device)
        prepare.save_quantized(model, out / "quantized.safetensors", cfg)
        save_adapter(model, out / "adapter.safetensors", cfg)
        record["timings"] = {k: v for k, v in stats.items() if k.endswith("_s")}
        record["memory"] = {k: v for k, v in stats.items() if k.endswith("_gb")}
        data.atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(record, indent=1, default=str)))

    model.gradient_checkpointing = cfg.grad_checkpoint
    dense = cfg.dense_base == "on" or (cfg.dense_base == "auto" and not cfg.device.startswith("cuda")
                                       and cfg.steps != 0)   # a dense copy only pays off over training steps
    restore = dense_bases(model) if dense else {}
    try:
        result = train(model, train_ex, held_ex, cfg, out, pad_id, log, write_log)
    finally:
        for mod, base in restore.items():
            mod.base = base
    record["train_result"] = result
    record["timings"]["train_s"] = result["seconds"]
    save_adapter(model, out / "adapter.safetensors", cfg)
    evals = [json.loads(line) for line in log_path.read_text().splitlines() if "eval_loss" in line]
    record["eval_loss"] = {"before": evals[0]["eval_loss"], "after": evals[-1]["eval_loss"]} if evals else None
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
    return record, model


def _memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: kilobytes


def _progress(cfg: TrainConfig, msg: str, t0: float, i: int, n: int) -> None:
    if not cfg.quiet:
        print(f"\r{msg}  ({time.time() - t0:.0f}s)\033[K", end="", file=sys.stderr, flush=True)


def _progress_end(cfg: TrainConfig) -> None:
    if not cfg.quiet:
        print(file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    return run(parse_args(argv))[0]


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
