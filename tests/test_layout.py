"""The package's shape: every module imports alone, the import graph has no cycle, no package
import hides inside a function, no module outgrows one screenful of concerns, and the repository
tracks no training state."""
import ast
import re
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "defectlab"
CHECKOUT = PACKAGE.parent
LAYERS = ("base", "data", "core", "stages", "reports", "app")  # bottom to top: docs/interfaces.md
FILES = {f"{p.parent.name}.{p.stem}": p for layer in LAYERS for p in sorted((PACKAGE / layer).glob("*.py"))
         if p.stem != "__init__"}
MODULES = sorted(FILES)  # "layer.module"
MAX_LINES = 400
MAX_TRACKED_BYTES = 12_000_000  # the largest shipped asset (mini's weights) is 9.5 MB


def _package_imports(tree: ast.AST, name: str):
    """("layer.module" imported, node) for every relative import (``from . import x``,
    ``from ..core import x``, ``from ..core.x import y``) and every absolute ``defectlab.…``
    import in module ``name``, wherever it stands."""
    layer = name.split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("defectlab")):
            if node.level:
                parts = ([layer] if node.level == 1 else []) + (node.module or "").split(".")
            else:
                parts = node.module.split(".")[1:]
            parts = [p for p in parts if p]
            if len(parts) >= 2:
                yield ".".join(parts[:2]), node
            else:
                for alias in node.names:
                    yield ".".join([*parts, alias.name]) if parts else alias.name, node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("defectlab."):
                    yield ".".join(alias.name.split(".")[1:3]), node


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        tree = ast.parse(FILES[name].read_text())
        graph[name] = {mod for mod, _ in _package_imports(tree, name) if mod != name}
    return graph


def test_the_package_is_its_layers():
    """``ls defectlab`` shows the layers: no module outside a layer folder but the entry point."""
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not loose, f"modules outside the layer folders {LAYERS}: {loose}"
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and any(p.glob("*.py")))
    assert folders == sorted(LAYERS), folders


def test_imports_go_down_the_layers():
    """A module imports from its own layer folder or the ones below, never above, and only
    modules that exist."""
    graph, wrong = _graph(), []
    for name, imported in graph.items():
        for mod in imported:
            if mod not in FILES:
                wrong.append(f"{name} imports {mod}, which is no module of the layers")
            elif LAYERS.index(mod.split(".")[0]) > LAYERS.index(name.split(".")[0]):
                wrong.append(f"{name} imports {mod}, a layer above it")
    assert not wrong, wrong


def test_the_import_graph_has_no_cycle():
    graph, state, order = _graph(), {}, []

    def visit(node, path):
        if state.get(node) == "done":
            return
        if state.get(node) == "open":
            cycle = path[path.index(node):] + [node]
            pytest.fail("import cycle: " + " → ".join(cycle))
        state[node] = "open"
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        state[node] = "done"
        order.append(node)

    for name in MODULES:
        visit(name, [])
    assert set(order) == set(MODULES)


def test_no_package_import_inside_a_function():
    hidden = []
    for name in MODULES:
        tree = ast.parse(FILES[name].read_text())
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            hidden += [f"{name}.{func.name} imports {mod}" for mod, _ in _package_imports(func, name)]
    assert not hidden, hidden


def _import_each_first(names, errors) -> None:
    import importlib
    import traceback
    for name in names:
        for key in [k for k in sys.modules if k == "defectlab" or k.startswith("defectlab.")]:
            del sys.modules[key]
        try:
            importlib.import_module("defectlab." + name)
        except BaseException:
            errors.put(f"defectlab.{name}:\n{traceback.format_exc()[-2000:]}")
            raise SystemExit(1)


@pytest.mark.slow
def test_every_module_imports_first():
    """Each module imported with no other defectlab module loaded before it (one forked child
    of this test process, the package's own modules dropped between imports; torch & co. stay
    loaded, for speed)."""
    ctx = multiprocessing.get_context("fork")
    errors = ctx.SimpleQueue()
    child = ctx.Process(target=_import_each_first, args=(MODULES, errors))
    child.start()
    child.join(600)
    assert child.exitcode == 0, errors.get() if not errors.empty() else f"exit code {child.exitcode}"


def test_no_module_over_the_line_budget():
    long = {name: n for name, p in FILES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def _tracked() -> list[str]:
    try:
        done = subprocess.run(["git", "ls-files", "-z"], cwd=CHECKOUT, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("git is not installed: cannot list the tracked files")
    if done.returncode != 0:
        pytest.skip(f"{CHECKOUT} is not a git checkout (an installed or unpacked copy): no tracked files to check")
    return [p for p in done.stdout.split("\0") if p]


def test_no_training_state_is_tracked():
    """Resumable runs (weights + optimizer state, every few minutes) live outside the repository,
    under outputs/ or $DEFECTLAB_HOME; only exported assets ship (defectlab/assets/)."""
    tracked = _tracked()
    state = [p for p in tracked if "checkpoints" in Path(p).parts]
    assert not state, f"checkpoint files tracked (git rm -r --cached them; pretrain/README.md says where runs live): {state}"
    big = {p: size for p in tracked if (CHECKOUT / p).is_file() and (size := (CHECKOUT / p).stat().st_size) > MAX_TRACKED_BYTES}
    assert not big, f"tracked files over {MAX_TRACKED_BYTES:,} bytes: {big}"


def test_one_place_takes_optimizer_steps():
    """Fine-tuning, base pre-training, the autoencoder and the small classifiers all step through
    ``loop.Stepper``: clipping, EMA or precision change in one place."""
    pattern = re.compile(r"\.backward\(|\b(opt|optimizer)\.step\(|clip_grad_norm_\(")
    found = [f"{name}:{n}" for name, p in FILES.items() if name != "core.loop"
             for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, f"optimizer steps outside core/loop.py: {found}"
