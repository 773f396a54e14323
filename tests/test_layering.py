"""The package's layering, declared once (`LAYERS`) and checked over its import graph.

Every module of `stepvideo_jax` belongs to the layer of its longest matching prefix in `LAYERS`; it
may import modules of its own layer or of a lower one, never of a higher one, and no set of modules
imports each other in a circle. Every import counts, also one inside a function. The graph is read
from the source with `ast` (nothing is imported), so the test is fast and needs no dependency.
"""
import ast
import functools
import pathlib

from tests import source_trees
from tests.fixtures import PROJECT_ROOT

# lowest first; a module may import its own layer and the layers listed before it
LAYERS = (
    ("base", ("stepvideo_jax.compile_cache", "stepvideo_jax.config_files", "stepvideo_jax.dtypes", "stepvideo_jax.hub", "stepvideo_jax.logs",
              "stepvideo_jax.paths")),
    ("sharding", ("stepvideo_jax.parallel",)),   # mesh, logical-axis rules, AOT helpers
    ("models", ("stepvideo_jax.models",)),
    ("text", ("stepvideo_jax.text",)),
    ("convert", ("stepvideo_jax.convert",)),
    ("checkpoints", ("stepvideo_jax.checkpoints",)),
    ("sampling", ("stepvideo_jax.sampling",)),
    ("data", ("stepvideo_jax.data", "stepvideo_jax.eval")),
    ("training", ("stepvideo_jax.training",)),
    ("demo", ("stepvideo_jax.demo",)),
    ("entry points", ("stepvideo_jax.generate", "stepvideo_jax.generate_eval", "stepvideo_jax.train",
                      "stepvideo_jax.train_dpo", "stepvideo_jax.serve", "stepvideo_jax.verify", "stepvideo_jax.export")),
)
OUTSIDE = ("bench", "launch", "tests", "configs")   # the package imports none of these


def _modules(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


@functools.lru_cache(maxsize=1)
def _trees() -> dict[pathlib.Path, ast.Module]:
    """Every file of the package and of launch/, parsed once (in a child interpreter: see source_trees)."""
    return source_trees.parse([*_modules(PROJECT_ROOT, "stepvideo_jax").values(),
                               *_modules(PROJECT_ROOT, "launch").values()])


def _tree(path: pathlib.Path) -> ast.Module:
    return _trees()[path]


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Every module name `path` imports (absolute; `from a import b` yields `a` and `a.b`)."""
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[:len(name.split(".")) - node.level + (path.name == "__init__.py")]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


@functools.lru_cache(maxsize=1)
def _graph():
    modules = _modules(PROJECT_ROOT, "stepvideo_jax")
    graph = {}
    for name, path in modules.items():
        imported = _imports(name, path)
        graph[name] = {m for m in imported if m in modules and m != name}
        outside = sorted(m for m in imported if m.split(".")[0] in OUTSIDE)
        assert not outside, f"{name} imports {outside}: the package never imports {OUTSIDE}"
    return graph


def _layer(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return -1 if best is None else best[0]   # the package's own __init__ sits below everything


def test_every_module_has_a_layer():
    unplaced = [m for m in _graph() if _layer(m) < 0 and m != "stepvideo_jax"]
    assert not unplaced, f"modules on no layer of LAYERS: {unplaced}"


def test_no_import_reaches_up_a_layer():
    up = [f"{a} ({LAYERS[_layer(a)][0]}) -> {b} ({LAYERS[_layer(b)][0]})"
          for a, deps in _graph().items() for b in sorted(deps) if _layer(b) > _layer(a)]
    assert not up, "imports from a higher layer:\n" + "\n".join(up)


def test_folders_are_layers():
    """Folders mirror the layering: every module of a subpackage sits on the subpackage's layer, so
    a folder never imports a higher folder (no module is placed on a layer apart from its folder)."""
    apart = [f"{m} ({LAYERS[_layer(m)][0]}) in {m.rsplit('.', 1)[0]} ({LAYERS[_layer(m.rsplit('.', 1)[0])][0]})"
             for m in _graph() if m.count(".") >= 2 and _layer(m) != _layer(m.rsplit(".", 1)[0])]
    assert not apart, "modules on another layer than their folder:\n" + "\n".join(apart)


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other: {cycles}"


def _function_imports(tree: ast.AST):
    """(import node, the `try` statements around it) for every import inside a function body."""
    found = []

    def visit(node, in_function, tries):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                found.append((child, tries))
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner, tries + [child] if isinstance(child, ast.Try) else tries)

    visit(tree, False, [])
    return found


def test_imports_inside_functions_say_why():
    """Imports sit at the top of their module. One inside a function (an optional or heavy
    dependency loaded only when needed) carries a comment saying why, on its line or on the line
    above its run of imports, or sits in a `try` that catches ImportError."""
    unexplained = []
    for name, path in _modules(PROJECT_ROOT, "stepvideo_jax").items():
        lines = path.read_text().splitlines()
        for node, tries in _function_imports(_tree(path)):
            if any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                   for t in tries for h in t.handlers):
                continue
            first = node.lineno - 1
            while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
                first -= 1
            if not any("#" in lines[i] for i in range(max(first - 1, 0), node.end_lineno)):
                unexplained.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unexplained, "imports inside functions without a comment saying why:\n" + "\n".join(unexplained)


def test_launch_does_not_import_bench():
    bad = []
    for name, path in _modules(PROJECT_ROOT, "launch").items():
        bad += [f"{name} -> {m}" for m in _imports(name, path) if m.split(".")[0] == "bench"]
    assert not bad, f"launch/ imports bench/: {bad}"
