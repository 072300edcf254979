"""Shared test fixtures.

Tests that need the demo assets (the converted SmolLM2 checkpoint, the Wikipedia and GSM8K splits) take the
`assets` fixture. The README's test command fetches them first (`python data.py fetch-demo --out assets`);
set QWHA_ASSETS to use another folder. A missing folder is an error, not a skip: CI must exercise them.
"""
import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every test uses tiny shapes: on a shared 2-core machine a second intra-op thread only adds scheduler waits
    (several times slower under load). Restored at the end of the pytest session."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
