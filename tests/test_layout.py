"""The package's shape, checked from the source: which folder may import which, no import circles,
no runtime module over 600 lines, a wheel that holds only the runtime and the operator tools, and
an agent whose `run` never loads the operator tools."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.util import wait_until

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "edgeagent"
MAX_LINES = 600


def modules(pkg: Path = PKG) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in pkg.rglob("*.py"):
        parts = list(f.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import, deferred ones inside functions too; `if TYPE_CHECKING:` blocks are not imports."""
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        else:
            todo.extend(ast.iter_child_nodes(node))


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (a name is cut back to the module that defines it)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod and not mod.startswith(name + "."):
                    graph[mod].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


MODS = modules()
GRAPH = import_graph(MODS)
RUNTIME = {m for m in MODS if not m.startswith("edgeagent.ops")}


def test_the_graph_sees_deferred_imports_and_finds_a_planted_circle(tmp_path: Path) -> None:
    """The checker itself can fail: a circle through a deferred import is found."""
    pkg = tmp_path / "edgeagent"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from edgeagent.core.b import x\n")
    (pkg / "core" / "b.py").write_text("x = 1\ndef f():\n    from edgeagent.core import a\n")
    (pkg / "core" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                       "    from edgeagent.core import a\n")
    graph = import_graph(modules(pkg))
    assert cycles(graph) == [["edgeagent.core.a", "edgeagent.core.b"]]
    assert graph["edgeagent.core.c"] == set()


def test_no_import_circles() -> None:
    assert cycles(GRAPH) == []


def test_the_runtime_never_imports_the_operator_tools() -> None:
    bad = {m: sorted(d for d in GRAPH[m] if d.startswith("edgeagent.ops")) for m in RUNTIME}
    assert {m: d for m, d in bad.items() if d} == {}


def test_core_imports_nothing_of_ours_outside_core() -> None:
    core = {m for m in MODS if m.startswith("edgeagent.core")}
    bad = {m: sorted(d for d in GRAPH[m] if d not in core and d != "edgeagent") for m in core}
    assert {m: d for m, d in bad.items() if d} == {}


def test_runtime_folders_do_not_reach_into_the_agent_or_cli() -> None:
    """Components get their collaborators from agent.py; they never import it (nor the CLI)."""
    top = {"edgeagent.agent", "edgeagent.cli"}
    bad = {m: sorted(GRAPH[m] & top) for m in RUNTIME - top}
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_wheel_never_imports_the_field_trial_or_the_tests() -> None:
    """They are not in the wheel: an import of them would break every installed agent."""
    bad = []
    for mod, path in MODS.items():
        for node in _imports(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            bad += [(mod, n) for n in names if n.split(".")[0] in ("fieldtrial", "tests")]
    assert bad == []


def test_no_runtime_module_over_600_lines() -> None:
    long = {m: n for m in RUNTIME if (n := len(MODS[m].read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_string_keyed_service_locator_or_module_state() -> None:
    """No `providers[...]` registry or component slots on a shared object; the hub is gone."""
    assert "edgeagent.core.hub" not in MODS
    for mod in RUNTIME:
        text = MODS[mod].read_text()
        assert ".providers[" not in text, mod


@pytest.mark.slow
def test_wheel_holds_no_field_trial_and_no_tests(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w",
                    str(tmp_path)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("edgeagent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith(("fieldtrial/", "tests/")) or "/trial/" in n]
    assert "edgeagent/agent.py" in names and "edgeagent/ops/push.py" in names
    assert any(n.endswith("models/vibration-anomaly/model.tflite") for n in names)
    meta = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("/METADATA"))
    base = [line for line in meta.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [line for line in base if "rich" in line or "prometheus" in line or "tflite" in line]


@pytest.mark.integration
def test_run_with_inference_off_loads_no_operator_tool_and_no_tflite(tmp_path: Path) -> None:
    """`edgeagent run` (no broker, inference off): -X importtime lists every module the process
    imported; none of the operator side, its extras or a TFLite runtime is among them."""
    cfg = tmp_path / "agent.toml"
    state = tmp_path / "state"
    cfg.write_text(f'[device]\nid = "layout1"\nstate_dir = "{state}"\n[inference]\nenabled = false\n'
                   '[agent]\nhealth_interval_s = 0.1\n')
    err = tmp_path / "importtime.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    with err.open("w") as stderr:
        argv = [sys.executable, "-X", "importtime", "-m", "edgeagent.cli", "run", "-c", str(cfg)]
        proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        try:
            health = state / "health.json"
            wait_until(lambda: health.exists() and '"running"' in health.read_text(), 30,
                       message="agent running")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    imported = {line.split("|")[-1].strip() for line in err.read_text().splitlines()
                if "import time:" in line}
    assert "edgeagent.agent" in imported and "edgeagent.monitor.component" in imported
    forbidden = ("rich", "prometheus_client", "tflite_runtime", "ai_edge_litert", "fieldtrial", "tests")
    assert sorted(m for m in imported if m.split(".")[0] in forbidden or m.startswith("edgeagent.ops")) == []
