"""Shared test fixtures.

Tests that read the demo assets (the converted SmolLM2 checkpoint, the Wikipedia and GSM8K splits) carry
`@pytest.mark.demo_assets` and take the `assets` fixture. The README's test command fetches them first
(`python data.py fetch-demo --out assets`); set QWHA_ASSETS to use another folder. A marked test whose assets are
missing fails in one line, it does not skip: CI must exercise them. `pytest -m "not demo_assets"` runs the rest,
which need no assets.
"""
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("QWHA_ASSETS", ROOT / "assets"))
NEEDED = ("smollm2-135m/config.json", "wikitext/test.txt", "wikitext/train.txt", "gsm8k/test.jsonl",
          "gsm8k/train.jsonl")


def pytest_collection_modifyitems(items):
    """A test that takes the `assets` fixture without the demo_assets marker would break `-m "not demo_assets"`
    on a machine without the assets: refuse the run and name it."""
    unmarked = [it.nodeid for it in items if "assets" in getattr(it, "fixturenames", ())
                and it.get_closest_marker("demo_assets") is None]
    if unmarked:
        raise pytest.UsageError(f"tests read the demo assets without @pytest.mark.demo_assets: {', '.join(unmarked)}")


def pytest_runtest_setup(item):
    """A demo_assets test fails at once, in one line, when the assets are missing."""
    missing = [name for name in NEEDED if not (ASSETS / name).exists()]
    if item.get_closest_marker("demo_assets") and missing:
        pytest.fail(f"demo assets missing in {ASSETS} ({', '.join(missing)}): run `python data.py fetch-demo --out "
                    f"{ASSETS}` (or set QWHA_ASSETS to a folder that has them, or deselect with -m \"not "
                    f"demo_assets\")", pytrace=False)


@pytest.fixture(scope="session")
def assets() -> Path:
    """The demo assets folder (for tests marked demo_assets, which the hook above checks)."""
    return ASSETS


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every test uses tiny shapes: on a shared 2-core machine a second intra-op thread only adds scheduler waits
    (several times slower under load). Restored at the end of the pytest session."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
