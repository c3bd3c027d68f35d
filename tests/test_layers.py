"""The package's import graph: no cycle, and no module imports one of a higher layer (DESIGN.md).
Read from the source (every import statement: module-level, inside a function, or under
`if __name__ == "__main__":`), so neither a lazy import nor a command-line shim can hide a
dependency."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mlcd_jax"

# Lowest first. A module may import its own layer or lower ones.
LAYERS = [
    # foundations: configuration, shardings, math, the model, data, records and on-disk formats
    ("mlcd_jax.config", "mlcd_jax.lit_config", "mlcd_jax.recipes", "mlcd_jax.flag_parsing",
     "mlcd_jax.mesh", "mlcd_jax.losses", "mlcd_jax.optim", "mlcd_jax.distributed",
     "mlcd_jax.reporting", "mlcd_jax.models", "mlcd_jax.data", "mlcd_jax.records",
     "mlcd_jax.keys", "mlcd_jax.labels.store", "mlcd_jax.labels.join",
     # the platform and its "auto" choices (the package's __init__ picks it before jax starts),
     # GPU targets, reading compiled programs
     "mlcd_jax", "mlcd_jax.platform", "mlcd_jax.gpu_specs", "mlcd_jax.hlo"),
    # the heads (MLCD, contrastive), checkpoints, the transformers mapping, the embedding loop
    # and the evaluators of its features
    ("mlcd_jax.head", "mlcd_jax.heads", "mlcd_jax.contrastive", "mlcd_jax.checkpoint",
     "mlcd_jax.interop.hf", "mlcd_jax.features", "mlcd_jax.evaluate.probes"),
    # the train step and the config checks that feed it, encoder weights from anywhere, FLOP
    # counts, the run loop of the trainers
    ("mlcd_jax.step", "mlcd_jax.validation", "mlcd_jax.weights", "mlcd_jax.flops",
     "mlcd_jax.loop"),
    # the jobs
    ("mlcd_jax.train", "mlcd_jax.labels", "mlcd_jax.evaluate", "mlcd_jax.demo_runs"),
    # entry points
    ("mlcd_jax.plan", "mlcd_jax.demo", "mlcd_jax.demo_regions", "mlcd_jax.demo_native",
     "mlcd_jax.lit",
     "mlcd_jax.ablate",
     "mlcd_jax.interop.__main__", "mlcd_jax.interop.hf.__main__", "mlcd_jax.labels.__main__",
     "mlcd_jax.evaluate.__main__"),
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
    assert "mlcd_jax.interop.hf" in edges["mlcd_jax.weights"]  # imported inside load_encoder
    assert "mlcd_jax.features" in edges["mlcd_jax.labels.embed"]  # inside run


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
