"""Bad inputs to train.py and eval.py end in one line naming the flag, file or tensor at fault, before any heavy
work and before anything is written to --out; training stops cleanly on NaN and on Ctrl-C."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import calib
import checks
import eval as ev
import model as model_lib
import train
from conftest import ROOT
from test_train import CORPUS, GSM, argv, make_tiny_model, make_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model, its data, and the files of two runs: 2-bit (hessians, quantized, adapter) and 4-bit."""
    root = tmp_path_factory.mktemp("bad")
    make_tiny_model(root / "model")
    (root / "gsm.jsonl").write_text("\n".join(json.dumps(r) for r in GSM) + "\n")
    (root / "calib.txt").write_text("\n\n".join(CORPUS * 4))
    train.main(argv(root, root / "run2", "--steps", "0", "--hessians", str(root / "h.safetensors"),
                    "--quantized", str(root / "q2.safetensors")))
    train.main(argv(root, root / "run4", "--steps", "0", "--bits", "4"))
    return root


@pytest.fixture(scope="module")
def other(tiny):
    """Another model (MLP width 192 instead of 128): its Hessians and quantized base."""
    folder = tiny / "other"
    folder.mkdir()
    vocab = make_tokenizer(folder)
    cfg = model_lib.ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    m = model_lib.init_weights(model_lib.LlamaForCausalLM(cfg), torch.Generator().manual_seed(3))
    model_lib.save_pretrained(m, folder)
    train.main(["--model", str(folder)] + argv(tiny, tiny / "run_other", "--steps", "0", "--hessians",
                                               str(tiny / "h_other.safetensors"), "--quantized",
                                               str(tiny / "q_other.safetensors"))[2:])
    return folder


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Loading weights or calibrating fails the test: the inputs must be refused before."""
    def boom(*a, **k):
        raise AssertionError("heavy work started before the inputs were validated")
    monkeypatch.setattr(model_lib, "from_pretrained", boom)
    monkeypatch.setattr(calib, "collect_hessians", boom)
    monkeypatch.setattr(train.prepare, "prepare", boom)


def refused(call, match, exc=ValueError):
    """call() raises exc whose message is one line matching `match`."""
    with pytest.raises(exc, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def garbage(path, n=4096, seed=0):
    path.write_bytes(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed),
                                   dtype=torch.uint8).numpy().tobytes())
    return path


def copy_model(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def cli(script, *args, env=None, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(proc, *names):
    """The process failed with exit 1 and a single stderr line `error: ...` naming every one of `names`."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert all(str(n) in lines[0] for n in names), lines[0]


# ------------------------------------------------------------------------------------------ train.py: flags


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"), ("--lr", "-1e-3"),
                                         ("--temperature", "nan"), ("--temperature", "-inf"), ("--temperature", "0"),
                                         ("--warmup", "2"), ("--weight-decay", "nan"), ("--epochs", "inf")])
def test_numbers_are_checked_first(tiny, tmp_path, no_heavy_work, flag, value):
    out = tmp_path / "out"
    refused(lambda: train.main(argv(tiny, out, f"{flag}={value}")),
            rf"^{flag} {re.escape(f'{float(value):g}')}: expected a finite number")
    assert not out.exists()


def test_device_that_is_not_here(tiny, tmp_path, no_heavy_work):
    dev = "cuda:99" if torch.cuda.is_available() else "cuda"
    out = tmp_path / "out"
    refused(lambda: train.main(argv(tiny, out, "--device", dev)), rf"^--device {dev}: ")
    refused(lambda: train.main(argv(tiny, out, "--device", "tpu9")), r"^--device tpu9: ")
    refused(lambda: ev.main(["--model", str(tiny / "model"), "--task", "ppl", "--data", str(tiny / "calib.txt"),
                             "--device", dev]), rf"^--device {dev}: ")
    assert not out.exists()


