"""The package's import graph: no cycle, and no module imports one of a higher layer (DESIGN.md).
Read from the source (every import statement: module-level, inside a function, or under
`if __name__ == "__main__":`), so neither a lazy import nor a command-line shim can hide a
dependency."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mlcd_jax"

# Lowest first. A module may import its own layer or lower ones.
# Lowest first (temporary: an import-linter contract replaces this list).
LAYERS = [
    (
        "mlcd_jax.config.schema",
        "mlcd_jax.config.recipes",
        "mlcd_jax.runtime.cli",
        "mlcd_jax.runtime.mesh",
        "mlcd_jax.training.losses",
        "mlcd_jax.training.optim",
        "mlcd_jax.runtime.distributed",
        "mlcd_jax.training.reporting",
        "mlcd_jax.models",
        "mlcd_jax.data",
        "mlcd_jax.runtime.files",
        "mlcd_jax.data.record_keys",
        "mlcd_jax.labels.store",
        "mlcd_jax.labels.join",
        "mlcd_jax",
        "mlcd_jax.runtime.backend",
        "mlcd_jax.planning.gpu_specs",
        "mlcd_jax.planning.hlo",
        "mlcd_jax.runtime",
        "mlcd_jax.config",
        "mlcd_jax.training",
        "mlcd_jax.planning",
        "mlcd_jax.demos",
    ),
    (
        "mlcd_jax.training.sharded_head",
        "mlcd_jax.training.region_heads",
        "mlcd_jax.lit.contrastive",
        "mlcd_jax.training.checkpoint",
        "mlcd_jax.interop.hf",
        "mlcd_jax.evaluate.features",
        "mlcd_jax.evaluate.probes",
    ),
    (
        "mlcd_jax.training.step",
        "mlcd_jax.training.validation",
        "mlcd_jax.interop.weights",
        "mlcd_jax.planning.flops",
        "mlcd_jax.training.loop",
    ),
    (
        "mlcd_jax.train",
        "mlcd_jax.labels",
        "mlcd_jax.evaluate",
        "mlcd_jax.demos.runs",
    ),
    (
        "mlcd_jax.planning.plan",
        "mlcd_jax.demos.mlcd",
        "mlcd_jax.demos.regions",
        "mlcd_jax.demos.native",
        "mlcd_jax.lit",
        "mlcd_jax.demos.ablation",
        "mlcd_jax.plan",
        "mlcd_jax.demo",
        "mlcd_jax.ablate",
        "mlcd_jax.config.presets",
        "mlcd_jax.interop.__main__",
        "mlcd_jax.interop.hf.__main__",
        "mlcd_jax.labels.__main__",
        "mlcd_jax.evaluate.__main__",
    ),
]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The layer of the longest matching prefix."""
    best = max(((len(prefix), i) for i, names in enumerate(LAYERS) for prefix in names
                if module == prefix or (module.startswith(prefix + ".") and prefix != "mlcd_jax")),
               default=None)  # "mlcd_jax" is the package's __init__, not every module's prefix
    assert best is not None, f"{module} has no layer in tests/test_layers.py"
    return best[1]


def imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlcd_jax"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mlcd_jax")}
    itself = module_name(path) if path.is_relative_to(PACKAGE) else None
    return {m for m in found if m in modules} - {itself}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {m: imports(p, modules) for m, p in paths.items()}


def test_no_import_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, deps in sorted(graph().items()) for d in sorted(deps) if layer(d) > layer(m)]
    assert not upward, "\n".join(upward)


def test_the_check_sees_lazy_imports():
    """A function-level import counts: the rule cannot be dodged by importing late."""
    edges = graph()
    assert "mlcd_jax.interop.hf" in edges["mlcd_jax.interop.weights"]  # inside load_encoder
    assert "mlcd_jax.evaluate.features" in edges["mlcd_jax.labels.embed"]  # inside run


def test_lint_is_clean():
    """ruff (the test extra), configured in pyproject.toml: 100 columns, E, W, F, I, B."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."],
                            cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


def test_the_check_sees_imports_under_main_guards(tmp_path):
    """A command-line shim under `if __name__ == "__main__":` is an import like any other (the
    interop.hf → interop.__main__ → weights → interop.hf circle hid there)."""
    shim = tmp_path / "shim.py"
    shim.write_text('if __name__ == "__main__":\n'
                    '    from mlcd_jax import train\n'
                    '    train.main()\n')
    assert imports(shim, set(graph())) == {"mlcd_jax.train"}
