"""The code layout the README's "Code layout" paragraph promises: no stage imports another stage, the
package's import graph has no cycle (imports inside functions count), every stage input is declared."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tokalign"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The tokalign modules ``name`` imports anywhere in its file (top level, functions, ``if __name__`` blocks)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # from pkg import module
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: _imports(n, p, known) - {"tokalign", "tokalign.stages"} for n, p in mods.items()}


def test_the_parser_sees_imports_inside_functions():
    g = _graph()
    assert "tokalign.pipeline" in g["tokalign.__main__"]  # imported inside main_task
    assert "tokalign.stages.train" in g["tokalign.pipeline"]  # from tokalign.stages import ..., train


def test_no_stage_imports_another_stage():
    bad = {n: sorted(d for d in deps if d.startswith("tokalign.stages."))
           for n, deps in _graph().items() if n.startswith("tokalign.stages.")}
    assert not {n: d for n, d in bad.items() if d}, bad


def test_no_stage_imports_the_pipeline_or_the_app():
    bad = {n: sorted(deps & {"tokalign.pipeline", "tokalign.__main__"})
           for n, deps in _graph().items() if n.startswith("tokalign.stages.")}
    assert not {n: d for n, d in bad.items() if d}, bad


def test_the_import_graph_has_no_cycle():
    g = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in sorted(g[n]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [n, d]))
            if d not in state:
                visit(d, path + [n])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [])


def _stage_reads(path: Path) -> set[str]:
    """Stage names a module passes to ``ctx.path`` / ``ctx.has`` / a ``_need(ctx, name)`` helper as literals
    (f-strings like ``f"train_{n}"`` count with their constant parts, ``train_*``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        is_ctx = isinstance(f, ast.Attribute) and f.attr in ("path", "has") and isinstance(f.value, ast.Name) \
            and f.value.id == "ctx"
        is_need = isinstance(f, ast.Name) and f.id == "_need"
        if not (is_ctx or is_need) or not node.args:
            continue
        arg = node.args[-1]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            names.add(arg.value)
        elif isinstance(arg, ast.JoinedStr):
            names.add("".join(v.value if isinstance(v, ast.Constant) else "*" for v in arg.values))
    return names


def test_every_input_a_stage_module_reads_is_declared_in_STAGES():
    import fnmatch

    from tokalign.pipeline import STAGES

    declared: dict[str, set[str]] = {}
    for st in STAGES:
        fn = getattr(st.run, "__wrapped__", st.run)
        declared.setdefault(fn.__module__, set()).update(st.inputs)
    assert len(declared) >= 9
    undeclared = {}
    for module, inputs in declared.items():
        reads = _stage_reads(PKG.parent / (module.replace(".", "/") + ".py"))
        bad = sorted(r for r in reads if not any(fnmatch.fnmatch(i, r) for i in inputs))
        if bad:
            undeclared[module] = bad
    assert not undeclared, undeclared
