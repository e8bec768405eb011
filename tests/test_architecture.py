"""The rule docs/architecture.md keeps: imports point down the data flow, data -> model -> training -> output,
and no two modules import each other. Read from the source (every import, inside functions too), so an arrow
that climbs fails here before a reader has to find it."""

import ast
from pathlib import Path

from conftest import ROOT

LAYERS = ["data", "model", "training", "output"]  # a module may import its own layer and the ones before it
SHARED = {"macrid.config", "macrid.errors", "macrid.cluster", "macrid.names"}  # below every layer: they import no layer


def imports_of(path: Path) -> set[str]:
    """Every macrid module `path` imports (a `from macrid.x import y` names macrid.x.y when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("macrid")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("macrid") and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if module_path(sub).exists() else node.module)
    return found


def module_path(name: str) -> Path:
    base = ROOT / Path(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in (ROOT / "macrid").rglob("*.py")
            if p.name != "__init__.py"}


def layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else None


def test_every_import_points_down_the_data_flow():
    climbing = []
    for name, path in modules().items():
        for target in imports_of(path):
            if name in SHARED and target not in SHARED:
                climbing.append(f"{name} -> {target} (a shared module imports no layer)")
            mine, theirs = layer(name), layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                climbing.append(f"{name} ({LAYERS[mine]}) -> {target} ({LAYERS[theirs]})")
    assert not climbing, "imports that climb the data flow:\n" + "\n".join(sorted(climbing))


def test_no_two_modules_import_each_other():
    graph = {name: {t for t in imports_of(path) if t in modules()} for name, path in modules().items()}
    circles = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph.get(b, ())})
    assert not circles, f"modules that import each other: {circles}"


def test_the_checker_sees_a_climbing_import_inside_a_function(tmp_path):
    """The rule's own check: an import hidden in a function body is found, and named with its layers."""
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from macrid.output.export import export\n    return export\n")
    assert imports_of(fake) == {"macrid.output.export"}  # the module, not the function it names
    assert layer("macrid.data.lake") == 0 and layer("macrid.output.export") == 3 and layer("macrid.config") is None
