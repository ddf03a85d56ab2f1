"""The import rules of docs/architecture.md, checked on every module of the package.

Each module under ``vllm_hetero_pd/`` is parsed with ``ast``; every ``import`` and ``from ...
import`` counts, at module level and inside functions alike (a lazy import is still a
dependency), including relative imports and ``TYPE_CHECKING`` blocks. A broken rule fails with
the file, the line, the import and the rule, so the fix is to move code, not to edit this list.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "vllm_hetero_pd"
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}


@dataclass(frozen=True)
class Import:
    """One imported module, resolved to an absolute name."""

    line: int
    module: str
    lazy: bool  # inside a function: runs only when called, not when the module is imported

    @property
    def ours(self) -> str | None:
        """Our component it reaches (``formats``, ``kv_params``, ``__init__`` ...), None if not ours."""
        parts = self.module.split(".")
        if parts[0] != PACKAGE:
            return None
        return parts[1] if len(parts) > 1 else "__init__"

    @property
    def third_party(self) -> str | None:
        """Its top-level distribution-ish name, None when it is ours or the standard library."""
        top = self.module.split(".")[0]
        return None if top == PACKAGE or top in STDLIB else top


@dataclass(frozen=True)
class Rule:
    """What one component may import. ``None`` allows anything the ``not_*`` sets do not forbid."""

    name: str
    ours: frozenset[str] | None = None
    third_party: frozenset[str] | None = None
    not_ours: frozenset[str] = field(default_factory=frozenset)
    not_third_party: frozenset[str] = field(default_factory=frozenset)
    module_level_only: bool = False  # the rule binds imports that run when the module is imported

    def broken_by(self, imp: Import, component: str) -> bool:
        """Whether ``imp`` (in a module of ``component``) breaks this rule."""
        if self.module_level_only and imp.lazy:
            return False
        ours, third = imp.ours, imp.third_party
        if ours is not None and ours != component:
            return (self.ours is not None and ours not in self.ours) or ours in self.not_ours
        if third is not None:
            return (self.third_party is not None and third not in self.third_party) or third in self.not_third_party
        return False


def _set(*names: str) -> frozenset[str]:
    return frozenset(names)


ENTRY_POINTS = _set("cli", "bench")  # they reach launch/, router/, planner/ ... by module name, lazily
RULES: dict[str, list[Rule]] = {
    "formats": [Rule("formats is a leaf: msgspec and the standard library only", ours=_set(),
                     third_party=_set("msgspec"))],
    "kv_params": [Rule("kv_params is a leaf: msgspec and the standard library only", ours=_set(),
                       third_party=_set("msgspec"))],
    "log": [Rule("log is a leaf: the standard library only", ours=_set(), third_party=_set())],
    "ports": [Rule("ports is a leaf: the standard library only", ours=_set(), third_party=_set())],
    "config": [Rule("config imports only leaves (formats, kv_params, log) and msgspec",
                    ours=_set("formats", "kv_params", "log"), third_party=_set("msgspec"))],
    "shim": [Rule("shim imports only formats, torch, numpy, numba and msgspec (vLLM's ops are bound in connector/)",
                  ours=_set("formats"), third_party=_set("torch", "numpy", "numba", "msgspec"))],
    "transport": [Rule("transport imports only formats, kv_params, log and nixl, numpy, msgspec",
                       ours=_set("formats", "kv_params", "log"), third_party=_set("nixl", "numpy", "msgspec"))],
    "connector": [Rule("connector imports no router, planner, launch, testing or entry point",
                       not_ours=_set("router", "planner", "launch", "testing") | ENTRY_POINTS)],
    "router": [Rule("router imports only kv_params, ports and log of ours, and no torch, vllm or nixl",
                    ours=_set("kv_params", "ports", "log"), not_third_party=_set("torch", "vllm", "nixl"))],
    "planner": [Rule("planner imports nothing else of ours, and no torch, vllm or nixl",
                     ours=_set(), not_third_party=_set("torch", "vllm", "nixl"))],
    "testing": [Rule("testing does not import launch (launch drives testing's fixtures, not the reverse)",
                     not_ours=_set("launch") | ENTRY_POINTS)],
    "launch": [Rule("launch imports no entry point", not_ours=ENTRY_POINTS)],
    "__init__": [Rule("the package __init__ imports only the standard library when imported (vLLM loads it "
                      "in every process)", ours=_set(), third_party=_set(), module_level_only=True),
                 Rule("register() imports only vllm, transport and connector", ours=_set("transport", "connector"),
                      third_party=_set("vllm"))],
    "cli": [Rule("cli imports only the standard library when imported (subcommands load by name)",
                 ours=_set(), third_party=_set(), module_level_only=True)],
    "bench": [Rule("bench imports only the standard library when imported (benchmarks load by name)",
                   ours=_set(), third_party=_set(), module_level_only=True)],
}
GLOBAL_RULES = [
    (Rule("only transport imports nixl", not_third_party=_set("nixl")), _set("transport")),
    (Rule("only connector, launch and register() import vllm", not_third_party=_set("vllm")),
     _set("connector", "launch", "__init__")),
]

# Narrow, named allowances: (module path in the package, our component it may also import) -> why.
ALLOWED = {
    ("router/bench.py", "testing"): "the router benchmark runs the fake vLLM backends",
    ("planner/validate.py", "testing"): "the planner's calibration benchmark serves the tiny model",
    ("router/capacity.py", "planner"): "the ratio controller sizes roles with the planner's performance model",
}
# Known breaks, each to be removed by moving code; the test fails once one is no longer needed.
KNOWN_BREAKS = {
    ("planner/validate.py", "launch"): "its run() starts a LocalCluster; the cluster-driving branch belongs in launch/",
}


def component(relpath: str) -> str:
    """``formats/format.py`` -> ``formats``; ``kv_params.py`` -> ``kv_params``."""
    first = relpath.split("/")[0]
    return first.removesuffix(".py")


def imports_of(relpath: str, source: str) -> list[Import]:
    """Every import in ``source`` (a module at ``relpath`` inside the package), absolute and located."""
    package = [PACKAGE, *relpath.removesuffix(".py").split("/")][:-1]  # the module's own package
    if relpath.endswith("__init__.py"):
        package = [PACKAGE, *relpath.split("/")[:-1]]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(child.lineno, alias.name, lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    prefix = package[:len(package) - (child.level - 1)]
                    base = ".".join(prefix + ([child.module] if child.module else []))
                if base == PACKAGE:  # ``from vllm_hetero_pd import log``: the submodule is the dependency
                    found.extend(Import(child.lineno, f"{PACKAGE}.{alias.name}", lazy) for alias in child.names)
                else:
                    found.append(Import(child.lineno, base, lazy))
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def violations(relpath: str, source: str) -> list[str]:
    """``path:line: imports X: rule`` for every import in the module that breaks a rule."""
    comp = component(relpath)
    out = []
    for imp in imports_of(relpath, source):
        if imp.ours and (relpath, imp.ours) in ALLOWED.keys() | KNOWN_BREAKS.keys():
            continue
        rules = list(RULES.get(comp, [])) + [rule for rule, exempt in GLOBAL_RULES if comp not in exempt]
        out.extend(f"{PACKAGE}/{relpath}:{imp.line}: imports {imp.module}: {rule.name}"
                   for rule in rules if rule.broken_by(imp, comp))
    return out


def package_modules() -> dict[str, str]:
    """Path inside the package -> source, for every module."""
    base = ROOT / PACKAGE
    return {p.relative_to(base).as_posix(): p.read_text() for p in sorted(base.rglob("*.py"))}


MODULES = package_modules()


def test_every_component_has_a_rule():
    """A new top-level module or package must get a line in RULES (and in docs/architecture.md)."""
    assert {component(path) for path in MODULES} <= RULES.keys()


@pytest.mark.parametrize("relpath", sorted(MODULES))
def test_module_keeps_the_import_rules(relpath):
    assert violations(relpath, MODULES[relpath]) == []


def test_known_breaks_are_still_needed():
    """Once a known break is fixed, delete its entry so the rule binds again."""
    for (relpath, target), why in KNOWN_BREAKS.items():
        targets = {imp.ours for imp in imports_of(relpath, MODULES[relpath])}
        assert target in targets, f"{relpath} no longer imports {target} ({why}): remove it from KNOWN_BREAKS"


def test_checker_catches_a_module_level_and_a_lazy_import():
    source = "import torch\n\ndef f():\n    from vllm_hetero_pd.shim import plan\n"
    assert violations("formats/bad.py", source) == [
        "vllm_hetero_pd/formats/bad.py:1: imports torch: formats is a leaf: msgspec and the standard library only",
        "vllm_hetero_pd/formats/bad.py:4: imports vllm_hetero_pd.shim: formats is a leaf: msgspec and the standard "
        "library only",
    ]


def test_checker_resolves_relative_and_package_imports():
    assert violations("transport/bad.py", "from ..launch import cluster\n") == [
        "vllm_hetero_pd/transport/bad.py:1: imports vllm_hetero_pd.launch: transport imports only formats, "
        "kv_params, log and nixl, numpy, msgspec"]
    assert violations("testing/bad.py", "from vllm_hetero_pd import launch\n")
    assert violations("shim/ok.py", "from . import plan\nfrom ..formats.format import KVFormat\n") == []


def test_checker_tells_module_level_from_lazy_imports():
    lazy = "def register():\n    from vllm.distributed import x\n    from vllm_hetero_pd.transport import y\n"
    assert violations("__init__.py", lazy) == []
    assert violations("__init__.py", "import vllm\n") == [
        "vllm_hetero_pd/__init__.py:1: imports vllm: the package __init__ imports only the standard library when "
        "imported (vLLM loads it in every process)"]
    assert violations("router/bad.py", "def f():\n    import torch\n") == [
        "vllm_hetero_pd/router/bad.py:2: imports torch: router imports only kv_params, ports and log of ours, and "
        "no torch, vllm or nixl"]


def test_global_rules_bind_every_other_component():
    assert violations("connector/bad.py", "import nixl\n") == [
        "vllm_hetero_pd/connector/bad.py:1: imports nixl: only transport imports nixl"]
    assert violations("testing/bad.py", "import vllm.config\n") == [
        "vllm_hetero_pd/testing/bad.py:1: imports vllm.config: only connector, launch and register() import vllm"]
