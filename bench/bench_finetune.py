"""The paper's fine-tuned comparison (its Tables 3-4) at small scale: every adapter at one budget, one data set.

    python bench/bench_finetune.py                                   # 7 methods, 2 bits, seeds 0 1, lr grid
    python bench/bench_finetune.py --methods qwha,cloq --bits 3 --steps 30 --seeds 0,1,2 --lrs 5e-4,2e-3

The demo model quantized once (GPTQ, --bits, group 64, train.py's settings) from calibration Hessians computed
once; both files live in the sweep folder and every run reuses them, so a run pays only its adapter init and its
training. Every method gets the budget r·(m+n) per linear (r = --rank), the same training split of the GSM8K
fine-tuning file, the same steps, batch and schedule (train.py's AdamW, warmup + cosine), and is trained at each
learning rate of --lrs on the first seed; the rate with the lowest loss on a validation split (--n-val problems
split off the fine-tuning file, never the test file) is then used for every seed. Each selected run is measured on
held-out data: GSM8K loss on --n-heldout test problems, exact-match accuracy on the first --n-gsm8k test problems
(greedy, KV-cached), Wikipedia perplexity (--ppl-windows windows of --ppl-len tokens of the test text).

Resumable: OUT/<method>-b<bits>-s<seed>-lr<lr>/ holds train.json after training (validation loss, step time,
trainable parameters; with config.json, log.jsonl, adapter.safetensors) and result.json after the evaluation;
either is skipped when present, so a killed sweep continues where it stopped.
Prints one JSON line per run, a table of mean ± spread (half the range) over seeds, and as its last line
{"bench": "finetune", "results": [...]} (also appended to runs/finetune.jsonl). --plots writes OUT/plots/*.png.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import baselines  # noqa: E402
import data  # noqa: E402
import eval as evallib  # noqa: E402
import model as model_lib  # noqa: E402
import prepare  # noqa: E402
import train  # noqa: E402
from jsonl import emit  # noqa: E402  (bench/jsonl.py: print + append to runs/)

# name -> train.py flags. The paper's rows: CLoQ is quantization-aware LoRA; SHiRA, LoCA and SSH start from zero
# values (its "QA Init." column is ✘ for them); QWHA's own ablation keeps AdaAlloc's support with zero values.
METHODS = {
    "qwha": [],
    "qwha-zero": ["--no-qa-init"],
    "cloq": ["--adapter", "lora"],
    "lora": ["--adapter", "lora", "--no-qa-init"],
    "shira": ["--adapter", "sparse", "--select", "random", "--no-qa-init"],
    "loca": ["--adapter", "dca", "--transform-dims", "2", "--select", "loca"],
    "ssh": ["--adapter", "dha", "--transform-dims", "2", "--select", "ssh", "--no-qa-init"],
}
SEEDLESS = ("qwha", "qwha-zero", "cloq")   # inits that draw nothing at random: computed once, reused by every seed
LABELS = {"qwha": "QWHA", "qwha-zero": "QWHA, zero values", "cloq": "CLoQ-LoRA", "lora": "LoRA (QLoRA init)",
          "shira": "SHiRA", "loca": "LoCA", "ssh": "SSH"}
RESULT_KEYS = ("method", "bits", "seed", "lr", "heldout_loss", "gsm8k_acc", "wiki_ppl", "step_s")


@dataclass
class FinetuneConfig:
    model: str = str(ROOT / "assets" / "smollm2-135m")
    train_file: str = str(ROOT / "assets" / "gsm8k" / "train.jsonl")   # fine-tuning split (validation cut from it)
    test_file: str = str(ROOT / "assets" / "gsm8k" / "test.jsonl")     # held-out problems
    wiki: str = str(ROOT / "assets" / "wikitext" / "test.txt")         # perplexity text
    calib: str = str(ROOT / "assets" / "wikitext" / "train.txt")       # calibration text
    methods: list = field(default_factory=lambda: list(METHODS))
    bits: int = 2
    group_size: int = 64
    rank: int = 8                   # budget r·(m+n) values per linear
    steps: int = 30
    seeds: list = field(default_factory=lambda: [0, 1])
    lrs: list = field(default_factory=lambda: [5e-4, 2e-3])
    batch_size: int = 2
    max_len: int = 256
    eval_every: int = 10            # validation loss every this many steps (the curves)
    n_val: int = 32                 # validation problems split off the fine-tuning file (chooses the lr)
    n_heldout: int = 64             # test problems for the held-out loss
    n_gsm8k: int = 32               # test problems for exact match
    max_new_tokens: int = 256
    ppl_windows: int = 16
    ppl_len: int = 256
    n_calib: int = 32
    calib_len: int = 256
    out: str = "runs/finetune"
    threads: int = 0                # torch intra-op threads (0: torch's default)
    plots: bool = False
    quiet: bool = False
    extra: list = field(default_factory=list)   # more train.py flags for every run (tests: tiny calibration)


def run_name(method: str, bits: int, seed: int, lr: float) -> str:
    return f"{method}-b{bits}-s{seed}-lr{lr:g}"


def split_files(fc: FinetuneConfig) -> tuple[Path, Path]:
    """OUT/data/{train,val}.jsonl: a fixed seeded split of the fine-tuning file (the same for every run)."""
    folder = Path(fc.out) / "data"
    tr, va = folder / "train.jsonl", folder / "val.jsonl"
    if not (tr.exists() and va.exists()):
        records = data.read_records(fc.train_file)
        if len(records) < 2 * fc.n_val:
            raise ValueError(f"{fc.train_file}: {len(records)} records, need at least 2·--n-val = {2 * fc.n_val}")
        test_q = {r.get("question") for r in data.read_records(fc.test_file)}
        overlap = [r["question"] for r in records if r.get("question") in test_q]
        if overlap:
            raise ValueError(f"{fc.train_file} shares {len(overlap)} questions with {fc.test_file}: "
                             "the held-out problems must not be trained on")
        order = list(range(len(records)))
        random.Random(1234).shuffle(order)
        val = set(order[:fc.n_val])
        folder.mkdir(parents=True, exist_ok=True)
        lines = lambda keep: "".join(json.dumps(records[i]) + "\n" for i in range(len(records)) if keep(i))  # noqa
        data.atomic_write(va, lambda p: p.write_text(lines(lambda i: i in val)))
        data.atomic_write(tr, lambda p: p.write_text(lines(lambda i: i not in val)))
    return tr, va


def shared_files(fc: FinetuneConfig) -> tuple[Path, Path]:
    out = Path(fc.out)
    return (out / f"hessians-{fc.n_calib}x{fc.calib_len}.safetensors",
            out / f"quantized-b{fc.bits}-g{fc.group_size}.safetensors")


def train_config(fc: FinetuneConfig, method: str, seed: int, lr: float) -> train.TrainConfig:
    """The run's TrainConfig, parsed from train.py flags exactly as the command line would be."""
    if method not in METHODS:
        raise ValueError(f"--methods: unknown method {method!r}, expected some of {', '.join(METHODS)}")
    tr, va = split_files(fc)
    hess, quant = shared_files(fc)
    argv = ["--model", fc.model, "--bits", str(fc.bits), "--group-size", str(fc.group_size), "--rank", str(fc.rank),
            "--data", str(tr), "--eval-data", str(va), "--calib", fc.calib, "--n-calib", str(fc.n_calib),
            "--calib-len", str(fc.calib_len), "--steps", str(fc.steps), "--batch-size", str(fc.batch_size),
            "--max-len", str(fc.max_len), "--eval-every", str(fc.eval_every), "--lr", repr(lr), "--seed", str(seed),
            "--hessians", str(hess), "--quantized", str(quant), "--device", "cpu",
            "--out", str(Path(fc.out) / run_name(method, fc.bits, seed, lr)), "--quiet", *fc.extra, *METHODS[method]]
    return train.resolve_defaults(train.parse_args(argv))


