"""The layers, enforced: every module of `encoders/` and `mllm/` read with `ast` (imports inside functions
included), its import graph built, and the wrong-way edges refused.

A module may import from its own layer and the layers below it, never from a layer above:

    layer  name          modules
    0      encoders      encoders.*  (the vision library: towers, objectives, SSL/TIPS/CLOC models, registry,
                         common io/config/process helpers); imports nothing from mllm
    1      model side    mllm.config, mllm.model, mllm.data.*, mllm.chat, mllm.projectors, mllm.readout, mllm.tokenizer,
                         mllm.vision, mllm.lm_init, mllm.hf_import, mllm.hf_export, mllm.lora, mllm.prior,
                         mllm.feature_cache, mllm.cgvlm  (what a model, its recipe section and its data are)
    2      families      mllm.families.*, mllm.loading  (one registration per model family: build, load,
                         recognise, tasks, stage kinds; loading a saved model of any family)
    3      applications  mllm.training.*, mllm.evaluation.*, mllm.integrations.*, mllm.inference,
                         mllm.logging_backends, mllm.plotting, mllm.planning.*, mllm.serving.*,
                         mllm.viewer.*  (train, evaluate, serve, chart, plan and show models)
    4      entry points  mllm.cli, mllm.demo, mllm.evidence.*, mllm  (the package root: the public API,
                         imported lazily; the demo and the claims' experiments, which train and evaluate)

Within layer 3, training and evaluation do not import each other (model loading is `mllm.loading`; an
evaluator reaches training as a callable built above both, by the CLI), and integrations, serving and the
viewer do not import training. Every module must sit in the table: a new one is placed here (and in
docs/architecture.md, "Layers") before it can land.

Also: no import cycle among module-level imports (those run when a module is imported; imports inside
functions and under `if TYPE_CHECKING:` are left out of this one check, not of the layer checks).

An import of `pkg.mod` counts as an edge to `pkg.mod` only, not to the packages above it, which Python
imports first: `pkg/__init__.py` re-exporting its submodules would otherwise be a cycle with each of them.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("encoders", "mllm")


@dataclass(frozen=True)
class Edge:
    src: str  # importing module
    dst: str  # imported module (the deepest project module the statement names)
    line: int
    module_level: bool  # runs when `src` is imported (not inside a function, not under TYPE_CHECKING)

    def __str__(self) -> str:
        return f"{self.src} -> {self.dst} ({module_file(self.src)}:{self.line})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(path)] = path
    return out


MODULES = project_modules()


def module_file(name: str) -> str:
    return str(MODULES[name].relative_to(ROOT))


def resolve(name: str) -> str | None:
    """The deepest project module that `name` (a dotted module or module.attribute) falls in."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in MODULES:
            return cand
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str) -> list[Edge]:
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges: list[Edge] = []

    def add(target: str | None, line: int, module_level: bool) -> None:
        dst = resolve(target) if target else None
        if dst is not None and dst != name:
            edges.append(Edge(name, dst, line, module_level))

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, module_level)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                add(
                    f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in MODULES else mod,
                    node.lineno,
                    module_level,
                )
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            module_level = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, module_level)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, module_level)

    visit(tree, True)
    return list(dict.fromkeys(edges))  # `from m import a, b` is one edge


EDGES = [e for name in MODULES for e in imports_of(name)]


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_graph_is_read():
    """A sanity check on the reader itself, so an empty graph cannot pass the checks below."""
    assert "encoders.towers" in MODULES and "mllm.cli" in MODULES
    assert any(e.src == "mllm.cli" and _under(e.dst, "mllm.training") and not e.module_level for e in EDGES)
    assert any(e.src == "mllm.model" and e.dst == "encoders.towers" and e.module_level for e in EDGES)


