"""Memory and time of train.py's preparation against the model's depth, on seeded random checkpoints of any shape.

For each block count L it writes a random checkpoint of the config's widths with L decoder blocks (bf16, one
shard per block plus an index, the tokenizer of the demo model), runs `train.py --steps 0` on it in a child
process, and reports each stage's seconds, the peak anonymous resident memory of the child (sampled from
/proc) and, on CUDA, the peak device memory. The growth per block, and its ratio to the float32 bytes of one
block's linears, is the figure to read: a preparation that streams blocks keeps only the packed base and the
adapters of finished blocks, a small fraction of the full-precision weights.

    python bench/bench_memory.py --hidden 1024 --intermediate 4096 --heads 16 --kv-heads 4 --layers 4,10
    python bench/bench_memory.py --config bench/configs/llama-3.1-8b.json --layers 2,4 --device cuda \\
        --n-calib 128 --calib-len 2048
    python bench/bench_memory.py --config bench/configs/llama-3.1-8b.json --layers 8 --device cuda \\
        --n-calib 128 --calib-len 2048 --steps 10 --device-memory-gb 24      # 8 blocks on a 24 GB budget
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import model as model_lib  # noqa: E402
import prepare  # noqa: E402
from jsonl import emit  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


CAPPED = ("import runpy, sys, torch; "
          "torch.cuda.set_per_process_memory_fraction(min(1.0, {gb} * 2**30 / "
          "torch.cuda.get_device_properties(0).total_memory)); "
          "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def random_checkpoint(folder: Path, config: dict, seed: int = 0, tokenizer_src: Path | None = None) -> Path:
    """A LLaMA folder of `config` with seeded N(0, 0.02) bf16 weights (unit norms), written one block per shard
    so that no more than one block is ever in memory."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    mc = model_lib.ModelConfig.from_dict(config)
    with torch.device("meta"):
        skeleton = model_lib.LlamaForCausalLM(mc, init=False)
    shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    if mc.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(name)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, (key, names) in enumerate(groups.items()):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in names:
            if n.endswith("norm.weight"):
                tensors[n] = torch.ones(shapes[n], dtype=torch.bfloat16)
            else:
                tensors[n] = (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16)
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        del tensors
    (folder / model_lib.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({**mc.to_dict(), "torch_dtype": "bfloat16"}, indent=1))
    for f in TOKENIZER_FILES:
        if tokenizer_src is not None and (tokenizer_src / f).exists():
            shutil.copy2(tokenizer_src / f, folder / f)
    return folder


def linear_bytes_fp32(config: dict) -> int:
    """float32 bytes of one block's seven linears."""
    return 4 * sum(m * n for m, n in prepare.block_shapes(model_lib.ModelConfig.from_dict(config)).values())


def estimate(config: dict, n_calib: int, calib_len: int, bits: int, rank: int, group_size: int = 64,
             dtype_bytes: int = 4) -> dict:
    """Computed (not measured) GB of what preparation and training hold on the device: what stays (embeddings
    and head, packed base, adapters and their AdamW state), the calibration activations, one block's weights and
    Hessians, and the float64 temporaries of the largest linear's GPTQ and init (a few n×n and m×n matrices)."""
    mc = model_lib.ModelConfig.from_dict(config)
    D, Im, hd, L = mc.hidden_size, mc.intermediate_size, mc.head_dim, mc.num_hidden_layers
    q = mc.num_attention_heads * hd
    shapes = list(prepare.block_shapes(mc).values())
    gb = 2**-30
    packed = sum(m * n * bits / 8 + m * n / group_size * (2 + bits / 8) for m, n in shapes) * L
    values = sum(min(rank * (m + n), m * n) for m, n in shapes) * L
    temps = max(max(3 * n * n * 8 + n * n * 4 + 5 * m * n * 4, 2 * n * n * 8 + 4 * m * n * 8) for m, n in shapes)
    return {"embeddings_gb": mc.vocab_size * D * dtype_bytes * (1 if mc.tie_word_embeddings else 2) * gb,
            "activations_gb": n_calib * calib_len * D * dtype_bytes * gb,
            "block_weights_gb": sum(m * n for m, n in shapes) * dtype_bytes * gb,
            "block_hessians_gb": (D * D * 2 + q * q + Im * Im) * 8 * gb,
            "largest_linear_temporaries_gb": temps * gb,
            "packed_base_gb": packed * gb,
            "adapters_gb": values * 8 * gb,              # fp32 value + int32 index
            "adapter_training_state_gb": values * 12 * gb}  # gradient + AdamW's two moments, fp32