# ---------------------------------------------------------------------------------------------- training


def prepare_or_load(fc: FinetuneConfig, method: str, cfg, tok, log):
    """prepare.prepare's (model, init summary, stats); for a SEEDLESS method the adapter at its initial values is
    kept in OUT/init-<method>-b<bits>.safetensors and later seeds load it instead of computing it again."""
    path = Path(fc.out) / f"init-{method}-b{fc.bits}.safetensors"
    summary = path.with_suffix(".json")
    if method in SEEDLESS and path.exists() and summary.exists():
        model, _ = evallib.load_model(cfg.model, cfg.quantized, path, "cpu")
        for mod in baselines.adapter_modules(model).values():
            mod.requires_grad_(True)
            mod.base.requires_grad_(False)
        log(f"{method}: initial adapter loaded from {path}")
        return model, json.loads(summary.read_text()), {"init_loaded_from": str(path)}
    model, init, stats = prepare.prepare(cfg, tok, log)
    if method in SEEDLESS:
        train.save_adapter(model, path, cfg)
        data.write_json(summary, init)
    return model, init, stats


def train_runs(fc: FinetuneConfig, method: str, seed: int, lrs: list, log) -> None:
    """Train `method` at each of `lrs` (those without train.json) from ONE init: the init does not depend on the
    learning rate, so the adapter is prepared once and its initial values restored before each rate."""
    todo = [lr for lr in lrs if not (Path(train_config(fc, method, seed, lr).out) / "train.json").exists()]
    if not todo:
        return
    cfg = train_config(fc, method, seed, todo[0])
    mc = train.validate(cfg)
    tok = model_lib.Tokenizer.from_pretrained(cfg.model)
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    train_ex, report = data.load_examples(cfg.data, tok, cfg.max_len)
    val_ex, _ = data.load_examples(cfg.eval_data, tok, cfg.max_len)
    t0 = time.time()
    model, init, stats = prepare_or_load(fc, method, cfg, tok, log)
    prep_s = time.time() - t0
    packed = train.dense_bases(model)                   # a dense copy of the frozen base: faster CPU steps
    dense = {mod: mod.base for mod in packed}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    for lr in todo:
        cfg = train_config(fc, method, seed, lr)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
        log_path = out / "log.jsonl"
        log_path.unlink(missing_ok=True)

        def write_log(rec, log_path=log_path):
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")

        log(f"{run_name(method, fc.bits, seed, lr)}: training {cfg.steps} steps")
        res = train.train(model, train_ex, val_ex, cfg, out, pad_id, log, write_log)
        for mod, base in packed.items():               # the adapter file records the packed base it was made on
            mod.base = base
        train.save_adapter(model, out / "adapter.safetensors", cfg)
        for mod, base in dense.items():
            mod.base = base
        (out / "checkpoint.pt").unlink(missing_ok=True)  # the adapter file is what the evaluation reads
        recs = [json.loads(line) for line in log_path.read_text().splitlines()]
        steps = [r["step_s"] for r in recs if "step_s" in r]
        evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
        record = {"train": cfg.__dict__, "model_config": mc.to_dict(), "data": report.__dict__,
                  "init": init, "timings": {"prepare_s": prep_s, **stats, "train_s": res["seconds"]},
                  "train_result": res, "eval_loss": {"before": evals[0], "after": evals[-1]}}
        data.atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(record, indent=1, default=str)))
        summary = {"method": method, "bits": fc.bits, "seed": seed, "lr": lr, "val_loss": evals[-1],
                   "val_loss_init": evals[0], "step_s": statistics.median(steps) if steps else float("nan"),
                   "trainable_params": sum(p.numel() for p in params.values()), "init_s": init["seconds"],
                   "init_err_before": init["err_before"], "init_err_after": init["err_refined"],
                   "steps": fc.steps}
        data.write_json(out / "train.json", summary)


