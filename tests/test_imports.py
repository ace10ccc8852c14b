"""The package's modules import one another without circles (imports at any depth, read from the
source with ast: a function-level import that dodges a circle at run time still counts)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distcls"


def module_imports(package: Path = PACKAGE, packages_too: bool = False) -> dict:
    """{module: the package's modules it imports}; a package's __init__ is not an edge target
    (importing `distcls.data.x` runs `distcls.data`'s __init__, which is no module's internals),
    unless `packages_too` (what a module takes from a package's __init__ counts as that package)."""
    files = {}
    for f in package.rglob("*.py"):
        parts = f.relative_to(package.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    edges = {}
    for name, f in files.items():
        base = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = (
                    ".".join(
                        base.split(".")[: len(base.split(".")) - node.level + 1]
                        + ([node.module] if node.module else [])
                    )
                    if node.level
                    else node.module or ""
                )
                targets |= {module} | {f"{module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        edges[name] = {
            t for t in targets if t in files and t != name and (packages_too or files[t].name != "__init__.py")
        }
    return edges


def circles(edges: dict) -> list:
    """Every cycle found by a depth-first search, as a sorted list of its modules."""
    state, stack, found = {}, [], set()

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == "open":
                found.add(tuple(sorted(set(stack[stack.index(v):]))))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)
    return sorted(found)


def test_the_detector_finds_a_circle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.a import x\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "sub" / "b.py").write_text("from pkg.sub.a import f\n")
    (pkg / "c.py").write_text("import pkg.sub.a\n")
    assert circles(module_imports(pkg)) == [("pkg.sub.a", "pkg.sub.b")]


def test_no_import_circles_between_the_packages_modules():
    edges = module_imports()
    # the graph is read
    assert "distcls.run.runner" in edges and "distcls.run.components" in edges["distcls.run.runner"]
    assert circles(edges) == []


# The tree's layers, in the order data flows (a module imports only from its own layer or those before it):
# the contracts, the process's runtime, data, models, the engine, checkpoints and tracking, one run, the commands.
LAYERS = [
    {"config", "errors", "spec", "cli"},
    {"runtime"},
    {"data"},
    {"models"},
    {"engine"},
    {"checkpoint", "tracking"},
    {"run"},
    {"train", "evaluate", "predict", "export", "plot", "shard"},
    {"bench"},
]
TOP_LEVEL = {"cli", "config", "errors", "spec", "train", "evaluate", "predict", "export", "plot", "shard"}


def _layer(module: str) -> int:
    if "." not in module:
        return 0  # distcls itself
    part = module.split(".")[1]
    layer = next((i for i, names in enumerate(LAYERS) if part in names), None)
    assert layer is not None, f"{module}: give its package or module a layer in tests/test_imports.py's LAYERS"
    return layer


def test_data_flows_one_way_through_the_layers():
    against = [
        f"{m} -> {t}"
        for m, targets in module_imports(packages_too=True).items()
        for t in targets
        if _layer(t) > _layer(m)
    ]
    assert against == []


def test_the_top_level_holds_only_the_commands_and_the_contracts():
    modules = {f.stem for f in PACKAGE.glob("*.py") if f.name != "__init__.py"}
    assert modules == TOP_LEVEL and len(modules) <= 11
    packages = {d.name for d in PACKAGE.iterdir() if (d / "__init__.py").is_file()}
    assert packages == {"runtime", "data", "models", "engine", "checkpoint", "tracking", "run", "bench"}
