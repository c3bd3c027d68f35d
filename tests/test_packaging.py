"""The package as users install it: a wheel (`pip install .`, not editable) carries what the
commands need (the presets, the GPU specs) and runs from outside any checkout; every console
script points at a command."""

import os
import pathlib
import select
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
import zipfile

import pytest

from helpers.commands import REPO, env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(REPO)], check=True, capture_output=True,
                   timeout=600, cwd=out)
    (found,) = out.glob("mlcd_jax-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> pathlib.Path:
    """A fresh virtualenv with the wheel installed (non-editable); its dependencies seen from
    this environment's site-packages through a .pth file (which loads no editable finder, so
    mlcd_jax is the wheel's alone). Returns its python."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                           "'purelib'))"], capture_output=True, text=True, check=True).stdout
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site.strip())
    ours = sysconfig.get_path("purelib")
    (pathlib.Path(site.strip()) / "dependencies.pth").write_text(ours + "\n")
    return python


@pytest.mark.slow
def test_the_wheel_carries_the_presets_and_the_gpu_specs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in ("demo", "lit_demo", "demo_regions", "demo_native", "test_tiny", "rice",
                   "mlcd_laion400m", "lit"):
        assert f"mlcd_jax/config/presets/{preset}.py" in names
    for gpu in ("h100", "h200", "b200", "a100-80g"):
        assert f"mlcd_jax/planning/specs/{gpu}.txtpb" in names
    assert not any(n.startswith(("tests/", "configs/", "bench/")) for n in names)


@pytest.mark.slow
def test_the_installed_demo_runs_from_anywhere_to_its_first_result(installed, tmp_path):
    """`python -m mlcd_jax.demo` from the wheel, in a directory far from the checkout: its
    configs are the package's, its trainings find the package, and it reaches its first result
    line (the run is stopped there: the rest is the demo's own test)."""
    where = tmp_path / "elsewhere"
    where.mkdir()
    code = f"import mlcd_jax; assert mlcd_jax.__file__.startswith({str(installed.parents[1])!r})"
    subprocess.run([str(installed), "-c", code], cwd=where, check=True, timeout=120)
    proc = subprocess.Popen(
        [str(installed), "-m", "mlcd_jax.demo", f"--workdir={tmp_path / 'demo'}",
         "--override=--config.total_steps=2", "--override=--config.evals.every=0",
         "--override=--config.model.size=micro"],
        cwd=where, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    seen, deadline = [], time.time() + 900
    try:
        while time.time() < deadline:
            if select.select([proc.stdout], [], [], 5)[0]:
                line = proc.stdout.readline()
                if not line:
                    break
                seen.append(line)
                if line.strip().startswith("raw_pixels") and "linear probe" in line:
                    return
            elif proc.poll() is not None:
                break
        pytest.fail(f"no result line: {''.join(seen)[-2000:]}{proc.stderr.read()[-3000:]}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_every_console_script_is_a_command():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"mlcd-train", "mlcd-lit", "mlcd-plan", "mlcd-demo", "mlcd-ablate",
                            "mlcd-labels", "mlcd-evaluate", "mlcd-convert", "mlcd-export",
                            "mlcd-pretrain"}
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        done = subprocess.run([sys.executable, "-c", f"import sys; from {module} import "
                               f"{function}; sys.argv = [{name!r}, '--help']; sys.exit("
                               f"{function}())"], capture_output=True, text=True, timeout=120,
                              cwd=REPO)
        assert done.returncode == 0, (name, done.stderr[-2000:])
        assert "--" in done.stdout, (name, done.stdout)  # its flags (or verbs) are listed
