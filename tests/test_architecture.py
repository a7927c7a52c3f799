"""The package's import graph, derived from the source with `ast`: no circle, no arrow from a lower layer to a higher
one, and the command line imported by nothing in the package.

Every import counts, including those inside functions (a lazy import is still a dependency) and relative ones
(resolved against the importing module). An import of a package (`from ..prune import masks`) is an arrow to the
package's module and, for each imported name that is a submodule, to that submodule.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "darkprune"

# The layer order of issue 13, lowest first: an import may point to the same or a lower rank only.
# The first matching prefix decides (longer prefixes first).
LAYER_RANKS = [
    ("darkprune.errors", 1),
    ("darkprune.util", 1),
    ("darkprune.darknet", 2),
    ("darkprune.engine", 3),
    ("darkprune.data", 4),
    ("darkprune.metrics", 4),
    ("darkprune.evaluate", 5),
    ("darkprune.detect", 5),
    ("darkprune.train", 6),
    ("darkprune.prune", 6),
    ("darkprune.compress", 6),
    ("darkprune.export", 6),
    ("darkprune.workflow", 7),
    ("darkprune.cli", 8),
    ("darkprune.__main__", 8),     # the `python -m darkprune` entry point: the command line's
    ("darkprune", 5),              # the public API (darkprune/__init__.py) may use layers 1 to 6 (lazily: see below)
]
# The public API binds train/prune functions lazily (`dp.finetune`, `dp.prune`): it sits at API level but may name
# layer-6 modules; nothing below it may import it.
PUBLIC_API_MAY_REACH = 6
# What the command line may import besides itself: the public API, the workflow, and the lowest layer's helpers.
CLI_MAY_IMPORT = ("darkprune", "darkprune.workflow", "darkprune.util", "darkprune.errors")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def rank(module: str) -> int:
    for prefix, value in LAYER_RANKS:
        if module == prefix or module.startswith(prefix + "."):
            return value
    raise AssertionError(f"{module}: not in any layer of LAYER_RANKS")


def _resolve(importer: str, is_package: bool, level: int, target: str | None) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The darkprune modules `name` imports (anywhere in the file)."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module) if node.level else node.module
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known and "." in target:
                target = target.rsplit(".", 1)[0]      # `import darkprune.prune.masks as m` -> the module itself
            if target in known and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def _parents(module: str) -> set[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first; those are not arrows of the importer's own."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (a list of modules, first == last), or None. Arrows to a module's own parent packages are
    left out: a package may re-export its submodules."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {m: WHITE for m in graph}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        colour[m] = GREY
        stack.append(m)
        for n in sorted(graph[m] - _parents(m)):
            if colour[n] == GREY:
                return stack[stack.index(n):] + [n]
            if colour[n] == WHITE:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        colour[m] = BLACK
        return None

    for m in sorted(graph):
        if colour[m] == WHITE:
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    # a known lazy import inside a function, a relative import, and a package-level import
    assert "darkprune.prune.analysis" in graph["darkprune.workflow.steps"]
    assert "darkprune.util.files" in graph["darkprune.darknet.cfg"]
    assert "darkprune.workflow.sweep" in graph["darkprune.cli.prune"]


def test_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = []
    for module, targets in sorted(import_graph().items()):
        mine = PUBLIC_API_MAY_REACH if module == "darkprune" else rank(module)
        for target in sorted(targets - _parents(module)):
            if rank(target) > mine:
                upward.append(f"{module} (layer {rank(module)}) imports {target} (layer {rank(target)})")
    assert not upward, "imports pointing up the layer order:\n" + "\n".join(upward)


def _in_cli(module: str) -> bool:
    return module == "darkprune.cli" or module.startswith("darkprune.cli.")


def test_nothing_in_the_package_imports_the_command_line():
    offenders = [f"{m} imports {t}" for m, targets in import_graph().items() for t in targets
                 if _in_cli(t) and not (_in_cli(m) or m == "darkprune.__main__")]
    assert not offenders, "\n".join(offenders)


def test_the_command_line_uses_the_public_api_and_the_workflow_only():
    offenders = []
    for module, targets in import_graph().items():
        if not _in_cli(module):
            continue
        for target in targets:
            if _in_cli(target):
                continue
            if not any(target == allowed or target.startswith(allowed + ".") and allowed != "darkprune"
                       for allowed in CLI_MAY_IMPORT):
                offenders.append(f"{module} imports {target}")
    assert not offenders, "\n".join(sorted(offenders))
