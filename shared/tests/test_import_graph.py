"""The shape of model_service's imports: no cycle among its modules (counting the imports
under `if TYPE_CHECKING:` and inside functions), and the HTTP layer and the submitter
import no ComfyUI code (an engine's custom input reaches them through its spec)."""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import model_service

ROOT = Path(model_service.__file__).parent
PACKAGE = "model_service"
# import nothing from model_service.comfy: the HTTP layer and the submitter
ENGINE_FREE = ("model_service.api", "model_service.submit")
ENGINE_CODE = "model_service.comfy"


def module_files() -> dict[str, tuple[Path, bool]]:
    """Every module: name -> (file, is a package's __init__)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = module_files()


def _known(name: str) -> str | None:
    """The module `name` is, or is in (`a.b.func` -> `a.b`); None outside ours."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every name an import anywhere in `tree` reaches, resolved to our modules."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            # `from a import b`: the submodule a.b, or a name in a
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _known(name)
            if target is None:
                continue
            yield target
            # importing a.b.c runs a/__init__ and a/b/__init__ first (unless inside them)
            parent = target.rpartition(".")[0]
            while parent != PACKAGE and parent:
                if not module.startswith(parent + ".") and module != parent:
                    yield parent
                parent = parent.rpartition(".")[0]


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, (path, is_package) in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = set(_imported(tree, module, is_package)) - {module}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            step = next(edges, None)
            if step is not None:
                if step not in index:
                    index[step] = low[step] = len(index)
                    stack.append(step)
                    on_stack.add(step)
                    work.append((step, iter(sorted(graph[step]))))
                elif step in on_stack:
                    low[node] = min(low[node], index[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle through the component's first module: a -> b -> ... -> a."""
    members = set(component)
    start = component[0]
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for step in sorted(graph[node] & members):
            if step == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if step not in came_from:
                came_from[step] = node
                queue.append(step)
    raise AssertionError(f"no cycle in {component}")


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "model_service.jobs.status" in graph["model_service.jobs.record"]
    # inside a function (api.app builds a fleet's parts only when QUEUE_URL is set)
    assert "model_service.fleet.source" in graph["model_service.api.app"]
    # under TYPE_CHECKING
    assert "model_service.background" in graph["model_service.jobs.events"]
    # a package's __init__ runs first: `from model_service.jobs.events import ...`
    assert "model_service.jobs" in graph["model_service.runner"]
    # `from model_service import media`: the submodule
    assert "model_service.media" in graph["model_service.submit"]


def test_the_cycle_finder_finds_and_names_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    components = strongly_connected(graph)
    assert components == [["a", "b", "c"]]
    assert a_cycle(graph, components[0]) == ["a", "b", "c", "a"]


def test_no_import_cycle() -> None:
    graph = import_graph()
    cycles = [
        f"{' -> '.join(a_cycle(graph, c))} (all of {', '.join(c)})"
        for c in strongly_connected(graph)
    ]
    assert not cycles, "import cycles among model_service modules:\n" + "\n".join(cycles)


def test_the_http_layer_and_the_submitter_import_no_comfyui_code() -> None:
    graph = import_graph()
    wrong = sorted(
        (module, target)
        for module, targets in graph.items()
        if _within(module, ENGINE_FREE)
        for target in targets
        if _within(target, (ENGINE_CODE,))
    )
    assert not wrong, f"ComfyUI code imported by the HTTP layer or the submitter: {wrong}"
