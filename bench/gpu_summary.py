"""One table and one JSON line from the logs of bench/gpu_check.sh: the init, the training step and the WHT kernel.

    python bench/gpu_summary.py --wht OUT/wht.log --step OUT/step.log --init OUT/init.log

Each log is a benchmark's stdout, whose last JSON line is its result. A log that is missing or has no result (the
benchmark failed or ran out of time) is named in the table and in the JSON line's "missing"; the exit status is
then 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def last_result(path: str | None, bench: str) -> dict | None:
    """The last line of `path` that is a JSON object with "bench": bench, or None."""
    if not path or not Path(path).is_file():
        return None
    for line in reversed(Path(path).read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                res = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(res, dict) and res.get("bench") == bench:
                return res
    return None


def init_figures(res: dict) -> dict:
    """Seconds per block and for the model, the mean seconds per linear, and each stage's share of the time."""
    rows = res["rows"]
    total = sum(r["seconds"] for r in rows)
    shares = {}
    for r in rows:
        for k, v in r["stages"].items():
            shares[k] = shares.get(k, 0.0) + v / max(total, 1e-12)
    return {"model": res["model"], "device": res.get("device_name", res["device"]), "linears": len(rows),
            "partial": res.get("partial", False),
            "per_block_s": res["per_block_s"], "model_estimate_s": res["model_estimate_s"],
            "mean_linear_s": total / max(len(rows), 1),
            "stage_share": {k: v for k, v in sorted(shares.items(), key=lambda kv: -kv[1]) if v > 0}}


def step_figures(res: dict) -> dict:
    """Per batch: QWHA's step against LoRA, SHiRA, 2-D DHT and 2-D DCT, and the step times."""
    out = {"model": res.get("model"), "packed_base": res.get("packed_base"), "autocast": res.get("autocast")}
    for b, s in res["summary"].items():
        r = res["results"][b]
        out[f"batch_{b}"] = {"qwha_over_lora": s["qwha_over_lora_step"],
                             "qwha_over_2d_dct": s["qwha_over_2d_dct_step"],
                             "qwha_over_2d_dht": s.get("qwha_over_2d_dht_step"),
                             "qwha_over_shira": s.get("qwha_over_shira_step"),
                             "step_s": {v: x["step_s"] for v, x in r.items()}}
    return out


def wht_figures(res: dict) -> dict:
    """Per dtype and width: GB/s and % of the device copy, forward and inverse, and the largest error."""
    out = {}
    for r in res.get("kernel", []):
        d = out.setdefault(r["dtype"], {}).setdefault(str(r["n"]), {})
        d[r["direction"]] = {"GBps": r["GBps"], "pct_copy": r["pct_copy"], "copy_GBps": r["copy_GBps"],
                             "max_rel_err_vs_torch": r["max_rel_err_vs_torch"]}
    kernel = any(r.get("cuda_kernel") for r in res.get("kernel", []))
    return {"device": res["device"], "cuda_kernel": kernel, "rows": res.get("kernel_rows"), "table": out}


def summarize(wht: dict | None, step: dict | None, init: dict | None) -> dict:
    missing = [k for k, v in (("wht", wht), ("step", step), ("init", init)) if v is None]
    return {"bench": "gpu_check", "missing": missing,
            "init": init_figures(init) if init else None,
            "step": step_figures(step) if step else None,
            "wht": wht_figures(wht) if wht else None}


def table(s: dict) -> str:
    lines = [f"{'figure':<52} {'value':>12}"]

    def add(name, v, fmt="{:>12.3f}"):
        lines.append(f"{name:<52} " + (fmt.format(v) if v is not None else f"{'-':>12}"))

    if s["init"]:
        i = s["init"]
        done = f"{i['linears']} linears" + (", stopped early" if i["partial"] else "")
        add(f"init: seconds per linear ({i['model']}, {done})", i["mean_linear_s"])
        add("init: seconds per block", i["per_block_s"])
        add("init: minutes for the model", i["model_estimate_s"] / 60 if i["model_estimate_s"] else None)
        for k, v in list(i["stage_share"].items())[:6]:
            add(f"init: share of time in {k}", 100 * v, "{:>11.1f}%")
    if s["step"]:
        st = s["step"]
        for b, x in st.items():
            if not b.startswith("batch_"):
                continue
            for k in ("qwha_over_lora", "qwha_over_2d_dct", "qwha_over_2d_dht", "qwha_over_shira"):
                add(f"step {st['model']}, batch {b[6:]}: {k.replace('_over_', ' / ')}", x[k])
            add(f"step {st['model']}, batch {b[6:]}: QWHA seconds", x["step_s"]["QWHA"])
    if s["wht"]:
        w = s["wht"]
        tag = "kernel" if w["cuda_kernel"] else "torch path"
        for dtype, widths in w["table"].items():
            for n, dirs in widths.items():
                for d, x in dirs.items():
                    add(f"wht {tag} {dtype} n={n} {d}: % of copy ({x['GBps']:.0f} GB/s)", x["pct_copy"],
                        "{:>11.1f}%")
    for k in s["missing"]:
        lines.append(f"{k + ': no result (see its .log / .err)':<52} {'missing':>12}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wht")
    ap.add_argument("--step")
    ap.add_argument("--init")
    a = ap.parse_args(argv)
    s = summarize(last_result(a.wht, "wht"), last_result(a.step, "step"), last_result(a.init, "init_gpu"))
    print(table(s))
    print(json.dumps(s))
    return 1 if s["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
