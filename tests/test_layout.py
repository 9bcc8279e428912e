"""The package's shape: every module says what it holds, imports form no circle, and the pieces the redesign
put in one place stay defined once."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distpddm"


def _modules() -> dict[str, Path]:
    def name(path: Path) -> str:
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    return {name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _typing_only(tree: ast.Module) -> set[int]:
    """Ids of the import nodes under ``if TYPE_CHECKING:`` (annotations, not run-time dependencies)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body (inside functions too: a lazy import
    is still a dependency)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        skip = _typing_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                names = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[module] |= {n for n in names if n in modules and n != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_circle_of_imports_inside_the_package():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_a_lazy_circle():
    """The check can fail: a function-level import back into a module that imports it is a circle."""
    graph = import_graph()
    graph["distpddm.dist"] = graph["distpddm.dist"] | {"distpddm.train.trainer"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "distpddm.dist" in cycle


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_evaluation_does_not_import_the_trainer():
    """Not directly, nor through anything it imports."""
    graph = import_graph()
    for module in ("distpddm.evaluate", "distpddm.validation", "distpddm.ray_cluster"):
        assert not {m for m in _reach(graph, module) if m.startswith("distpddm.train")}, module


def test_every_module_says_what_it_holds():
    for module, path in _modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.split()) >= 5, f"{module} has no docstring saying what it holds"


def _definitions(name: str) -> list[str]:
    found = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                found.append(module)
    return found


def _calls(name: str) -> list[str]:
    found = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == name:
                found.append(module)
    return found


def test_the_shared_pieces_are_defined_once():
    """rank / world, the padded gather, device choice, connect_ray: one definition each; TorchTrainer is built
    in one function, used by training and evaluation alike."""
    for name, home in (
        ("rank_and_world", "distpddm.dist"),
        ("all_gather_rows", "distpddm.dist"),
        ("init_device", "distpddm.dist"),
        ("device_time", "distpddm.dist"),
        ("agree", "distpddm.dist"),
        ("as_pool", "distpddm.pool"),
        ("connect_ray", "distpddm.ray_cluster"),
        ("torch_trainer", "distpddm.ray_cluster"),
    ):
        assert _definitions(name) == [home], (name, _definitions(name))
    assert _calls("TorchTrainer") == ["distpddm.ray_cluster"]
    assert _calls("set_device") == ["distpddm.dist"]  # torch.cuda.set_device: device choice in one place
    assert _calls("synchronize") == ["distpddm.dist"]  # torch.cuda.synchronize: timing in one place
    assert {"distpddm.train.launch", "distpddm.evaluate"} <= set(_calls("torch_trainer"))


def test_no_function_of_the_trainer_package_is_over_90_lines():
    for module, path in _modules().items():
        if not module.startswith("distpddm.train"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 90, f"{module}.{node.name} is {length} lines"
