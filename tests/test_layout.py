"""The layout's rules, read from the source: the library imports neither Prefect nor MLflow, and no two project
modules import each other at module level, directly or through others."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("llama", "tasks", "flows")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _top_level_imports(path: Path) -> set[str]:
    """Modules named by the import statements at module level (not inside functions)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_imports_neither_prefect_nor_mlflow():
    for name, path in _modules().items():
        if name.startswith("llama"):
            source = path.read_text(encoding="utf-8")
            imports = {node for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))}
            named = {alias.name for node in imports for alias in node.names} | \
                {node.module for node in imports if isinstance(node, ast.ImportFrom) and node.module}
            assert not {n for n in named if n.split(".")[0] in ("prefect", "mlflow")}, name


def test_no_import_cycle_among_project_modules():
    modules = _modules()
    graph = {name: {imported for imported in _top_level_imports(path) if imported in modules and imported != name}
             for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            assert state.get(imported) != "open", " -> ".join([*trail, name, imported])
            if imported not in state:
                visit(imported, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


# What a module may import inside a function rather than at its top, so that importing the library, `--help`
# and the Prefect flow process stay light (llama/__init__.py): these libraries, and project modules that
# import them at module level, directly or through others; anything else only with its reason on the line
# (`# deferred: why`).
HEAVY = {"mindspore", "torch", "transformers", "gguf", "tokenizers", "sentencepiece", "pyarrow", "fastchat",
         "matplotlib", "mlflow", "prefect", "pydantic"}


def _function_imports(path: Path) -> list[tuple[int, str]]:
    source = path.read_text(encoding="utf-8")
    lines, found = source.splitlines(), []
    for function in ast.walk(ast.parse(source)):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and "# deferred: " in lines[node.lineno - 1]:
                    continue
                if isinstance(node, ast.Import):
                    found += [(node.lineno, alias.name) for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.append((node.lineno, node.module))
    return found


def test_imports_inside_functions_only_defer_heavy_libraries():
    modules = _modules()
    graph = {name: _top_level_imports(path) for name, path in modules.items()}
    heavy: dict[str, bool] = {}

    def is_heavy(name: str) -> bool:
        if name.split(".")[0] in HEAVY:
            return True
        if name not in modules:
            return False
        if name not in heavy:
            heavy[name] = False   # while visiting: cycles are test_no_import_cycle_among_project_modules' job
            heavy[name] = any(is_heavy(imported) for imported in graph[name])
        return heavy[name]

    light = [f"{path.relative_to(REPO)}:{line} {imported}" for name, path in modules.items()
             for line, imported in _function_imports(path) if not is_heavy(imported)]
    assert not light, "import these at module level:\n" + "\n".join(light)
