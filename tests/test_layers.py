"""Each layer of the package imports only the layers below it, lazy imports included, and no
module imports itself back through others. The order is the README's layer list."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fol_infer"

# Bottom to top; modules of one row may import each other (a cycle is refused separately).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("fol_infer", "fol_infer.errors", "fol_infer.progress"),
    ("fol_infer.choices",),
    ("fol_infer.files",),
    ("fol_infer.model",),
    ("fol_infer.images", "fol_infer.positions", "fol_infer.loader"),
    ("fol_infer.bundle",),
    ("fol_infer.trt",),
    ("fol_infer.backends",),
    ("fol_infer.parity", "fol_infer.encoding"),
    ("fol_infer.rerank",),
    ("fol_infer.export",),
    ("fol_infer.index",),
    ("fol_infer.shard_set",),
    ("fol_infer.distributed",),
    ("fol_infer.pipeline",),
    ("fol_infer.outputs", "fol_infer.viz"),
    ("fol_infer.bench",),
    ("fol_infer.cli",),
)


def sources() -> dict[str, str]:
    """Every module of the package, by dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path.read_text()
    return found


def imports(source: str, modules: set[str]) -> set[str]:
    """The package modules `source` imports anywhere (top level, in functions, for types)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in modules}


def layer(module: str) -> int:
    """The row of `module`: its longest listed prefix."""
    best = -1, 0
    for row, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best[1]:
                best = row, len(name)
    assert best[0] >= 0, f"{module} is in no layer: add it to LAYERS and the README"
    return best[0]


def violations(modules: Mapping[str, str]) -> list[str]:
    """Imports that run up the layer order, and import cycles between modules."""
    names = set(modules)
    graph = {m: imports(src, names) - {m} for m, src in modules.items()}
    found = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in graph.items()
        for d in sorted(deps)
        if layer(d) > layer(m)
    ]
    return found + [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One path for each strongly connected group of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_every_import_runs_down_the_layers() -> None:
    assert violations(sources()) == []


def test_a_planted_upward_import_or_loop_is_caught() -> None:
    """The check itself: an upward lazy import, and a loop inside one layer, each named."""
    planted = dict(sources())
    planted["fol_infer.index.database"] += (
        "\n\ndef f():\n    from fol_infer.pipeline import Retriever\n"
    )
    planted["fol_infer.images"] += "\nimport fol_infer.loader\n"
    found = violations(planted)
    assert "fol_infer.index.database (layer 11) imports fol_infer.pipeline (layer 14)" in found
    assert any(v.startswith("import cycle:") and "fol_infer.loader" in v for v in found)


def test_the_readme_lists_the_layers_in_this_order() -> None:
    """The README's layer list (the code block after its "Each layer imports only layers
    below" sentence) names the same rows, in the same order."""
    readme = (PACKAGE.parent / "README.md").read_text()
    after = readme[readme.index("Each layer imports only layers below") :]
    block = after.split("```\n", 2)[1]
    listed = [line.split()[0] for line in block.splitlines() if line and not line[0].isspace()]
    rows = [row[0].removeprefix("fol_infer.") for row in LAYERS[1:]]
    names = [name.removesuffix(".py").removesuffix("/") for name in listed]
    assert names == ["errors", *rows], names
