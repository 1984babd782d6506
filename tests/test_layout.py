"""The package's layering, read from the source with ``ast`` (every import counts: those under
``TYPE_CHECKING`` and inside functions too): no import cycle among sieve_pl modules; a stage
imports no sibling stage beyond the shared modules and its own sub-parts
(``sieve_pl/stages/__init__.py`` declares both); only the Pruner's layers swap a model's modules.
"""
import ast
from pathlib import Path

import sieve_pl
from sieve_pl.stages import PARTS, SHARED

ROOT = Path(sieve_pl.__file__).parent


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (``pkg`` for ``pkg/__init__.py``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module
            else:  # from .x / ..x: relative to the importing module's package
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # import a.b.c -> the module a.b.c or a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def stage_violations(edges: dict[str, set[str]]) -> list[str]:
    """``stage -> sibling`` imports outside the shared modules and the stage's own parts."""
    prefix = "sieve_pl.stages."
    bad = []
    for name, targets in sorted(edges.items()):
        if not name.startswith(prefix):
            continue
        short = name[len(prefix):]
        allowed = set(SHARED) | set(PARTS.get(short, ()))
        for target in sorted(targets):
            if target.startswith(prefix) and target[len(prefix):] not in allowed:
                bad.append(f"{short} imports {target[len(prefix):]}")
    return bad


OWNERS = ("sieve_pl.models", "sieve_pl.units")  # the Pruner and the units it builds
SWAPS = {"set_submodule", "setattr", "register_module", "add_module"}


def module_swaps(root: Path = ROOT) -> list[str]:
    """Calls that put a module into a model (or set any attribute by name) outside the
    Pruner's layers: README's "only the Pruner changes which weights the model holds"."""
    bad = []
    for name, path in modules(root).items():
        if any(name == owner or name.startswith(owner + ".") for owner in OWNERS):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                called = (func.id if isinstance(func, ast.Name) else
                          func.attr if isinstance(func, ast.Attribute) else None)
                if called in SWAPS:
                    bad.append(f"{name}:{node.lineno} {called}")
    return bad


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_stages_import_no_sibling_stage():
    assert stage_violations(graph()) == []


def test_only_the_pruner_swaps_modules():
    assert module_swaps() == []


def test_declared_parts_and_shared_modules_exist():
    stages = {name.rpartition(".")[2] for name in modules() if name.startswith("sieve_pl.stages.")}
    declared = set(SHARED) | set(PARTS) | {part for parts in PARTS.values() for part in parts}
    assert declared <= stages


def test_the_checks_see_what_they_must(tmp_path):
    """A cycle through a TYPE_CHECKING import and a stage importing a sibling's helper inside
    a function are both caught."""
    pkg = tmp_path / "sieve_pl"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("")
    (pkg / "stages" / "search.py").write_text("from .genetic import GA\n")
    (pkg / "stages" / "genetic.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .search import Config\n")
    (pkg / "stages" / "refit.py").write_text("def f():\n    from .calibrate import reduce\n")
    (pkg / "stages" / "calibrate.py").write_text("from ..maths import reduce\n")
    (pkg / "maths.py").write_text("")
    (pkg / "stages" / "distill.py").write_text(
        "def teacher(net, m):\n    net.set_submodule('a', m)\n    setattr(net, 'b', m)\n")
    edges = graph(pkg)
    assert cycles(edges) == [["sieve_pl.stages.genetic", "sieve_pl.stages.search"]]
    assert "refit imports calibrate" in stage_violations(edges)
    assert edges["sieve_pl.stages.calibrate"] == {"sieve_pl.maths"}
    assert module_swaps(pkg) == ["sieve_pl.stages.distill:2 set_submodule",
                                 "sieve_pl.stages.distill:3 setattr"]


BENCH = ROOT.parent / "bench"


def bench_imports() -> dict[str, list[tuple[str, list[str]]]]:
    """Per bench script (``*.py``, and the Python inside ``*.sh``): every sieve_pl module it
    imports, with the names it takes from it."""
    found = {}
    for path in sorted(BENCH.glob("*.py")) + sorted(BENCH.glob("*.sh")):
        text = path.read_text()
        if path.suffix == ".sh":  # the heredocs' Python lines: the imports are what counts
            text = "\n".join(line for line in text.splitlines()
                             if line.startswith(("import sieve_pl", "from sieve_pl")))
        out = []
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.Import):
                out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "sieve_pl"]
            elif (isinstance(node, ast.ImportFrom) and node.level == 0
                  and node.module.split(".")[0] == "sieve_pl"):
                out.append((node.module, [a.name for a in node.names]))
        found[path.name] = out
    return found


def test_bench_uses_only_the_public_api():
    found = bench_imports()
    assert any(found.values()), "the bench scripts import sieve_pl"
    bad = {name: [m for m, _ in imported if m != "sieve_pl.api"]
           for name, imported in found.items()}
    assert {name: mods for name, mods in bad.items() if mods} == {}
    import sieve_pl.api as api

    taken = {n for imported in found.values() for _, names in imported for n in names}
    assert taken <= set(api.__all__), taken - set(api.__all__)
    assert all(hasattr(api, name) for name in api.__all__)
    assert sorted(api.__all__) == sorted(set(api.__all__))
