"""The package's import graph has no cycles: imports flow one way (cli -> launch -> stages -> teachers,
learner, diagnostics -> tasks, losses, rollout, tracking, checkpoint).

The graph is read with `ast` from the source, so it counts every import statement wherever it is: at
module level and inside functions (a function-level import hides a cycle from Python at import time, not
from a reader). Edges are between opd_cli modules: `from opd_cli.x import y` is an edge to `opd_cli.x.y`
when that is a module, else to `opd_cli.x`; `from opd_cli import x` likewise.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "opd_cli"


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the opd_cli modules it imports, module-level and function-level imports alike."""
    modules = module_names()

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [owner(a.name) for a in node.names if a.name.split(".")[0] == "opd_cli"]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] == "opd_cli":
                    targets = [
                        f"{base}.{a.name}" if f"{base}.{a.name}" in modules else owner(base)
                        for a in node.names
                    ]
            graph[module].update(t for t in targets if t and t != module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_graph_reader_sees_function_level_imports_and_cycles(tmp_path, monkeypatch):
    """The checker itself: a cycle closed only by a function-level import is found."""
    pkg = tmp_path / "opd_cli"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from opd_cli.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from opd_cli import a\n")
    (pkg / "c.py").write_text("from .a import b\n")  # relative, into a module that is no package: opd_cli.a
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    graph = import_graph()
    assert graph["opd_cli.a"] == {"opd_cli.sub.b"}
    assert graph["opd_cli.sub.b"] == {"opd_cli.a"}
    assert graph["opd_cli.c"] == {"opd_cli.a"}
    assert cycles(graph) == [["opd_cli.a", "opd_cli.sub.b"]]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40, "the package was not found"
    found = cycles(graph)
    assert not found, "import cycles among opd_cli modules: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("opd_cli.stages.opd", "opd_cli.launch"),
        ("opd_cli.launch", "opd_cli.cli"),
        ("opd_cli.losses", "opd_cli.stages.opd"),
        ("opd_cli.rollout", "opd_cli.stages.common"),
        ("opd_cli.testbed.paths", "opd_cli.testbed.build"),
    ],
)
def test_imports_flow_one_way(low, high):
    """A lower layer never reaches a higher one, directly or through other modules."""
    graph = import_graph()
    seen, todo = set(), [low]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    assert high not in seen, f"{low} imports {high} (through {sorted(seen)})"


HEAVY = ("torch", "transformers", "vllm", "wandb", "datasets", "matplotlib", "trl")


def test_the_command_line_starts_without_torch_or_transformers(tmp_path):
    """`opd --help` and `opd run --cfg job` compose and check a command line without loading a model
    library: the commands import torch and the stages only when they run a model (cli.py, launch.py)."""
    probe = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from opd_cli.cli import main\n"
        "help = CliRunner().invoke(main, ['--help'])\n"
        "job = CliRunner().invoke(main, ['run', '--cfg', 'job'])\n"
        "assert help.exit_code == 0 and job.exit_code == 0, (help.output, job.output)\n"
        "assert 'stage: opd' in job.output, job.output\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(PACKAGE.parent)
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_config_repeats_the_losses_exactly():
    """config.py keeps torch out of composing by repeating losses.py's names; they must stay the same."""
    from opd_cli import config, losses

    assert config.LOSS_NAMES == tuple(losses.LOSSES)
    assert config.SUPPORTS == tuple(losses.SUPPORTS)
