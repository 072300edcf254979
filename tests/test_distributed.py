"""train.py under torchrun: 2 gloo processes on the CPU with batch 2 take the steps of 1 process with batch 4."""
import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed
import train
from test_train import argv, tiny  # noqa: F401  (tiny: the module fixture of a tiny model folder and data)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120   # seconds: a hang at a collective fails the test instead of blocking the suite


def torchrun(script, args, nproc=2):
    """Run `script args` under `python -m torch.distributed.run` on the CPU; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _rank_main(r, n, port, args):
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train.main(args)


def launch(args, nproc=2):
    """train.main(args) in nproc forked processes with the environment torchrun gives its workers (no launcher, no
    imports: seconds faster than torchrun); returns their exit codes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(r, nproc, port, args)) for r in range(nproc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT)          # a hang shows as exit code None
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_shards_are_disjoint_and_cover_the_batch():
    for n in (1, 2, 3):
        for size in range(0, 8):
            batch = list(range(100, 100 + size))
            parts = [distributed.shard(batch, r, n) for r in range(n)]
            assert sorted(sum(parts, [])) == batch
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_two_processes_take_the_steps_of_one_with_the_doubled_batch(tiny, tmp_path, capfd):  # noqa: F811
    # 9 training examples in global batches of 4: the last micro-batch of an epoch leaves rank 1 without an example,
    # and the single held-out example leaves rank 1 without a held-out one
    common = ["--n-eval", "1", "--steps", "4", "--eval-every", "2"]
    ref = tmp_path / "one"
    train.main(argv(tiny, ref, *common, "--batch-size", "4"))
    out = tmp_path / "two"
    loud = [a for a in argv(tiny, out, *common, "--batch-size", "2") if a != "--quiet"]
    capfd.readouterr()
    assert launch([*loud, "--stop-after", "2"]) == [0, 0]
    first = capfd.readouterr().err
    assert launch([*loud, "--resume"]) == [0, 0]
    resumed = capfd.readouterr().err

    a, b = records(ref), records(out)
    steps = lambda rs: [r["step"] for r in rs if "loss" in r]  # noqa: E731
    assert steps(b) == steps(a) == [1, 2, 3, 4]                   # one record per step, from rank 0 only
    evals = lambda rs: [r["step"] for r in rs if "eval_loss" in r]  # noqa: E731
    assert evals(b) == evals(a) == [0, 2, 4]
    for key in ("loss", "grad_norm", "eval_loss"):
        x = torch.tensor([r[key] for r in a if key in r], dtype=torch.float64)
        y = torch.tensor([r[key] for r in b if key in r], dtype=torch.float64)
        assert torch.allclose(y, x, rtol=1e-5, atol=0), (key, x.tolist(), y.tolist())
    assert [r["tokens"] for r in b if "loss" in r] == [r["tokens"] for r in a if "loss" in r]   # global counts
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    # rank 0 alone prepared (once, in the first launch) and reported
    assert first.count("prepared ") == 1 and first.count("saved ") == 1, first
    assert resumed.count("resumed from") == 1 and "prepared " not in resumed, resumed
    from safetensors.torch import load_file
    va, vb = load_file(str(ref / "adapter.safetensors")), load_file(str(out / "adapter.safetensors"))
    assert va.keys() == vb.keys() and all(torch.allclose(va[k], vb[k], rtol=1e-3, atol=1e-5) for k in va)
    with pytest.raises(ValueError, match="had 2 processes, this one has 1"):   # the global batch would change
        train.main(argv(tiny, out, *common, "--batch-size", "2", "--resume"))


def fail(*args, **kwargs):
    raise RuntimeError(f"rank {os.environ['RANK']} fails on purpose")


FAIL = """
import os, sys
import train

def fail(*args, **kwargs):
    raise RuntimeError(f"rank {os.environ['RANK']} fails on purpose")

if os.environ["RANK"] == sys.argv[1]:
    setattr(train, sys.argv[2], fail)
train.main(sys.argv[3:])
"""


def test_a_failing_rank_ends_the_torchrun_job(tiny, tmp_path):  # noqa: F811
    """Rank 1 fails while rank 0 waits at the first collective of the training: torchrun stops rank 0 and the job
    ends non-zero with rank 1's error, no hang."""
    script = tmp_path / "fail.py"
    script.write_text(FAIL)
    proc = torchrun(script, ["1", "train", *argv(tiny, tmp_path / "run", "--steps", "2")])
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr, proc.stderr


@pytest.mark.parametrize("rank,stage", [("0", "prepare.prepare"), ("1", "train")])
def test_a_failing_rank_stops_the_others(tiny, tmp_path, capfd, monkeypatch, rank, stage):  # noqa: F811
    """Without a launcher to stop them, the ranks waiting for a failed one (at the preparation barrier, or at a
    collective of the training) end with an error too (gloo sees the peer gone), not a hang."""
    owner = train.prepare if stage.startswith("prepare.") else train
    name = stage.rpartition(".")[2]
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: (fail if os.environ["RANK"] == rank else real)(*a, **k))
    assert all(code not in (0, None) for code in launch(argv(tiny, tmp_path / "run", "--steps", "2")))
    assert f"rank {rank} fails on purpose" in capfd.readouterr().err