def test_out_that_cannot_be_written(tiny, tmp_path, no_heavy_work):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    refused(lambda: train.main(argv(tiny, afile)), r"^--out .*afile: exists and is not a folder")
    refused(lambda: train.main(argv(tiny, afile / "run")), r"^--out .*afile is a file")
    refused(lambda: train.main(argv(tiny, "/proc/qwha-run")), r"^--out /proc/qwha-run: cannot write in /proc")
    refused(lambda: train.main(argv(tiny, tmp_path / "o", "--quantized", str(afile / "q.safetensors"))),
            r"^--quantized .*afile is a file")
    assert afile.read_text() == "keep me" and not (tmp_path / "o").exists()


def test_rank_beyond_dense_is_said_in_one_line(tiny, tmp_path, no_heavy_work, capsys):
    with pytest.raises(AssertionError, match="heavy work"):        # validation passed: the rank is legal
        train.main(argv(tiny, tmp_path / "o", "--rank", "100000"))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and "--rank 100000" in lines[0] and "dense" in lines[0] and "down_proj" in lines[0]
    cfg = train.resolve_defaults(train.parse_args(argv(tiny, tmp_path / "o", "--rank", "4")))
    assert train.rank_warnings(cfg, model_lib.ModelConfig.from_json(tiny / "model" / "config.json")) == []


# ------------------------------------------------------------------------------------------ train.py: files


