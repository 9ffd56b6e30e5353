"""Layering with no exceptions (ARCHITECTURE.md): the import graph of medadv/ has no circle and no import
that runs back up the layer order. Built statically with ``ast`` from every import statement, including
those inside functions and under ``if TYPE_CHECKING`` (a lazy import is still a dependency, and a
deferred one is how a circle hides), so a new import that breaks the order fails here.

The order, low to high (a module may import its own layer and any lower one):

    base utilities (errors, io, runinfo, progress, strictjson, cache, dist, db, results, allocator)
    < data < tasks, kinds (task kinds), metrics, provenance (the data gate) < models < attacks < defenses < evaluate < report
    < budget < study, defense_study, plans < jobs < serve < cli

Attacks sit below defenses because the defenses use them (adversarial training crafts with the attacks'
loop, BPDA and the detectors' adaptive attack wrap it); ``budget`` prices a study's plan from the attack
registry and the battery, and the study hands it what it needs (so neither imports the other).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "medadv"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "io", "runinfo", "progress", "strictjson", "cache", "dist", "db", "results", "allocator"),  # results: typed records
    ("data",),
    ("tasks", "kinds", "metrics", "provenance"),
    ("models",),
    ("attacks",),
    ("defenses",),
    ("evaluate",),
    ("report",),
    ("budget", "defense_budget"),  # time budgets: the attack studies' and the defenses study's pricing
    ("study", "defense_study", "plans"),  # plans: the studies' plan files and their loader
    ("jobs",),  # one function per command, over the studies; the service and the CLI call them
    ("serve",),
    ("cli", "__main__"),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}

# Known violations, each with why it is tolerated and who removes it: (importer, imported) -> reason.
# Temporary entries only; an entry whose import is gone fails the test, so the list cannot go stale.
# (models/train.py used to import medadv.defenses.training; the training job now hands the adversarial
# loss in as a callable, so that entry has been removed.)
ALLOWED: dict[tuple[str, str], str] = {}  # no exception today


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: dict[str, Path], root: Path = REPO) -> set[str]:
    """The medadv modules ``path`` imports anywhere in its body (``from medadv import dist`` -> medadv.dist)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "medadv"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "medadv":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            out |= set(subs) if len(subs) == len(node.names) else {mod, *subs}
    out.discard(name)
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def layer(module: str) -> str | None:
    """The top-level part of medadv a module belongs to (``medadv.attacks.pgd`` -> ``attacks``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the root package (only __version__)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_part_of_medadv_has_a_layer():
    parts = {layer(m) for m in modules()} - {None}
    missing = sorted(parts - set(RANK))
    assert not missing, f"give {missing} a place in LAYERS (tests/test_layering.py) and ARCHITECTURE.md"


def test_the_import_graph_has_no_circle():
    g = graph()
    found = [c for c in cycles(g) if not all((a, b) in ALLOWED for a in c for b in c if b in g[a])]
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_import_runs_back_up_the_layers():
    g = graph()
    upward = []
    for importer, targets in g.items():
        low = layer(importer)
        for target in targets:
            high = layer(target)
            if low is None or high is None or low not in RANK or high not in RANK:
                continue
            if RANK[high] > RANK[low] and (importer, target) not in ALLOWED:
                upward.append(f"{importer} ({low}) imports {target} ({high})")
    assert not upward, "imports that run back up the layer order:\n" + "\n".join(sorted(upward))


def test_the_allow_list_has_no_stale_entries():
    g = graph()
    stale = [f"{a} -> {b}" for (a, b) in ALLOWED if b not in g.get(a, set())]
    assert not stale, f"these allowed imports are gone; remove them from ALLOWED: {stale}"


def test_the_checker_catches_a_circle_and_an_upward_import(tmp_path):
    """The checker itself can fail: a module-level circle and a function-level upward import are found."""
    g = {"medadv.budget": {"medadv.study"}, "medadv.study": {"medadv.budget"}, "medadv.cache": set()}
    assert cycles(g) == [["medadv.budget", "medadv.study"]]
    fake = tmp_path / "medadv" / "cache.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from medadv.data.checksums import sha256_file\n    from medadv import dist\n")
    known = {"medadv.cache": fake, "medadv.data.checksums": fake, "medadv.dist": fake, "medadv.data": fake}
    found = imports(fake, known, root=tmp_path)
    assert found == {"medadv.data.checksums", "medadv.dist"}
    assert RANK[layer("medadv.data.checksums")] > RANK[layer("medadv.cache")]  # data is above the base utilities
