"""bench/bench_finetune.py end to end on a tiny random model: two methods, a few steps, the JSON it prints; and the
plots' readers and writers on the runs it leaves."""
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import plots
import train
from conftest import ROOT
from test_train import CORPUS, GSM, make_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_finetune  # noqa: E402

TEST = [{"question": f"Ann has {a} pens and finds {b} more. How many pens?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
        for a, b in [(7, 5), (6, 6), (9, 4), (8, 7)]]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    make_tiny_model(root / "model")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEST))
    (root / "text.txt").write_text("\n\n".join(CORPUS * 6))
    argv = ["--model", str(root / "model"), "--train-file", str(root / "train.jsonl"),
            "--test-file", str(root / "test.jsonl"), "--wiki", str(root / "text.txt"),
            "--calib", str(root / "text.txt"),
            "--methods", "qwha,cloq", "--steps", "3", "--seeds", "0,1", "--lrs", "1e-2,1e-4", "--rank", "4",
            "--group-size", "32", "--max-len", "128", "--eval-every", "1", "--n-val", "2", "--n-heldout", "3",
            "--n-gsm8k", "2", "--max-new-tokens", "6", "--ppl-windows", "2", "--ppl-len", "32", "--n-calib", "4",
            "--calib-len", "32", "--out", str(root / "runs"), "--quiet"]
    return root, argv, run_bench(argv)


def run_bench(argv):
    """The bench's stdout lines."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        bench_finetune.main(argv)
    return buf.getvalue().strip().splitlines()


def test_sweep_prints_every_run_and_the_summary_last(sweep):
    root, argv, lines = sweep
    summary = json.loads(lines[-1])
    assert summary["bench"] == "finetune"
    res = summary["results"]
    assert [(r["method"], r["seed"]) for r in res] == [("qwha", 0), ("qwha", 1), ("cloq", 0), ("cloq", 1)]
    for r in res:
        assert set(r) == set(bench_finetune.RESULT_KEYS) and r["bits"] == 2
        assert r["heldout_loss"] > 0 and 0 <= r["gsm8k_acc"] <= 1 and r["wiki_ppl"] > 1 and r["step_s"] > 0
    runs = root / "runs"
    for m in ("qwha", "cloq"):
        # the lr grid ran on the first seed only, and the chosen lr is the one of the lowest validation loss
        grid = {lr: json.loads((runs / f"{m}-b2-s0-lr{lr}" / "train.json").read_text()) for lr in ("0.01", "0.0001")}
        best = min(grid, key=lambda lr: grid[lr]["val_loss"])
        assert {r["lr"] for r in res if r["method"] == m} == {float(best)}
        assert not (runs / f"{m}-b2-s1-lr{'0.01' if best == '0.0001' else '0.0001'}").exists()
        # one init per method and seed: both grid runs started from the same validation loss
        assert grid["0.01"]["val_loss_init"] == grid["0.0001"]["val_loss_init"]
        # a seedless init is computed once and loaded by the next seed: the same starting validation loss
        assert (runs / f"init-{m}-b2.safetensors").exists()
        seed1 = json.loads((runs / f"{m}-b2-s1-lr{best}" / "train.json").read_text())
        assert seed1["val_loss_init"] == pytest.approx(grid[best]["val_loss_init"], rel=1e-6)
    # the same budget: LoRA's r·(m+n) equals the sparse adapters' values
    params = {m: json.loads((runs / f"{m}-b2-s0-lr0.01" / "train.json").read_text())["trainable_params"]
              for m in ("qwha", "cloq")}
    assert params["qwha"] == params["cloq"] > 0
    # per-run JSON lines carry more than the summary (parameters, validation loss)
    per_run = [json.loads(line) for line in lines if line.startswith('{"method"')]
    assert len(per_run) == 4 and all(r["trainable_params"] == params["qwha"] for r in per_run)
    # the table names both methods
    assert any("QWHA" in line for line in lines) and any("CLoQ" in line for line in lines)

    # resumable: a second call trains and evaluates nothing (a result.json is kept as it is) and prints the same
    stamp = {p: p.stat().st_mtime_ns for p in runs.glob("*/result.json")}
    again = json.loads(run_bench(argv)[-1])
    assert again["results"] == res
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/result.json")} == stamp

    # a killed sweep continues: a removed result is measured again, the same (evaluation is deterministic)
    victim = runs / f"cloq-b2-s1-lr{res[-1]['lr']:g}" / "result.json"
    victim.unlink()
    third = json.loads(run_bench(argv)[-1])
    assert victim.exists() and third["results"] == res


def test_unknown_method_is_one_clear_error(sweep):
    _, argv, _ = sweep
    with pytest.raises(ValueError, match="--methods: unknown method 'dora'"):
        bench_finetune.main(argv[:argv.index("--methods") + 1] + ["dora"] + argv[argv.index("--methods") + 2:])


def test_plot_readers(sweep):
    root = sweep[0]
    run = next((root / "runs").glob("qwha-b2-s0-*"))
    curves = plots.loss_curves(run / "log.jsonl")
    assert [s for s, _ in curves["train"]] == [1, 2, 3] and [s for s, _ in curves["eval"]] == [0, 1, 2, 3]
    errs = plots.init_errors(run / "config.json")
    assert len(errs) == 2 * 7 and all(e["after"] < e["before"] for e in errs)   # QWHA's init lowers every layer
    rows = plots.params_per_row(run / "adapter.safetensors")
    cfg = json.loads((run / "config.json").read_text())
    for layer in cfg["init"]["layers"]:
        k = rows[layer["layer"]]
        assert k.shape == (layer["shape"][0],) and int(k.sum()) == layer["budget"]
        assert int(k.min()) == layer["k_min"] and int(k.max()) == layer["k_max"]
    lora = next((root / "runs").glob("cloq-b2-s0-*"))
    assert plots.params_per_row(lora / "adapter.safetensors") == {}    # LoRA has no sparse support
    assert plots.pick_layers(list("abcdefg"), 3) == ["a", "d", "g"]
    with pytest.raises(FileNotFoundError, match="log.jsonl"):
        plots.loss_curves(root / "nowhere" / "log.jsonl")


def test_plot_writers_make_pngs(sweep, tmp_path):
    root = sweep[0]
    runs = {"QWHA": next((root / "runs").glob("qwha-b2-s0-*")), "CLoQ": next((root / "runs").glob("cloq-b2-s0-*"))}
    paths = plots.comparison_plots(runs, tmp_path / "cmp") + plots.run_plots(runs["QWHA"])
    assert len(paths) == 6
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
    assert plots.plot_params_per_row(runs["CLoQ"] / "adapter.safetensors", tmp_path / "x.png") is None


def test_train_plot_writes_the_runs_pngs(sweep, tmp_path):
    root = sweep[0]
    out = tmp_path / "run"
    train.main(["--model", str(root / "model"), "--bits", "2", "--group-size", "32", "--rank", "4",
                "--data", str(root / "train.jsonl"), "--calib", str(root / "text.txt"), "--n-calib", "4",
                "--calib-len", "32", "--n-eval", "2", "--batch-size", "2", "--max-len", "128", "--steps", "2",
                "--out", str(out), "--quiet", "--device", "cpu", "--plot"])
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == ["init_error.png", "loss.png",
                                                                     "params_per_row.png"]


def test_matplotlib_stays_off_the_import_path():
    code = "import sys, train, eval, baselines, prepare, plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