def run_child(cmd: list[str], poll_s: float = 0.02) -> tuple[int, float, float, str]:
    """Run cmd; returns (exit code, peak RssAnon GB, wall seconds, stderr tail), sampling /proc/PID/status."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    import threading
    err = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(poll_s)
    reader.join()
    return proc.returncode, peak / 2**20, time.time() - t0, "".join(err)[-2000:]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a config.json to take the widths from (the flags below override it)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--vocab", type=int, help="default: the config's, else the demo tokenizer's")
    p.add_argument("--layers", default="4,10", help="block counts to compare, comma-separated")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--n-calib", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=0, help="training steps after the preparation (0: none)")
    p.add_argument("--assets", default=str(ROOT / "assets"))
    p.add_argument("--workdir", help="where the checkpoints go (default: a temporary folder, removed after)")
    p.add_argument("--extra", default="", help="more train.py flags, space-separated")
    p.add_argument("--device-memory-gb", type=float, help="CUDA: run train.py under "
                   "torch.cuda.set_per_process_memory_fraction equal to this many GB (e.g. 24)")
    p.add_argument("--estimate", action="store_true", help="print the computed memory of the config's stages "
                   "(n_calib x calib_len activations, float32) instead of running anything")
    a = p.parse_args(argv)
    assets = Path(a.assets)
    tok_src = assets / "smollm2-135m"
    config = json.loads(Path(a.config).read_text()) if a.config else {
        "model_type": "llama", "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": False}
    over = {"hidden_size": a.hidden, "intermediate_size": a.intermediate, "num_attention_heads": a.heads,
            "num_key_value_heads": a.kv_heads, "vocab_size": a.vocab}
    config.update({k: v for k, v in over.items() if v is not None})
    if "vocab_size" not in config:
        config["vocab_size"] = model_lib.Tokenizer.from_pretrained(tok_src).vocab_size
    if a.estimate:
        est = estimate(config, a.n_calib, a.calib_len, a.bits, a.rank)
        prep = sum(v for k, v in est.items() if k not in ("adapter_training_state_gb",))
        for k, v in est.items():
            print(f"{k:<32} {v:8.2f}")
        print(f"{'preparation peak (sum above)':<32} {prep:8.2f}")
        result = {"bench": "memory_estimate", "config": config, "n_calib": a.n_calib, "calib_len": a.calib_len,
                  "bits": a.bits, "rank": a.rank, **est, "preparation_gb": prep}
        emit("memory", result)
        return result
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_memory_"))
    rows = []
    try:
        for L in [int(x) for x in a.layers.split(",")]:
            folder = random_checkpoint(work / f"L{L}", {**config, "num_hidden_layers": L}, tokenizer_src=tok_src)
            out = work / f"run{L}"
            launch = [sys.executable, str(ROOT / "train.py")]
            if a.device_memory_gb:                   # cap the device memory as a smaller card would
                launch = [sys.executable, "-c", CAPPED.format(gb=a.device_memory_gb), str(ROOT / "train.py")]
            cmd = [*launch, "--model", str(folder), "--bits", str(a.bits),
                   "--rank", str(a.rank), "--data", str(assets / "gsm8k" / "train.jsonl"),
                   "--calib", str(assets / "wikitext" / "train.txt"), "--n-calib", str(a.n_calib),
                   "--calib-len", str(a.calib_len), "--steps", str(a.steps), "--n-eval", "4", "--max-len", "256",
                   "--device", a.device, "--out", str(out), "--quiet", *a.extra.split()]
            rc, peak, wall, err = run_child(cmd)
            if rc != 0:
                raise SystemExit(f"train.py failed for {L} blocks (exit {rc}):\n{err}")
            rec = json.loads((out / "config.json").read_text())
            t, mem = rec["timings"], rec.get("memory", {})
            steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"loss"' in x]
            rows.append({"blocks": L, "calibrate_s": t["calibrate_s"], "quantize_s": t["quantize_s"],
                         "init_s": t["init_s"], "train_s": t.get("train_s", 0.0), "wall_s": wall,
                         "peak_anon_gb": peak, "peak_device_gb": mem.get("peak_device_gb"),
                         "train_peak_gb": max((r["mem_gb"] for r in steps), default=None)})
            shutil.rmtree(folder)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    per_block_fp32 = linear_bytes_fp32(config) / 2**30
    print(f"{'blocks':>6} {'calib s':>8} {'gptq s':>8} {'init s':>8} {'train s':>8} {'wall s':>8} "
          f"{'anon GB':>8} {'dev GB':>7} {'train GB':>8}")
    for r in rows:
        dev = f"{r['peak_device_gb']:.2f}" if r["peak_device_gb"] is not None else "-"
        print(f"{r['blocks']:>6} {r['calibrate_s']:>8.1f} {r['quantize_s']:>8.1f} {r['init_s']:>8.1f} "
              f"{r['train_s']:>8.1f} {r['wall_s']:>8.1f} {r['peak_anon_gb']:>8.3f} {dev:>7} "
              f"{r['train_peak_gb'] if r['train_peak_gb'] is not None else '-':>8}")
    result = {"bench": "memory", "config": config, "bits": a.bits, "rank": a.rank, "n_calib": a.n_calib,
              "calib_len": a.calib_len, "device": a.device, "linears_fp32_gb_per_block": per_block_fp32, "rows": rows}
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        dL = hi["blocks"] - lo["blocks"]
        growth = (hi["peak_anon_gb"] - lo["peak_anon_gb"]) / dL
        result["anon_gb_per_block"] = growth
        result["growth_over_fp32_linears"] = growth / per_block_fp32
        result["seconds_per_block"] = {k: (hi[k] - lo[k]) / dL for k in ("calibrate_s", "quantize_s", "init_s")}
        print(f"growth per block: {growth * 1024:.1f} MB anonymous = {result['growth_over_fp32_linears']:.3f} x the "
              f"float32 bytes of a block's linears ({per_block_fp32 * 1024:.1f} MB); seconds per block: "
              + ", ".join(f"{k} {v:.2f}" for k, v in result["seconds_per_block"].items()))
    emit("memory", result)
    return result


if __name__ == "__main__":
    main()
