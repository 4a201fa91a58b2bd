"""The library's shape: subpackages by layer, no import circles, no orchestrator names, short functions.

Every import in `dapo_ops` counts, those inside function bodies and under `if TYPE_CHECKING:` included.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dapo_ops"
FORBIDDEN = ("dagster", "pipelines")
MAX_FUNCTION_LINES = 100


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), filename=str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Every `dapo_ops` module this module imports (a `from pkg import mod` names the module itself)."""
    is_package = (PACKAGE / module.replace("dapo_ops.", "", 1).replace(".", "/") / "__init__.py").exists() \
        if module != "dapo_ops" else True
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, is_package)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known)
    return {name for name in found if name in known and name != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, tree, known) for name, tree in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else None


def test_no_import_circle_between_modules():
    graph = {m: {d for d in deps if m != "dapo_ops" and d != "dapo_ops"} for m, deps in _graph().items()}
    # A package's own __init__ re-exports its modules lazily; it is not a dependency of them.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph) or [])}"


def test_no_import_circle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        sub = _subpackage(module)
        if sub is None:
            continue
        graph.setdefault(sub, set()).update(
            d for d in (_subpackage(dep) for dep in deps) if d is not None and d != sub)
    assert _cycle(graph) is None, f"subpackage circle: {' -> '.join(_cycle(graph) or [])}"


def _string_constants(tree: ast.Module) -> list[tuple[int, str]]:
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_library_names_no_orchestrator():
    offences = []
    for module, tree in _modules().items():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offences += [f"{module}: imports {n}" for n in names if n.split(".")[0] in FORBIDDEN]
        for line, value in _string_constants(tree):
            words = value.replace("/", ".").replace(":", ".").split()
            offences += [f"{module}:{line}: string names {w!r}" for w in words
                         if any(w.split(".")[0].strip("'\"`(") == f for f in FORBIDDEN)]
    assert not offences, "\n".join(offences)


def test_no_function_longer_than_the_limit():
    long = [f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for module, tree in _modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc and len(doc.split()) >= 25, f"{init}: docstring must say what it owns and may import"


@pytest.mark.parametrize("name", ["load_mc_dataset", "policy_loss", "group_advantages", "mc_idx_reward",
                                  "think_format_reward", "teacher_forced_pass", "policy_update", "make_optimizer",
                                  "build_embedded_policy", "encode_prompts", "generate_rollouts",
                                  "metrics_from_attention_weights"])
def test_public_api_importable_from_the_package(name):
    assert callable(getattr(importlib.import_module("dapo_ops"), name))


def test_importing_one_subpackage_loads_only_its_dependencies():
    code = ("import sys; import dapo_ops.rl.advantages; "
            "print(sorted(m for m in sys.modules if m.startswith('dapo_ops.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    loaded = eval(out)  # noqa: S307 - our own subprocess' list literal
    assert not [m for m in loaded if m.split(".")[1] in {"attention", "run", "tracking", "distributed", "train"}], loaded


def test_loading_the_dagster_definitions_imports_neither_torch_nor_transformers():
    """`make ui`'s code server and `dagster definitions validate` load the definitions; the assets import the
    heavy libraries as they run."""
    code = ("import sys; import pipelines.definitions; "
            "print(sorted(m for m in ('torch', 'transformers', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
