"""The benchmarks' result line: print it, and append it to runs/<bench>.jsonl (one JSON object per run)."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def emit(bench: str, result: dict) -> None:
    """Print `result` as one JSON line and append that line to runs/<bench>.jsonl."""
    line = json.dumps(result)
    print(line)
    out = ROOT / "runs" / f"{bench}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(line + "\n")
