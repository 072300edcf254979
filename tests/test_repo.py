"""Repository-level checks: CI runs the README's test command, and the core stays off optional packages."""
import re
import subprocess
import sys

from conftest import ROOT

CORE = ["wht", "gptq", "calib", "qwha", "model", "data"]


def _ci_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    cmds = [ln for ln in lines if ln.startswith("bash setup.sh")]
    assert len(cmds) == 1, ".ci/run must hold exactly one test command line starting with 'bash setup.sh'"
    return cmds[0]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert _ci_command() in readme.splitlines(), "README's test command and .ci/run differ"


def test_ci_treats_no_tests_collected_as_failure():
    text = (ROOT / ".ci" / "run").read_text()
    assert re.search(r'"\$rc" -eq 5', text) and "exit 1" in text


def test_core_imports_no_optional_or_forbidden_package():
    code = (
        "import sys\n"
        f"for m in {CORE!r}:\n"
        "    __import__(m)\n"
        "bad = sorted(m for m in ('gguf', 'transformers', 'peft', 'datasets', 'scipy') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"core modules pulled in: {out.stdout.strip()}"


def test_gitignore_keeps_venv_and_assets_out():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".venv/" in ignored and "assets/" in ignored