def select_lr(fc: FinetuneConfig, method: str) -> float:
    """The learning rate of --lrs with the lowest final validation loss on the first seed."""
    losses = {lr: json.loads((Path(train_config(fc, method, fc.seeds[0], lr).out) / "train.json").read_text())
              ["val_loss"] for lr in fc.lrs}
    return min(fc.lrs, key=lambda lr: (losses[lr] if losses[lr] == losses[lr] else float("inf"), lr))


# ---------------------------------------------------------------------------------------------- evaluation

_WIKI_IDS: dict = {}


def evaluate_run(fc: FinetuneConfig, method: str, seed: int, lr: float, log) -> dict:
    """result.json of a trained run: held-out GSM8K loss and exact match, Wikipedia perplexity (from its files)."""
    cfg = train_config(fc, method, seed, lr)
    out = Path(cfg.out)
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    t0 = time.time()
    model, tok = evallib.load_model(cfg.model, cfg.quantized, out / "adapter.safetensors", "cpu")
    train.dense_bases(model)
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    test_ex, _ = data.load_examples(fc.test_file, tok, fc.max_len)
    held = train.heldout_loss(model, test_ex[:fc.n_heldout], cfg, pad_id)
    records = data.read_records(fc.test_file)[:fc.n_gsm8k]
    gsm = evallib.gsm8k(model, tok, records, fc.max_new_tokens, batch_size=8)
    if fc.wiki not in _WIKI_IDS:
        _WIKI_IDS[fc.wiki] = data.text_token_stream(tok, data.read_text(fc.wiki))
    ppl = evallib.perplexity(model, _WIKI_IDS[fc.wiki], fc.ppl_len, fc.ppl_windows)
    tr = json.loads((out / "train.json").read_text())
    res = {"method": method, "bits": fc.bits, "seed": seed, "lr": lr, "heldout_loss": held,
           "gsm8k_acc": gsm["accuracy"], "wiki_ppl": ppl["ppl"], "step_s": tr["step_s"],
           "val_loss": tr["val_loss"], "trainable_params": tr["trainable_params"], "init_s": tr["init_s"],
           "init_err_before": tr["init_err_before"], "init_err_after": tr["init_err_after"], "steps": tr["steps"],
           "n_heldout": min(fc.n_heldout, len(test_ex)), "n_gsm8k": gsm["n"], "ppl_windows": ppl["windows"],
           "eval_s": time.time() - t0}
    data.write_json(out / "result.json", res)
    log(f"{run_name(method, fc.bits, seed, lr)}: held-out loss {held:.4f}, GSM8K {gsm['accuracy']:.3f}, "
        f"ppl {ppl['ppl']:.2f}")
    return res


