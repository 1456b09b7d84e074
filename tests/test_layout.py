"""The package layout's rules, enforced: imports at the top of a module unless the module
they import is heavy, and stage packages that depend on each other in one direction only."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "urbanseg"
# Third-party libraries that cost seconds to import or are optional: a function-local
# import of these (or of an urbanseg module that imports them at its top) keeps
# `urbanseg --help` and the torch-free ONNX path fast.
HEAVY = {
    "torch",
    "torchvision",
    "tensorflow",
    "onnxruntime",
    "onnx",
    "transformers",
    "segmentation_models_pytorch",
    "timm",
    "matplotlib",
    "tensorboard",
    "cityscapesscripts",
    "cv2",
    "PIL",
    "yaml",
    "tqdm",
    "google_crc32c",
    "google",
    "huggingface_hub",
    "scipy",
    "safetensors",
}
# Stage packages and the stage packages each may import (shared top-level modules are open to all).
STAGES = {
    "synth": set(),
    "data": set(),
    "models": set(),
    "training": {"data", "models", "evaluation"},
    "evaluation": {"data", "models", "inference"},
    "inference": {"data", "models"},
}


@cache
def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imported(node: ast.AST, current: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative imports are not used in urbanseg
            return [f"<relative in {current}>"]
        base = node.module or ""
        names = [f"{base}.{a.name}" for a in node.names]
        return [n if n in modules() else base for n in names]
    return []


@cache
def top_imports(name: str) -> frozenset[str]:
    """Modules imported at the top level of urbanseg module `name` (not inside functions)."""
    found = set()
    for node in _tree(name).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            found.update(_imported(sub, name))
    return frozenset(found)


@cache
def is_heavy(name: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether importing `name` imports a heavy library (directly or through urbanseg modules)."""
    if name.split(".")[0] in HEAVY:
        return True
    if name not in modules() or name in seen:
        return False
    return any(is_heavy(m, seen | {name}) for m in top_imports(name))


@cache
def _tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text())


@cache
def local_imports() -> tuple[tuple[str, int, str], ...]:
    """(module, line, imported) for every import inside a function body."""
    out = []
    for name in modules():
        for node in ast.walk(_tree(name)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    out += [(name, sub.lineno, m) for m in _imported(sub, name)]
    return tuple(out)


def test_function_local_imports_are_only_for_heavy_modules():
    light = [f"{mod}:{line} imports {imp}" for mod, line, imp in local_imports() if not is_heavy(imp)]
    assert not light, "import these at the top of the module:\n" + "\n".join(light)


def _stage(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in STAGES else None


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_packages_import_only_what_they_may(stage):
    bad = []
    for name in modules():
        if _stage(name) != stage:
            continue
        imports = set(top_imports(name)) | {imp for mod, _, imp in local_imports() if mod == name}
        for imp in imports:
            other = _stage(imp)
            if other not in (None, stage) and other not in STAGES[stage]:
                bad.append(f"{name} imports {imp}")
    assert not bad, f"urbanseg.{stage} may import only {sorted(STAGES[stage])} of the stage packages:\n" + "\n".join(
        bad
    )


def test_shared_modules_import_no_stage_package():
    """The top-level modules (config, labels, checkpoint, imaging, ...) are what the stages
    share; they import no stage, except `checkpoint`, which rebuilds models by name."""
    bad = []
    for name in modules():
        if _stage(name) is None and name.count(".") == 1 and name not in ("urbanseg.cli", "urbanseg.demo"):
            imports = set(top_imports(name)) | {imp for mod, _, imp in local_imports() if mod == name}
            for imp in imports:
                if _stage(imp) and not (name == "urbanseg.checkpoint" and _stage(imp) == "models"):
                    bad.append(f"{name} imports {imp}")
    assert not bad, "\n".join(bad)


def test_every_command_takes_its_config_and_returns_an_exit_code():
    """cli.COMMANDS maps each command to one function `f(config: <its Config>) -> int`."""
    import importlib
    import inspect
    import typing

    from urbanseg.cli import COMMANDS

    for name, (config_class, target) in COMMANDS.items():
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        hints = typing.get_type_hints(func)
        params = list(inspect.signature(func).parameters)
        assert params == ["config"], f"{name}: {target} takes {params}, expected (config)"
        assert hints["config"] is config_class, f"{name}: config is {hints['config']}, expected {config_class}"
        assert hints["return"] is int, f"{name}: {target} returns {hints['return']}, expected an exit code (int)"


def test_public_api_names_resolve_and_import_urbanseg_stays_light():
    """Every name of `urbanseg.__all__` resolves; `import urbanseg` alone loads no PyTorch."""
    import subprocess
    import sys

    code = (
        "import sys, urbanseg; light = 'torch' not in sys.modules; "
        "[getattr(urbanseg, n) for n in urbanseg.__all__]; print(light)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


# An import of a test module (or conftest) by name, in code or in a script a test runs.
TEST_MODULE_IMPORT = re.compile(r"^\s*(?:from|import)\s+((?:test_\w+|conftest)\b)", re.MULTILINE)


def test_no_test_module_or_benchmark_imports_a_test_module():
    """Shared test code lives in `tests/helpers/` (shared worlds: `tests/conftest.py`):
    importing a test module would run its module-level fixtures and collect its tests twice."""
    root = SRC.parent
    found = [
        f"{path.relative_to(root)}:{text.count(chr(10), 0, m.start()) + 1}: imports {m.group(1)}"
        for folder in ("tests", "benchmarks")
        for path in sorted((root / folder).rglob("*.py"))
        for text in [path.read_text()]
        for m in TEST_MODULE_IMPORT.finditer(text)
    ]
    assert not found, "move what is shared to tests/helpers/:\n" + "\n".join(found)
