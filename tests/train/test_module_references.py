"""Every reference to a ``qvl.train`` module's attribute names one that exists.

Many of the loop's branches run only on a GPU (compiled layers, CUDA graphs, the padded matmuls' warm-up, host
embeddings), and the benchmark and tests replace functions on the modules by name: a CPU run does not execute those
lines, so this reads them instead. Checked: ``module.attr`` where ``module`` was imported from ``qvl.train`` (unless
the function rebinds the name), ``from qvl.train.X import a``, ``monkeypatch.setattr(module, "attr", ...)`` and
``("...", "qvl.train.X", "attr")`` triples (the benchmark's timeline)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted([*(ROOT / "src/qvl/train").glob("*.py"), ROOT / "bench/train_throughput.py",
                *(ROOT / "tests/train").glob("*.py"), *(ROOT / "bench/experiments").glob("*.py")])


def _train_module(name: str):
    """qvl.train.<name> when it is a module, else None."""
    try:
        return importlib.import_module(f"qvl.train.{name}")
    except ModuleNotFoundError:
        return None


def _has(module: str, dotted: str) -> bool:
    obj = importlib.import_module(module)
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _imports(body_nodes) -> dict[str, str]:
    """name -> qvl.train module, for the imports directly in these statements' scope (not nested functions)."""
    found = {}
    stack = list(body_nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "qvl.train":
            for a in node.names:
                if _train_module(a.name) is not None:
                    found[a.asname or a.name] = f"qvl.train.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("qvl.train.") and a.asname:
                    found[a.asname] = a.name
        stack.extend(ast.iter_child_nodes(node))
    return found


def _rebound(fn) -> set[str]:
    """Names a function binds other than by importing (arguments, assignments, loop targets)."""
    names = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qvl.train."):
            for a in node.names:
                if not _has(node.module, a.name):
                    bad.append(f"{where}:{node.lineno}: {node.module} has no {a.name}")
        if (isinstance(node, ast.Tuple) and len(node.elts) == 3
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts)
                and node.elts[1].value.startswith("qvl.train.")):
            module, attr = node.elts[1].value, node.elts[2].value
            if not _has(module, attr):
                bad.append(f"{where}:{node.lineno}: {module} has no {attr}")

    def visit(scope, names: dict[str, str]) -> None:
        body = scope.body if not isinstance(scope, ast.Lambda) else [scope.body]
        names = dict(names)
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in _rebound(scope):
                names.pop(n, None)
        names.update(_imports(body))
        stack = list(body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(node, names)
                continue
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names
                    and not _has(names[node.value.id], node.attr)):
                bad.append(f"{where}:{node.lineno}: {names[node.value.id]} has no {node.attr}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"
                    and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in names
                    and isinstance(node.args[1], ast.Constant)
                    and not _has(names[node.args[0].id], node.args[1].value)):
                bad.append(f"{where}:{node.lineno}: {names[node.args[0].id]} has no {node.args[1].value} (setattr)")
            stack.extend(ast.iter_child_nodes(node))

    visit(tree, {})
    return bad


def test_every_reference_to_a_train_module_attribute_exists():
    bad = [line for path in FILES for line in _problems(path)]
    assert not bad, "\n".join(bad)


def test_the_check_finds_a_missing_attribute(tmp_path):
    """The check itself: references to names that are not there are reported, under an import alias too; a name the
    function rebinds is not taken for the module."""
    probe = tmp_path / "probe.py"
    probe.write_text("from qvl.train import host as h\nfrom qvl.train.loss_head import no_such_name\n"
                     "def f(monkeypatch):\n    h.queue_host_read()\n    h.not_there()\n"
                     "    monkeypatch.setattr(h, 'missing', None)\n"
                     "def g():\n    h = object()\n    return h.anything\n")
    assert sorted(line.split(": ", 1)[1] for line in _problems(probe)) == [
        "qvl.train.host has no missing (setattr)", "qvl.train.host has no not_there",
        "qvl.train.loss_head has no no_such_name"]


def test_the_stages_share_only_fields_of_run():
    """``_train``'s stages hand state on in a :class:`qvl.train.loop.Run`: each ``run.X`` they read or set is one
    of its fields (a dataclass would take a new attribute silently, and most stages' branches need a GPU)."""
    import dataclasses

    from qvl.train.loop import Run

    fields = {f.name for f in dataclasses.fields(Run)}
    tree = ast.parse((ROOT / "src/qvl/train/loop.py").read_text())
    used = {(node.attr, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "run"}
    assert len(used) > 50
    assert not [f"loop.py:{line}: run.{attr}" for attr, line in sorted(used) if attr not in fields]