# ---------------------------------------------------------------------------------------------- the sweep


def sweep(fc: FinetuneConfig, log=None) -> list[dict]:
    """Every method: the lr grid on the first seed, then the selected lr on every seed; one result per run."""
    log = log or ((lambda s: None) if fc.quiet else (lambda s: print(s, file=sys.stderr, flush=True)))
    for m in fc.methods:
        train_config(fc, m, fc.seeds[0], fc.lrs[0])  # unknown methods fail before any work
    results = []
    for m in fc.methods:
        train_runs(fc, m, fc.seeds[0], fc.lrs, log)
        lr = select_lr(fc, m)
        for seed in fc.seeds:
            train_runs(fc, m, seed, [lr], log)
            res = evaluate_run(fc, m, seed, lr, log)
            print(json.dumps(res), flush=True)
            results.append(res)
    return results


def spread(xs: list[float]) -> tuple[float, float]:
    """Mean and half the range over seeds."""
    return statistics.fmean(xs), (max(xs) - min(xs)) / 2


def format_table(results: list[dict]) -> str:
    cols = [("heldout_loss", "held-out loss", 4), ("gsm8k_acc", "GSM8K acc", 3), ("wiki_ppl", "wiki ppl", 2),
            ("val_loss", "val loss", 4), ("step_s", "s/step", 2)]
    head = "| method | bits | lr | seeds | params | " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * (5 + len(cols))]
    for m in dict.fromkeys(r["method"] for r in results):
        for bits in sorted({r["bits"] for r in results if r["method"] == m}):
            rs = [r for r in results if r["method"] == m and r["bits"] == bits]
            cells = []
            for key, _, d in cols:
                mu, sp = spread([r[key] for r in rs])
                cells.append(f"{mu:.{d}f} ± {sp:.{d}f}")
            lines.append(f"| {LABELS.get(m, m)} | {bits} | {rs[0]['lr']:g} | {len(rs)} | "
                         f"{rs[0]['trainable_params']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plots(fc: FinetuneConfig, results: list[dict]) -> list[Path]:
    import plots
    runs = {LABELS.get(r["method"], r["method"]): Path(fc.out) / run_name(r["method"], r["bits"], r["seed"], r["lr"])
            for r in results if r["seed"] == fc.seeds[0]}
    return plots.comparison_plots(runs, Path(fc.out) / "plots")


def parse_args(argv=None) -> FinetuneConfig:
    d = FinetuneConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--bits", type=int, default=d.bits, choices=[2, 3, 4])
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="comma-separated; the first chooses the lr")
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in d.lrs), help="comma-separated learning-rate grid")
    for name in ("model", "train_file", "test_file", "wiki", "calib", "out"):
        p.add_argument("--" + name.replace("_", "-"), default=getattr(d, name))
    for name in ("group_size", "rank", "batch_size", "max_len", "eval_every", "n_val", "n_heldout", "n_gsm8k",
                 "max_new_tokens", "ppl_windows", "ppl_len", "n_calib", "calib_len", "threads"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--plots", action="store_true", help="write OUT/plots/*.png (needs matplotlib)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--train-flags", default="", help="more train.py flags for every run, space-separated")
    a = vars(p.parse_args(argv))
    try:
        a["methods"] = [m for m in a["methods"].split(",") if m]
        a["seeds"] = [int(s) for s in a["seeds"].split(",") if s]
        a["lrs"] = [float(x) for x in a["lrs"].split(",") if x]
    except ValueError as e:
        raise ValueError(f"--seeds/--lrs: expected comma-separated numbers ({e})") from None
    if not a["methods"] or not a["seeds"] or not a["lrs"]:
        raise ValueError("--methods, --seeds and --lrs need at least one value each")
    a["extra"] = a.pop("train_flags").split()
    return FinetuneConfig(**a)


def main(argv=None) -> dict:
    fc = parse_args(argv)
    if fc.threads:
        torch.set_num_threads(fc.threads)
    if fc.plots:
        import plots
        plots.require_matplotlib()
    results = sweep(fc)
    print(format_table(results))
    if fc.plots:
        for path in write_plots(fc, results):
            print(f"plot: {path}", file=sys.stderr)
    summary = {"bench": "finetune", "results": [{k: r[k] for k in RESULT_KEYS} for r in results]}
    emit("finetune", summary)
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
