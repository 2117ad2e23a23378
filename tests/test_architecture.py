"""The shape of the package (docs/architecture.md): no import cycles, no private names across
modules, and imports only in the layer direction.

Layers, highest first; a module may import from its own layer or any lower one, never a higher one:

    5  cli         selfmtp.cli.*, selfmtp.__main__
    4  demo        selfmtp.demo, selfmtp.demo_real
    3  apps        selfmtp.evaluation.*, selfmtp.serving.*, selfmtp.training.*
    5  assets      selfmtp.assets.* (custom_generate/generate.py beside the packaged models: run by transformers)
    2  api         selfmtp.api (MTPModel: load a model and generate; evaluation builds on it), selfmtp.hf.*
    1  decoding    selfmtp.decoding.*, selfmtp.tasks.* (the tiny-gsm task and its teacher)
    0  models      selfmtp.models.*
   -1  shared      selfmtp (the package), selfmtp.errors, selfmtp.files, selfmtp.jsonl, selfmtp.progress:
                   leaves every layer may import; they import only each other

Every import counts, also one inside a function or under `if TYPE_CHECKING:`: a deferred import
hides a circle from Python, not from a reader. The checks parse the source (ast); nothing is
imported. Each check is also run on a small package with the defect planted, so it can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "selfmtp"

LAYERS = {  # module or package -> layer; a module not listed takes the layer of its package
    "selfmtp.cli": 5,
    "selfmtp.__main__": 5,
    "selfmtp.demo": 4,
    "selfmtp.demo_real": 4,
    "selfmtp.evaluation": 3,
    "selfmtp.serving": 3,
    "selfmtp.training": 3,
    "selfmtp.assets": 5,  # the shipped custom_generate/generate.py files: run by transformers, import selfmtp.hf
    "selfmtp.api": 2,
    "selfmtp.hf": 2,  # plain transformers: generate contract over decoding, export over models
    "selfmtp.decoding": 1,
    "selfmtp.tasks": 1,
    "selfmtp.models": 0,
    "selfmtp": -1,
    "selfmtp.errors": -1,
    "selfmtp.files": -1,
    "selfmtp.jsonl": -1,
    "selfmtp.progress": -1,
}
SHARED = -1


def modules(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__)."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _owner(name: str, known) -> str | None:
    """The module `name` lives in: itself if it is a module, else its longest known prefix."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports(package_dir: Path) -> tuple[dict[str, set[str]], list[str]]:
    """-> (module -> the package's modules it imports, one line per cross-module private name).

    A private name is one starting with `_` (dunders are not): imported from another module, or
    read off another module as an attribute (`loading._helper`)."""
    known = modules(package_dir)
    top = package_dir.name
    graph, private = {}, []
    for module, (path, is_package) in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        here = module if is_package else module.rpartition(".")[0]
        targets, aliases = set(), {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == top:
                        targets.add(_owner(alias.name, known))
                        if alias.asname:
                            aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here
                    for _ in range(node.level - 1):
                        parent = parent.rpartition(".")[0]
                    base = f"{parent}.{base}" if base else parent
                if base.split(".")[0] != top:
                    continue
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    if submodule in known:
                        targets.add(submodule)
                        aliases[alias.asname or alias.name] = submodule
                        continue
                    source = _owner(base, known)
                    targets.add(source)
                    if is_private(alias.name) and source != module:
                        private.append(f"{module}: from {source} import {alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and is_private(node.attr) and aliases[node.value.id] != module):  # fmt: skip
                private.append(f"{module}: {aliases[node.value.id]}.{node.attr}")
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph, sorted(set(private))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every set of modules that import each other round a circle (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer(module: str, layers: dict[str, int]) -> int | None:
    """The layer of `module` itself, or of the longest listed prefix below the top package (the
    package itself is a shared leaf, not a catch-all: a new top-level module must be placed)."""
    name = module
    while "." in name or name == module:
        if name in layers:
            return layers[name]
        name = name.rpartition(".")[0]
    return None


def against_layers(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Imports of a higher layer, imports by a shared leaf of anything not shared, and modules with no layer."""
    wrong = []
    for module, targets in sorted(graph.items()):
        own = layer(module, layers)
        if own is None:
            wrong.append(f"{module}: in no layer (add it to the table here and in docs/architecture.md)")
            continue
        for target in sorted(targets):
            theirs = layer(target, layers)
            if theirs is None or theirs == SHARED:
                continue  # reported as a module of its own / shared leaves are allowed everywhere
            if own == SHARED or theirs > own:
                wrong.append(f"{module} (layer {own}) imports {target} (layer {theirs})")
    return wrong


@pytest.fixture(scope="module")
def package_imports():
    return imports(PACKAGE)


def test_no_import_cycles(package_imports):
    graph, _ = package_imports
    assert "selfmtp.decoding.loop" in graph and graph["selfmtp.decoding.loop"]  # the parse found the imports
    assert cycles(graph) == []


def test_no_module_imports_a_private_name_of_another(package_imports):
    _, private = package_imports
    assert private == []


def test_imports_follow_the_layers(package_imports):
    graph, _ = package_imports
    assert against_layers(graph, LAYERS) == []


def test_benchmarks_use_no_private_names():
    """The tools in benchmarks/ use the package's public names only (a script that needs a private
    helper is asking for it to become public, or for a subcommand)."""
    found = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("selfmtp"):
                found += [f"{path.name}: from {node.module} import {a.name}" for a in node.names if is_private(a.name)]
    assert found == []


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "pkg"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def test_the_checks_find_planted_defects(tmp_path):
    """A cycle through a deferred import, a private name (imported and read as an attribute), a
    relative import and an import against the layers are all reported."""
    package = _plant(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "def f():\n    from pkg.low.b import g\n",
        "low/b.py": "from .a import f\nfrom pkg.top import _secret\n",
        "high.py": "from pkg.low import a\nx = a._hidden\n",
        "top.py": "_secret = 1\n",
        "leaf.py": "from pkg import high\n",
    })  # fmt: skip
    graph, private = imports(package)
    assert graph["pkg.low.a"] == {"pkg.low.b"} and graph["pkg.low.b"] == {"pkg.low.a", "pkg.top"}
    assert cycles(graph) == [["pkg.low.a", "pkg.low.b"]]
    assert private == ["pkg.high: pkg.low.a._hidden", "pkg.low.b: from pkg.top import _secret"]
    layers = {"pkg": -1, "pkg.low": 0, "pkg.high": 1, "pkg.top": 1}
    assert against_layers(graph, layers) == [
        "pkg.leaf: in no layer (add it to the table here and in docs/architecture.md)",
        "pkg.low.b (layer 0) imports pkg.top (layer 1)",
    ]
    assert against_layers(graph, layers | {"pkg.leaf": -1}) == [
        "pkg.leaf (layer -1) imports pkg.high (layer 1)",
        "pkg.low.b (layer 0) imports pkg.top (layer 1)",
    ]