# prefix -> layer; a module's layer is that of the longest prefix it falls under (`mllm` itself: exactly).
LAYERS: dict[str, int] = {
    "encoders": 0,
    **dict.fromkeys(
        (
            "mllm.config",
            "mllm.model",
            "mllm.data",
            "mllm.chat",
            "mllm.projectors",
            "mllm.readout",
            "mllm.tokenizer",
            "mllm.vision",
            "mllm.lm_init",
            "mllm.hf_import",
            "mllm.hf_export",
            "mllm.lora",
            "mllm.prior",
            "mllm.feature_cache",
            "mllm.cgvlm",
        ),
        1,
    ),
    **dict.fromkeys(("mllm.families", "mllm.loading"), 2),
    **dict.fromkeys(
        (
            "mllm.training",
            "mllm.evaluation",
            "mllm.integrations",
            "mllm.inference",
            "mllm.logging_backends",
            "mllm.plotting",
            "mllm.planning",
            "mllm.serving",
            "mllm.viewer",
        ),
        3,
    ),
    **dict.fromkeys(("mllm.cli", "mllm.demo", "mllm.evidence", "mllm"), 4),
}
LAYER_NAMES = ("encoders", "model side", "families", "applications", "entry points")
# Within layer 3: (importer, imported) pairs that are refused.
APART = (
    ("mllm.training", "mllm.evaluation"),
    ("mllm.evaluation", "mllm.training"),
    ("mllm.training", "mllm.integrations"),
    ("mllm.integrations", "mllm.training"),
    ("mllm.serving", "mllm.training"),
    ("mllm.viewer", "mllm.training"),
)


def layer_of(module: str) -> int | None:
    if module == "mllm":
        return LAYERS["mllm"]
    best = max((p for p in LAYERS if p != "mllm" and _under(module, p)), key=len, default=None)
    return LAYERS[best] if best is not None else None


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, (
        "modules outside the layer table of tests/test_layering.py (place them there and in "
        "docs/architecture.md):\n" + "\n".join(missing)
    )


def test_the_table_names_real_modules():
    stale = sorted(p for p in LAYERS if p not in MODULES)
    assert not stale, f"layer table entries that name no module: {stale}"


def test_imports_go_down_the_layers():
    wrong = []
    for e in EDGES:
        a, b = layer_of(e.src), layer_of(e.dst)
        if a is not None and b is not None and b > a:
            wrong.append(f"{e}: layer {a} ({LAYER_NAMES[a]}) imports layer {b} ({LAYER_NAMES[b]})")
    assert not wrong, "imports against the layer order (see this file's docstring):\n" + "\n".join(wrong)


def test_applications_keep_apart():
    wrong = [
        f"{e}: {src} must not import {dst}"
        for e in EDGES
        for src, dst in APART
        if _under(e.src, src) and _under(e.dst, dst)
    ]
    assert not wrong, "\n".join(wrong)


def test_layer_checker_catches_a_wrong_way_edge():
    assert layer_of("mllm.families.mllm") == 2 and layer_of("mllm.training.distributed") == 3
    assert (
        layer_of("mllm.data.geoworld.live") == 1
        and layer_of("mllm") == 4
        and layer_of("encoders.ssl.model") == 0
    )
    assert layer_of("mllm.families.mllm") < layer_of(
        "mllm.training.distributed"
    )  # the edge the prior task had


def test_encoders_import_nothing_from_mllm():
    wrong = [str(e) for e in EDGES if _under(e.src, "encoders") and _under(e.dst, "mllm")]
    assert not wrong, "encoders/ must stand alone; it imports mllm here:\n" + "\n".join(wrong)


def test_evaluation_does_not_import_training():
    wrong = [str(e) for e in EDGES if _under(e.src, "mllm.evaluation") and _under(e.dst, "mllm.training")]
    assert not wrong, (
        "mllm.evaluation must not import mllm.training (load models through mllm.loading):\n"
        + "\n".join(wrong)
    )


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for e in EDGES:
        if e.module_level:
            graph[e.src].add(e.dst)
    cycles = _cycles(graph)
    detail = []
    for comp in cycles:
        members = set(comp)
        detail.append(
            " <-> ".join(comp)
            + "\n"
            + "\n".join(f"    {e}" for e in EDGES if e.module_level and e.src in members and e.dst in members)
        )
    assert not cycles, "module-level import cycles:\n" + "\n".join(detail)
