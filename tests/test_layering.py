"""The package's layering rule, as docs/development.md states it: at module level each layer
imports only the layers above it; the few imports that reach below are inside functions (lazy)
and listed here — experiments draw figures with ``report``'s helpers, the training loop's periodic
diagnostics, the memory check's ResNet depth rule, and the ``depthlab`` facade from code that
runs only after the package is loaded."""

from __future__ import annotations

import ast
from pathlib import Path

import depthlab

ORDER = ["registry", "validate", "io", "resources", "heap", "gctools", "nn", "schemes", "models",
         "convert", "data", "train", "diagnostics", "experiments", "report", "cli"]  # fmt: skip
#: (importing layer, imported layer) pairs allowed below, inside functions only
LAZY_BELOW = {
    ("experiments", "report"),  # figures and the combined report
    ("train", "diagnostics"),  # TrainConfig.diagnose_every
    ("resources", "models"),  # the CIFAR ResNet depth rule in the memory estimate
}
ROOT = Path(depthlab.__file__).parent


def _layer(module: str, name: str | None = None) -> str | None:
    parts = module.split(".")
    if parts[0] != "depthlab":
        return None
    if len(parts) == 1:
        return name if name in ORDER else "depthlab"  # `from depthlab import validate`
    return parts[1]


def _imports(tree: ast.AST):
    """(node, imported layer, at module level?) for every depthlab import."""
    top = set(map(id, ast.iter_child_nodes(tree)))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield node, _layer(node.module, alias.name), id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node, _layer(alias.name), id(node) in top


def test_each_layer_imports_only_the_ones_above_it():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        me = path.relative_to(ROOT).parts[0].removesuffix(".py")
        if me not in ORDER:
            continue  # the facade (__init__) and __main__ import everything by design
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, layer, module_level in _imports(tree):
            if layer is None or layer == me:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno} imports {layer}"
            if layer == "depthlab":  # the whole facade: only lazily, never at import time
                if module_level:
                    bad.append(where + " (the facade) at module level")
                continue
            if ORDER.index(layer) < ORDER.index(me):
                continue
            if module_level or (me, layer) not in LAZY_BELOW:
                if me != "cli":  # the command line sits at the bottom and may use anything
                    bad.append(where)
    assert not bad, "imports against the layering rule:\n" + "\n".join(bad)
