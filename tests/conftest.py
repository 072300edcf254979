"""Shared test fixtures.

Tests that need the demo assets (the converted SmolLM2 checkpoint, the Wikipedia and GSM8K splits) take the
`assets` fixture. The README's test command fetches them first (`python data.py fetch-demo --out assets`);
set QWHA_ASSETS to use another folder. A missing folder is an error, not a skip: CI must exercise them.
"""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def assets() -> Path:
    path = Path(os.environ.get("QWHA_ASSETS", ROOT / "assets"))
    needed = [path / "smollm2-135m" / "config.json", path / "wikitext" / "test.txt", path / "gsm8k" / "test.jsonl"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        pytest.fail(
            f"demo assets missing: {', '.join(missing)}; run `python data.py fetch-demo --out {path}` "
            "(or set QWHA_ASSETS to a folder that has them)",
            pytrace=False,
        )
    return path
