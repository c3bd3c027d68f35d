"""The package's architecture as a contract a kept tool checks (import-linter's layers contract in
pyproject.toml): each package imports only the packages below it, with no cycle and indirect
imports counted; and the lint (ruff) is clean."""

import pathlib
import shutil
import subprocess
import sys
import tomllib

import pytest

from helpers.commands import REPO

LINT_IMPORTS = [str(pathlib.Path(sys.executable).with_name("lint-imports")), "--no-cache"]


def lint_imports(cwd) -> subprocess.CompletedProcess:
    return subprocess.run(LINT_IMPORTS, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_layers_contract_holds():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in done.stdout


def test_every_package_and_command_has_its_layer():
    """The contract is exhaustive: each package and root module under mlcd_jax/ is in a layer
    (import-linter refuses a contract that leaves one out, so a new package must take a place)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = config["contracts"][0]["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    package = REPO / "mlcd_jax"
    here = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    here |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert named == here
    assert config["contracts"][0]["exhaustive"] is True


@pytest.mark.parametrize("importer, imported, lazy", [
    ("data/transforms.py", "mlcd_jax.training import step", True),   # inside a function
    ("runtime/files.py", "mlcd_jax.config import schema", False),
    ("labels/store.py", "mlcd_jax.evaluate import probes", False),   # labels below evaluate
    ("models/vit.py", "mlcd_jax.data import sources", False),        # independent siblings
])
def test_the_contract_catches_a_wrong_import(tmp_path, importer, imported, lazy):
    """The same check on a copy of the package with one import that breaks the layers: it fails,
    naming it (a lazy import inside a function counts too)."""
    shutil.copytree(REPO / "mlcd_jax", tmp_path / "mlcd_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    module = tmp_path / "mlcd_jax" / importer
    line = f"from {imported}  # noqa"
    module.write_text(module.read_text() + (f"\n\ndef _late():\n    {line}\n" if lazy
                                             else f"\n{line}\n"))
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    name = "mlcd_jax." + importer.removesuffix(".py").replace("/", ".")
    package, _, imported_name = imported.partition(" import ")
    assert f"{name} -> {package}.{imported_name}" in done.stdout, done.stdout[-2000:]


def test_lint_is_clean():
    """ruff (the test extra), configured in pyproject.toml: 100 columns, E, W, F, I, B."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