def test_model_folder_with_bad_files(tiny, tmp_path, no_heavy_work):
    out = tmp_path / "out"
    run = lambda folder: train.main(["--model", str(folder)] + argv(tiny, out)[2:])  # noqa: E731
    m = copy_model(tiny / "model", tmp_path / "m1")
    (m / "config.json").write_text("[1, 2]")
    refused(lambda: run(m), r"m1/config\.json: expected a JSON object")
    (m / "config.json").write_text('{"model_type": "llama",')
    refused(lambda: run(m), r"m1/config\.json: not valid JSON")
    m = copy_model(tiny / "model", tmp_path / "m2")
    (m / "config.json").write_text(json.dumps({**json.loads((m / "config.json").read_text()), "hidden_size": "x"}))
    refused(lambda: run(m), r"m2/config\.json: ")
    m = copy_model(tiny / "model", tmp_path / "m3")
    garbage(m / "model.safetensors")
    refused(lambda: run(m), r"^--model .*m3/model\.safetensors: not a safetensors file")
    m = copy_model(tiny / "model", tmp_path / "m4")
    raw = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(raw[:len(raw) // 2])
    refused(lambda: run(m), r"^--model .*m4/model\.safetensors: truncated")
    assert not out.exists()


def test_weights_with_nan_are_refused_before_calibration(tiny, tmp_path, monkeypatch):
    m = copy_model(tiny / "model", tmp_path / "nan")
    net = model_lib.from_pretrained(m)
    with torch.no_grad():
        net.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model_lib.save_pretrained(net, m)
    monkeypatch.setattr(calib, "collect_hessians", lambda *a, **k: pytest.fail("calibration started"))
    out = tmp_path / "out"
    refused(lambda: train.main(["--model", str(m)] + argv(tiny, out)[2:]),
            r"^--model .*: tensor model\.layers\.1\.mlp\.up_proj\.weight holds 1 NaN/Inf value$")
    assert not out.exists()


def test_binary_and_short_text_files(tiny, tmp_path, no_heavy_work):
    out = tmp_path / "out"
    binary = garbage(tmp_path / "blob.jsonl")
    refused(lambda: train.main(argv(tiny, out, "--data", str(binary))), r"^--data .*blob\.jsonl: ")
    refused(lambda: train.main(argv(tiny, out, "--calib", str(binary))), r"^--calib .*blob\.jsonl: ")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    refused(lambda: train.main(argv(tiny, out, "--calib", str(latin))), r"^--calib .*latin\.txt: not UTF-8 text")
    assert not out.exists()


def test_too_little_calibration_text_names_the_flags(tiny, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Tom has 3 apples.")
    refused(lambda: train.main(argv(tiny, tmp_path / "out", "--calib", str(short))),
            r"^--calib .*short\.txt: \d+ tokens, fewer than one window of --calib-len 32 \(--n-calib 4")
    assert not (tmp_path / "out").exists()


def test_hessians_and_quantized_files_of_another_model_or_garbage(tiny, other, tmp_path, no_heavy_work):
    out = tmp_path / "out"
    refused(lambda: train.main(argv(tiny, out, "--hessians", str(tiny / "h_other.safetensors"))),
            r"^--hessians .*h_other\.safetensors: model\.layers\.0\.mlp\.down_proj is 192×192 there, but .* 128×128")
    refused(lambda: train.main(argv(tiny, out, "--quantized", str(tiny / "q_other.safetensors"))),
            r"^--quantized .*q_other\.safetensors: model\.layers\.0\.mlp\.gate_proj is 192×64 there, .* 128×64")
    refused(lambda: train.main(argv(tiny, out, "--quantized", str(tiny / "q2.safetensors"), "--bits", "3")),
            r"^--quantized .*q2\.safetensors: model\.layers\.0\.self_attn\.q_proj is 2-bit .* --bits 3")
    for flag in ("--hessians", "--quantized"):
        bad = garbage(tmp_path / f"{flag[2:]}.safetensors")
        refused(lambda: train.main(argv(tiny, out, flag, str(bad))), rf"^{flag} .*: not a safetensors file")
        assert bad.stat().st_size == 4096                          # not overwritten
    assert not out.exists()


# ------------------------------------------------------------------------------------------ train.py: training


def test_diverging_training_stops_and_saves_no_nan(tiny, tmp_path):
    out = tmp_path / "out"
    msg = refused(lambda: train.main(argv(tiny, out, "--steps", "6", "--lr", "1e30", "--save-every", "1",
                                          "--eval-every", "100")), r"^step \d/6: .*training stopped")
    bad_step = int(msg.split("/")[0].split()[1])
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["step"] == bad_step - 1 >= 1 and f"holds step {ck['step']}" in msg
    assert all(torch.isfinite(v).all() for v in ck["values"].values())
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter.safetensors")).values())
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r.get("loss", 0.0)) for r in log) and max(r["step"] for r in log) == bad_step - 1


def test_checkpoint_every_n_steps_and_log_once_after_resume(tiny, tmp_path, monkeypatch):
    saved = []
    real_save = torch.save
    monkeypatch.setattr(train.torch, "save", lambda obj, f: saved.append(obj["step"]) or real_save(obj, f))
    out = tmp_path / "out"
    train.main(argv(tiny, out, "--steps", "6", "--eval-every", "100", "--save-every", "2", "--stop-after", "5"))
    assert saved == [2, 4, 5]
    log = out / "log.jsonl"
    with log.open("a") as f:                     # a kill after step 5's checkpoint: steps 6.. logged, then cut
        f.write(json.dumps({"step": 6, "loss": 1.0}) + "\n" + '{"step": 7, "lo')
    train.main(argv(tiny, out, "--steps", "6", "--eval-every", "100", "--save-every", "2", "--resume"))
    steps = [r["step"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_from_a_broken_checkpoint(tiny, tmp_path, no_heavy_work):
    run = tiny / "run2"
    for name, content in (("truncated", (run / "checkpoint.pt").read_bytes()[:300]), ("garbage", b"\x80junk" * 50)):
        out = copy_model(run, tmp_path / name)
        (out / "checkpoint.pt").write_bytes(content)
        before = sorted((f.name, f.stat().st_mtime_ns) for f in out.iterdir())
        refused(lambda: train.main(argv(tiny, out, "--steps", "0", "--resume")),
                rf"^--resume: .*{name}/checkpoint\.pt is not a readable checkpoint")
        assert sorted((f.name, f.stat().st_mtime_ns) for f in out.iterdir()) == before


# ------------------------------------------------------------------------------------------ eval.py


def eval_args(tiny, *extra):
    return ["--model", str(tiny / "model"), "--task", "ppl", "--data", str(tiny / "calib.txt"), "--quiet", *extra]


def test_eval_flags_and_out(tiny, tmp_path):
    refused(lambda: ev.main(eval_args(tiny, "--limit", "0")), r"^--limit 0: expected 1 or more")
    refused(lambda: ev.main(eval_args(tiny, "--seq-len", "0")), r"^--seq-len 0: expected 2 or more")
    refused(lambda: ev.main(eval_args(tiny, "--batch-size", "0")), r"^--batch-size 0: expected 1 or more")
    refused(lambda: ev.main(eval_args(tiny, "--out", str(tmp_path))), r"^--out .*: is a folder")
    assert list(tmp_path.iterdir()) == []                       # no stray temporary file
    refused(lambda: ev.main(eval_args(tiny, "--seq-len", "100000")), r"^--data .*calib\.txt: the text has")
    res = tmp_path / "sub" / "res.json"
    ev.main(eval_args(tiny, "--seq-len", "16", "--limit", "2", "--out", str(res)))
    assert json.loads(res.read_text())["windows"] == 2 and (res.stat().st_mode & 0o777) == 0o666 & ~umask()
    assert [p.name for p in res.parent.iterdir()] == ["res.json"]


def test_eval_quantized_and_adapter_mismatches(tiny, other, tmp_path):
    q2, q4 = tiny / "q2.safetensors", tiny / "run4" / "quantized.safetensors"
    a2, a4 = tiny / "run2" / "adapter.safetensors", tiny / "run4" / "adapter.safetensors"
    refused(lambda: ev.main(eval_args(tiny, "--quantized", str(tiny / "q_other.safetensors"))),
            r"^--quantized .*q_other\.safetensors: model\.layers\.0\.mlp\.gate_proj is 192×64 there")
    refused(lambda: ev.main(eval_args(tiny, "--quantized", str(q2), "--adapter", str(a4))),
            r"^--adapter .*run4/adapter\.safetensors was initialized for another base .*bits 4 != 2.*"
            r"--allow-base-mismatch")
    refused(lambda: ev.main(eval_args(tiny, "--quantized", str(q2), "--adapter", str(tiny / "run_other" /
                                                                                 "adapter.safetensors"))),
            r"^--adapter .*: model\.layers\.0\.mlp\.gate_proj is 192×64 there")
    for flag, path in (("--quantized", q2), ("--adapter", a2)):
        bad = garbage(tmp_path / f"{flag[2:]}.safetensors")
        args = {"--quantized": str(q2), "--adapter": str(a2), flag: str(bad)}
        refused(lambda: ev.main(eval_args(tiny, *[x for kv in args.items() for x in kv])),
                rf"^{flag} .*: not a safetensors file")
    lim = ["--seq-len", "16", "--limit", "1"]
    ev.main(eval_args(tiny, "--quantized", str(q4), "--adapter", str(a4), *lim))   # a matching pair
    ev.main(eval_args(tiny, "--quantized", str(q2), "--adapter", str(a4), "--allow-base-mismatch", *lim))


def test_gsm8k_answer_without_its_final_line(tiny, tmp_path, no_heavy_work):
    path = tmp_path / "g.jsonl"
    rows = [GSM[0], {"question": "Q?", "answer": "It is 4."}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    refused(lambda: ev.main(["--model", str(tiny / "model"), "--task", "gsm8k", "--data", str(path)]),
            r"^--data .*g\.jsonl: record 1: GSM8K answer has no '####' line")


def test_gsm8k_progress_within_a_batch(tiny, capsys):
    m, tok = ev.load_model(tiny / "model")
    ev.gsm8k(m, tok, GSM[:2], max_new_tokens=3, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "batch of 2: token 1/3" in err and "gsm8k 2/2 done" in err


# ------------------------------------------------------------------------------------------ files, progress


def umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_shared_files_have_the_usual_permissions(tiny, tmp_path):
    out = tmp_path / "run"
    _, m = train.run(train.parse_args(argv(tiny, out, "--steps", "1")))
    train.merge_export(m, out / "merged", tiny / "model")
    files = [f for f in [*out.iterdir(), *(out / "merged").iterdir()] if f.is_file()]
    assert {f.name for f in files} >= {"quantized.safetensors", "adapter.safetensors", "model.safetensors"}
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(0o666 & ~umask()) for f in files}


def test_calibration_progress_shows_i_of_n_and_eta(tiny, capsys):
    m = model_lib.from_pretrained(tiny / "model")
    batches = [torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    calib.collect_hessians(m, batches, progress=True)
    err = capsys.readouterr().err
    assert "batch 1/3" in err and "batch 3/3" in err and "ETA" in err


def test_header_reader_against_the_library(tiny):
    header, meta, start = checks.safetensors_header(tiny / "q2.safetensors")
    from safetensors import safe_open
    with safe_open(str(tiny / "q2.safetensors"), "pt") as f:
        assert set(header) == set(f.keys()) and meta == f.metadata()
        assert all(list(f.get_slice(k).get_shape()) == header[k]["shape"] for k in header)


# ------------------------------------------------------------------------------------------ the command lines


def test_cli_prints_one_line_and_debug_shows_the_traceback(tiny, tmp_path):
    m = copy_model(tiny / "model", tmp_path / "m")
    garbage(m / "model.safetensors", n=1 << 16)               # a huge header length: no MemoryError
    out = tmp_path / "out"
    proc = cli("train.py", *argv(tiny, out)[2:], "--model", m)
    one_error_line(proc, "--model", m / "model.safetensors")
    assert not out.exists()
    proc = cli("eval.py", *eval_args(tiny, "--limit", "0"), env={"QWHA_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "--limit 0" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_stops_with_a_checkpoint(tiny, tmp_path, sig):
    """Ctrl-C, or SIGTERM (a scheduler's stop), finishes the step under way, saves a checkpoint and exits 130."""
    out = tmp_path / "run"
    args = argv(tiny, out, "--steps", "100000", "--eval-every", "100000", "--save-every", "0")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 90
    while time.time() < deadline and not ((out / "log.jsonl").exists() and "loss" in (out / "log.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130 and "Traceback" not in err, err
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert lines[-1] == f"interrupted: stopped at step {step}: continue with --resume"
    steps = [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, step + 1))
    config = json.loads((out / "config.json").read_text())
    assert config["train_result"]["steps_done"] == step and not config["train_result"]["finished"]


def test_no_data_and_no_demo_assets(tiny, tmp_path):
    """Without --data a run is the demo (--demo); without the demo assets it stops in one line that names --data,
    --demo and the fetch command, before anything is written. A config without data names --data."""
    out = tmp_path / "out"
    proc = cli("train.py", "--model", tiny / "model", "--out", out, "--device", "cpu",
               env={"QWHA_ASSETS": str(tmp_path / "no-assets")})
    one_error_line(proc, "--data", "--demo", "data.py fetch-demo")
    assert not out.exists()
    cfg = train.parse_args(argv(tiny, out))
    cfg.data = None
    refused(lambda: train.validate(cfg), r"^--data: a training file is needed .*--demo")


def test_usage_errors_are_one_line_too(capsys):
    for parse, args in ((train.parse_args, ["--model", "m", "--bits", "two"]),
                        (ev.parse_args, ["--model", "m", "--task", "ppl", "--data", "d", "--limit", "x"])):
        with pytest.raises(SystemExit) as info:
            parse(args)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: argument --")


def test_model_folder_without_tokenizer(tiny, tmp_path, no_heavy_work):
    m = copy_model(tiny / "model", tmp_path / "notok")
    (m / "tokenizer.json").unlink()
    refused(lambda: train.main(["--model", str(m)] + argv(tiny, tmp_path / "out")[2:]),
            r"^--model .*notok: no tokenizer\.json", FileNotFoundError)
    refused(lambda: ev.main(["--model", str(m), "--task", "ppl", "--data", str(tiny / "calib.txt")]),
            r"^--model .*notok: no tokenizer\.json", FileNotFoundError)
