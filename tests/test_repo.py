"""Repository-level checks: CI runs the README's test command, the core stays off optional packages, ruff passes,
the root modules import each other without a cycle, and the tracked text speaks of the project only."""
import ast
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


def test_ruff_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"ruff check . failed:\n{out.stdout}{out.stderr}"


def _is_main_block(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":` at module level: it runs as the script `__main__`, not as this module."""
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and len(t.comparators) == 1 and isinstance(t.comparators[0], ast.Constant)
            and t.comparators[0].value == "__main__")


def _root_import_graph() -> dict[str, set[str]]:
    """{root module: root modules it imports anywhere (functions included), script entry blocks excepted}."""
    paths = {p.stem: p for p in ROOT.glob("*.py")}
    graph = {}
    for name, path in paths.items():
        deps = set()
        for top in ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body:
            if _is_main_block(top):
                continue
            for node in ast.walk(top):
                if isinstance(node, ast.Import):
                    deps.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    deps.add(node.module.split(".")[0])
        graph[name] = (deps & paths.keys()) - {name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = "done"
        return None

    for u in sorted(graph):
        if u not in state and (cycle := visit(u)):
            return cycle
    return None


def test_no_import_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    graph = _root_import_graph()
    assert "wht" in graph["qwha"] and "checks" in graph["gptq"]       # imports inside functions are seen
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle between root modules: " + " -> ".join(cycle)


PROCESS_WORDS = re.compile(r"\bissues? ?#?\d|first release|earlier run|this session", re.IGNORECASE)


def test_no_development_process_words():
    out = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.sh", "*.cu"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    files = [f for f in out.stdout.splitlines() if f != "tests/test_repo.py"]
    assert any(f == "README.md" for f in files), "git ls-files listed no README.md"
    hits = [f"{f}:{i}: {line.strip()}" for f in files if (ROOT / f).is_file()
            for i, line in enumerate((ROOT / f).read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if PROCESS_WORDS.search(line)]
    assert not hits, "development-process words in tracked files:\n" + "\n".join(hits)
