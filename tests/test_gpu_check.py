"""bench/gpu_check.sh: without CUDA it stops with one line; its commands (GPU sizes and --tiny) are accepted by the
benchmarks, and the --tiny ones run on a CPU and give a complete summary (run here in-process, from --dry-run)."""
import contextlib
import importlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench_init_gpu  # noqa: E402
import bench_step  # noqa: E402
import bench_wht  # noqa: E402
import gpu_summary  # noqa: E402


def script(*args, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def commands(*args) -> list[list[str]]:
    """The script's commands from --dry-run, each [script, args..., '>', log] (the Python dropped)."""
    res = script("--dry-run", *args)
    assert res.returncode == 0, res.stderr
    return [shlex.split(line)[1:] for line in res.stdout.strip().splitlines()]


def test_without_cuda_it_stops_with_one_line(tmp_path):
    res = script("--out", str(tmp_path / "out"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "no CUDA device" in res.stderr
    assert not (tmp_path / "out").exists()
    bad = script("--config", str(tmp_path / "absent.json"))
    assert bad.returncode == 2 and "absent.json" in bad.stderr


def test_gpu_commands_ask_for_the_sizes_at_scale():
    cmds = commands()
    assert [Path(c[0]).name for c in cmds] == ["bench_wht.py", "bench_step.py", "bench_init_gpu.py", "gpu_summary.py"]
    wht = bench_wht.parse(cmds[0][1:-2])
    assert wht.device == "cuda" and wht.kernel_only and wht.kernel_rows == 16384
    assert wht.kernel_widths == [4096, 14336, 3072, 11008, 13824] and wht.directions == ["forward", "inverse"]
    assert wht.kernel_dtypes == [torch.bfloat16, torch.float16, torch.float32]
    step = bench_step.parse(cmds[1][1:-2])
    assert (step.device, step.batches, step.seq_len, step.rank, step.blocks) == ("cuda", (1, 16), 512, 64, 1)
    assert step.packed() and step.use_autocast() and step.config.endswith("llama-3.1-8b.json")
    init = bench_init_gpu.parse(cmds[2][1:-2])
    assert (init.device, init.rank, init.bits, init.linears) == ("cuda", 64, 2, bench_init_gpu.LINEARS)
    assert init.detail and init.config.endswith("llama-3.1-8b.json")


def test_tiny_commands_run_on_a_cpu_and_summarize(tmp_path, capsys):
    cmds = commands("--tiny", "--out", str(tmp_path))
    mods = {"bench_wht.py": bench_wht, "bench_step.py": bench_step, "bench_init_gpu.py": bench_init_gpu}
    for cmd in cmds[:-1]:
        assert cmd[-2] == ">"
        with open(cmd[-1], "w") as f, contextlib.redirect_stdout(f):
            mods[Path(cmd[0]).name].main(cmd[1:-2])
    capsys.readouterr()
    assert importlib.import_module("gpu_summary").main(cmds[-1][1:]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    s = json.loads(lines[-1])
    assert s["bench"] == "gpu_check" and s["missing"] == []
    assert s["init"]["linears"] == 7 and s["init"]["per_block_s"] > 0 and "refine" in s["init"]["stage_share"]
    assert s["step"]["batch_1"]["qwha_over_lora"] > 0 and s["step"]["packed_base"]
    assert set(s["wht"]["table"]) == {"bfloat16", "float32"}
    assert all(set(d) == {"forward", "inverse"} for w in s["wht"]["table"].values() for d in w.values())
    table = "\n".join(lines[:-1])
    assert "init: seconds per block" in table and "qwha / lora" in table and "% of copy" in table
    (tmp_path / "step.log").unlink()                                   # a benchmark without a result is named
    assert gpu_summary.main(cmds[-1][1:]) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["missing"] == ["step"]
