"""Line budget for the package: no source file under darkprune/ over 800 lines, no function over 80 lines.

Numba kernels are exempt from the function budget: a kernel is written out (unrolled taps, one loop per phase) on
purpose, because splitting it would cost speed. A kernel is a function decorated with one of numba's compiling
decorators, however it is spelled: `@njit`, `@njit(...)`, `@numba.njit`, `@nb.jit(...)`, an imported alias
(`from numba import njit as fast`), or a module-level alias of a configured decorator (`kernel = njit(cache=True)`,
then `@kernel`). Functions defined inside a kernel (an `@overload`'s implementation) are part of it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "darkprune"
MAX_FILE_LINES = 800
MAX_FUNCTION_LINES = 80
NUMBA_DECORATORS = {"njit", "jit", "vectorize", "guvectorize", "stencil", "cfunc", "generated_jit", "overload",
                    "overload_method", "register_jitable"}
NUMBA_MODULES = ("numba", "numba.extending", "numba.np.ufunc")

# "module:function" (dotted module under darkprune, function or Class.method) -> why it may be longer.
EXCEPTIONS: dict[str, str] = {}


def _numba_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(names that are numba decorators in this module, names bound to the numba module itself)."""
    decorators: set[str] = set()
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in NUMBA_MODULES:
                    modules.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module in NUMBA_MODULES:
            for alias in node.names:
                if alias.name in NUMBA_DECORATORS:
                    decorators.add(alias.asname or alias.name)
    # module-level aliases, e.g. `kernel = njit(cache=True)` or `fast = numba.njit`
    for node in tree.body:
        if isinstance(node, ast.Assign) and _is_numba(node.value, decorators, modules):
            decorators.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return decorators, modules


def _is_numba(expr: ast.expr, decorators: set[str], modules: set[str]) -> bool:
    if isinstance(expr, ast.Call):
        expr = expr.func
    if isinstance(expr, ast.Name):
        return expr.id in decorators
    if isinstance(expr, ast.Attribute) and expr.attr in NUMBA_DECORATORS:
        root = expr.value
        while isinstance(root, ast.Attribute):
            root = root.value
        return isinstance(root, ast.Name) and root.id in modules
    return False


def _long_functions(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length) of every non-kernel function over the budget in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    decorators, modules = _numba_names(tree)
    found: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(_is_numba(d, decorators, modules) for d in child.decorator_list):
                    continue
                start = min([d.lineno for d in child.decorator_list] + [child.lineno])
                length = child.end_lineno - start + 1
                if length > MAX_FUNCTION_LINES:
                    found.append((f"{prefix}{child.name}", child.lineno, length))
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_package_has_sources():
    assert len(_sources()) > 20, f"no darkprune sources found under {PACKAGE}"


def test_no_source_file_over_budget():
    offenders = []
    for path in _sources():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            offenders.append(f"{path.relative_to(PACKAGE.parent)}: {lines} lines")
    assert not offenders, f"source files over {MAX_FILE_LINES} lines (split them by concern):\n" + "\n".join(offenders)


def test_no_function_over_budget():
    offenders = []
    seen = set()
    for path in _sources():
        module = _module_name(path)
        for name, line, length in _long_functions(path):
            key = f"{module}:{name}"
            seen.add(key)
            if key not in EXCEPTIONS:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} {name}: {length} lines")
    assert not offenders, (f"functions over {MAX_FUNCTION_LINES} lines outside numba kernels (split them, or add "
                           f"'module:function' to EXCEPTIONS with a reason):\n" + "\n".join(offenders))
    stale = sorted(set(EXCEPTIONS) - seen)
    assert not stale, f"EXCEPTIONS that are no longer over the budget (remove them): {stale}"


@pytest.mark.parametrize("source, expected", [
    ("from numba import njit\n@njit(cache=True)\ndef k(x):\n" + "    x += 1\n" * 90, []),
    ("import numba as nb\n@nb.njit\ndef k(x):\n" + "    x += 1\n" * 90, []),
    ("from numba import njit\nkernel = njit(cache=True, fastmath=True)\n@kernel\ndef k(x):\n" + "    x += 1\n" * 90,
     []),
    ("from numba.extending import overload\n@overload(len)\ndef o(x):\n    def impl(x):\n" + "        x += 1\n" * 90
     + "    return impl\n", []),
    ("def f(x):\n" + "    x += 1\n" * 90, ["f"]),
    ("class C:\n    def m(self):\n" + "        pass\n" * 90, ["C.m"]),
    ("import functools\n@functools.lru_cache\ndef f(x):\n" + "    x += 1\n" * 79, ["f"]),
    ("def f(x):\n" + "    x += 1\n" * 79, []),
])
def test_budget_checker_tells_kernels_from_functions(tmp_path, source, expected):
    """The checker itself: kernels are exempt however they are decorated; other functions are counted from their
    first decorator to their last line."""
    path = tmp_path / "sample.py"
    path.write_text(source)
    assert [name for name, _, _ in _long_functions(path)] == expected
