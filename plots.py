"""Plots of a run's files as PNG: loss curves, per-layer init error, AdaAlloc's parameters per row.

    python plots.py runs/demo                   # writes runs/demo/plots/*.png (train.py --plot does the same)

The readers (loss_curves, init_errors, params_per_row) are plain functions over a run's log.jsonl, config.json
and adapter.safetensors; only the writers import matplotlib (the optional `plots` extra), inside themselves, so
nothing on the core's import path needs it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

MISSING = "plots need matplotlib: pip install 'qwha[plots]' (or pip install matplotlib)"


# ---------------------------------------------------------------------------------------------- readers


def loss_curves(log_path) -> dict[str, list[tuple[int, float]]]:
    """{"train": [(step, loss)], "eval": [(step, held-out loss)]} from a run's log.jsonl."""
    path = Path(log_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training log (expected a run's log.jsonl)")
    out = {"train": [], "eval": []}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out["train"].append((rec["step"], rec["loss"]))
        if "eval_loss" in rec:
            out["eval"].append((rec["step"], rec["eval_loss"]))
    return out


def init_errors(config_path) -> list[dict]:
    """Per layer {name, before, after}: the layer output error of bare quantization and after the adapter's init,
    from config.json's init.layers (in layer order)."""
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no run record (expected a run's config.json)")
    rows = (json.loads(path.read_text()).get("init") or {}).get("layers")
    if not rows:
        raise ValueError(f"{path}: no init.layers (the run's per-layer init report)")
    return [{"name": r.get("layer", str(i)), "before": r["err_before"], "after": r["err_refined"]}
            for i, r in enumerate(rows)]


def params_per_row(adapter_path, layers: list[str] | None = None) -> dict[str, torch.Tensor]:
    """{layer: (m,) count of adapter values in each output row} for the sparse adapters of an adapter file (LoRA
    layers have no support and are left out); `layers` picks some by name."""
    from safetensors import safe_open
    path = Path(adapter_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter file")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("layers", "{}"))
        keys = set(f.keys())
        names = layers if layers is not None else list(meta)
        out = {}
        for name in names:
            if name not in meta:
                raise ValueError(f"{path}: no adapter for layer {name}")
            if f"{name}.indices" not in keys:
                continue
            m, n = meta[name]["out_features"], meta[name]["in_features"]
            rows = f.get_tensor(f"{name}.indices").long() // n
            out[name] = torch.bincount(rows, minlength=m)
    return out


def pick_layers(names: list[str], count: int = 4) -> list[str]:
    """`count` layer names spread evenly over the list (first and last included)."""
    if len(names) <= count:
        return list(names)
    return [names[round(i * (len(names) - 1) / (count - 1))] for i in range(count)]


# ---------------------------------------------------------------------------------------------- writers


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or a ValueError with the one line that says how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError(MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def plot_loss_curves(runs: dict[str, Path], path) -> Path:
    """Training loss (thin) and held-out loss (markers) against the step, one colour per run folder."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, folder) in enumerate(runs.items()):
        c = loss_curves(Path(folder) / "log.jsonl")
        color = f"C{i % 10}"
        if c["train"]:
            ax.plot(*zip(*c["train"]), color=color, alpha=0.35, lw=1)
        if c["eval"]:
            ax.plot(*zip(*c["eval"]), color=color, marker="o", lw=2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss per response token")
    ax.set_title("training (thin) and held-out (markers) loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_init_errors(runs: dict[str, Path], path) -> Path:
    """Per-layer output error of bare quantization and after each run's init, against the layer index."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, folder) in enumerate(runs.items()):
        rows = init_errors(Path(folder) / "config.json")
        if i == 0:
            ax.plot([r["before"] for r in rows], color="k", lw=1, label="quantized, no adapter")
        ax.plot([r["after"] for r in rows], color=f"C{i % 10}", lw=1, label=f"{label} init")
    ax.set_yscale("log")
    ax.set_xlabel("linear layer (block order: q k v o gate up down)")
    ax.set_ylabel("layer output error ‖(E − ΔW)Rᵀ‖")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_params_per_row(adapter_path, path, count: int = 4) -> Path | None:
    """Adapter values per output row for `count` layers spread over the model; None for an adapter without a
    sparse support (LoRA)."""
    rows = params_per_row(adapter_path)
    if not rows:
        return None
    plt = require_matplotlib()
    names = pick_layers(list(rows), count)
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.6 * len(names) + 0.6), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        k = rows[name]
        ax.bar(range(len(k)), k.tolist(), width=1.0, color="C0")
        ax.set_title(f"{name}  (min {int(k.min())}, max {int(k.max())}, mean {k.float().mean():.1f})", fontsize=8)
        ax.set_ylabel("values", fontsize=8)
    axes[-1, 0].set_xlabel("output row")
    return _save(fig, Path(path))


def run_plots(out) -> list[Path]:
    """A run folder's plots into OUT/plots/: loss curves, init error per layer, values per row."""
    out = Path(out)
    plots = out / "plots"
    paths = [plot_loss_curves({out.name: out}, plots / "loss.png"),
             plot_init_errors({out.name: out}, plots / "init_error.png")]
    p = plot_params_per_row(out / "adapter.safetensors", plots / "params_per_row.png")
    return paths + ([p] if p else [])


def comparison_plots(runs: dict[str, Path], folder) -> list[Path]:
    """Several runs side by side (label -> run folder): loss curves, init errors; values per row of the first
    run with a sparse adapter."""
    folder = Path(folder)
    paths = [plot_loss_curves(runs, folder / "loss.png"), plot_init_errors(runs, folder / "init_error.png")]
    for run in runs.values():
        p = plot_params_per_row(Path(run) / "adapter.safetensors", folder / "params_per_row.png")
        if p:
            return paths + [p]
    return paths


if __name__ == "__main__":
    try:
        for p in run_plots(sys.argv[1] if len(sys.argv) > 1 else "runs/qwha"):
            print(p)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
