"""The package's layers import only downward, also inside functions (read from the source)."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "qlora_jax"

#: Layer of each top-level module or subpackage of qlora_jax: module_names (a leaf utility,
#: importing nothing of the package) < quant < lora < sharding, models,
#: formats (file formats) < checkpoints, data, generate, eval < train < launch and the other
#: tools built on train. A module imports from its own package and from lower layers only (not
#: from another package of its layer). The package root (``qlora_jax/__init__.py``) gathers the
#: public API, above them all.
LAYERS = {
    "module_names": -1,
    "quant": 0,
    "lora": 1,
    "sharding": 2, "models": 2, "formats": 2,
    "checkpoints": 3, "data": 3, "generate": 3, "eval": 3,
    "train": 4,
    "launch": 5, "memory": 5, "analysis": 5, "demo": 5,
}


def _component(module: str) -> str:
    """``qlora_jax.quant.ops`` -> ``quant``; ``qlora_jax`` -> ``qlora_jax`` (the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: pathlib.Path, package: pathlib.Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, imported qlora_jax module) of every import in a file, at any depth."""
    module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    if path.name == "__init__.py":
        module = package
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("qlora_jax")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                parent = package.split(".")
                parent = parent[:len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            if not base.startswith("qlora_jax"):
                continue
            if base == "qlora_jax":  # from qlora_jax import lora, quant
                out += [(node.lineno, f"qlora_jax.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, base))
    return out


def _violations(layers: dict[str, int], package: pathlib.Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent)
        own = _component(".".join(rel.with_suffix("").parts))
        if own not in layers:
            continue
        for line, target in _imports(path, package):
            other = _component(target)
            if other == own:
                continue
            if other not in layers:
                bad.append(f"{rel}:{line} imports {target} (the package root or an unlisted "
                           "module: give it a layer in LAYERS)")
            elif layers[other] > layers[own]:
                bad.append(f"{rel}:{line} ({own}, layer {layers[own]}) imports {target} "
                           f"({other}, layer {layers[other]})")
            elif layers[other] == layers[own]:
                bad.append(f"{rel}:{line} ({own}) imports {target} ({other}): the same layer")
    return bad


def test_every_module_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert names == set(LAYERS), (sorted(names - set(LAYERS)), sorted(set(LAYERS) - names))


def test_imports_point_down_the_layers():
    bad = _violations(LAYERS)
    assert not bad, "imports that climb a layer:\n" + "\n".join(bad)


def test_the_check_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "qlora_jax"
    (pkg / "quant").mkdir(parents=True)
    (pkg / "lora").mkdir()
    (pkg / "quant" / "__init__.py").write_text("")
    (pkg / "quant" / "ops.py").write_text(
        "import numpy\n"
        "from qlora_jax.quant import blockwise\n"        # own layer: fine
        "def f():\n"
        "    from qlora_jax import sharding\n"            # climbs, inside a function
        "class C:\n"
        "    def g(self):\n"
        "        import qlora_jax.train.loop\n"           # climbs, inside a method
        "        from ..lora import dense\n"              # climbs, relative
        "        import qlora_jax\n")                     # the root
    (pkg / "lora" / "dense.py").write_text("from qlora_jax.quant import ops\n")  # down: fine
    bad = _violations(LAYERS, pkg)
    assert [v.split(" ")[0] for v in bad] == ["qlora_jax/quant/ops.py:" + str(n)
                                             for n in (4, 7, 8, 9)], bad
    assert "qlora_jax.lora" in bad[2] and "unlisted" in bad[3]
