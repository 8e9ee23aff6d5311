"""normlab's modules import in one direction only: each layer may use the layers below it, never
one above. The layers, bottom to top, as listed in README.md's code map:

    errors → ranges → utils → ops → norm → models → data | tasks → callbacks → config → entry points

Two packages on the same layer (data and tasks) do not import each other, and no entry point imports
another (what train, eval and export share lives in the config layer). Function-level imports count:
a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from cli import REPO_ROOT

SRC = REPO_ROOT / "src"

# Module prefix → layer. The longest matching prefix wins.
LAYERS: dict[str, int] = {
    "normlab.errors": 0,
    "normlab.ranges": 1,
    "normlab.utils": 2,
    "normlab.ops": 3,
    "normlab.norm": 4,
    "normlab.models": 5,
    "normlab.data": 6,
    "normlab.tasks": 6,
    "normlab.callbacks": 7,
    "normlab.validation": 8,
    "normlab.group_options": 8,
    "normlab.runs": 8,
    "normlab.train": 9,
    "normlab.eval": 9,
    "normlab.export": 9,
    "normlab.sweep": 9,
    "normlab.collect": 9,
    "normlab": 9,  # the package's own __init__
}


def _layer_of(module: str) -> tuple[str, int]:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    prefix = max(matches, key=len)
    return prefix, LAYERS[prefix]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from normlab import train` imports the module normlab.train
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "normlab" or name.startswith("normlab.")}


def _known(name: str) -> bool:
    """Whether an imported name is a module or package of ours (not a function imported from one)."""
    relative = Path(*name.split("."))
    return (SRC / relative).with_suffix(".py").exists() or (SRC / relative / "__init__.py").exists()


MODULES = sorted((SRC / "normlab").rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    for path in MODULES:
        _layer_of(_module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_point_down(path: Path) -> None:
    module = _module_name(path)
    own_prefix, own_layer = _layer_of(module)
    upward = []
    for imported in sorted(_imports(path, module)):
        if not _known(imported) or imported == "normlab":
            continue
        prefix, layer = _layer_of(imported)
        if prefix == own_prefix:
            continue
        if layer >= own_layer:
            upward.append(f"{imported} (layer {layer}, this module is layer {own_layer})")
    assert not upward, f"{module} imports from its own layer or above: " + "; ".join(upward)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The parser must find function-level and relative imports, or the test above proves nothing."""
    source = tmp_path / "normlab" / "ops" / "probe.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from ..norm import sync\n    import normlab.train\n")
    found = _imports(source, "normlab.ops.probe")
    assert {"normlab.norm.sync", "normlab.train"} <= found


@pytest.mark.parametrize("package", ["normlab.norm", "normlab.models"])
def test_the_norm_and_model_layers_import_neither_lightning_nor_omegaconf(package: str) -> None:
    """Building a norm or a model needs torch only: the run layer's libraries stay unloaded."""
    probe = (
        f"import sys, {package}; "
        "print(sorted(m for m in ('lightning', 'omegaconf', 'hydra') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
