"""The package's import graph: no cycle, and no module imports one of a higher layer (DESIGN.md).
Read from the source (every import statement, module-level or inside a function), so a lazy
import cannot hide a dependency; only code under `if __name__ == "__main__":` is exempt."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mlcd_jax"

# Lowest first. A module may import its own layer or lower ones.
LAYERS = [
    # foundations: configuration, shardings, math, the model, data and on-disk formats
    ("mlcd_jax.config", "mlcd_jax.mesh", "mlcd_jax.losses", "mlcd_jax.optim",
     "mlcd_jax.distributed", "mlcd_jax.reporting", "mlcd_jax.models", "mlcd_jax.data",
     "mlcd_jax.labels.store"),
    # the heads (MLCD, contrastive), checkpoints, the transformers mapping
    ("mlcd_jax.head", "mlcd_jax.contrastive", "mlcd_jax.checkpoint", "mlcd_jax.interop.hf"),
    # the train step, encoder weights from anywhere, FLOP counts, the run loop of the trainers
    ("mlcd_jax.step", "mlcd_jax.weights", "mlcd_jax.flops", "mlcd_jax.loop"),
    # the jobs
    ("mlcd_jax.train", "mlcd_jax.labels", "mlcd_jax.evaluate"),
    # entry points
    ("mlcd_jax.plan", "mlcd_jax.demo", "mlcd_jax.lit", "mlcd_jax.ablate",
     "mlcd_jax.interop.__main__", "mlcd_jax.labels.__main__", "mlcd_jax.evaluate.__main__"),
]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The layer of the longest matching prefix."""
    best = max(((len(prefix), i) for i, names in enumerate(LAYERS) for prefix in names
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} has no layer in tests/test_layers.py"
    return best[1]


def imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    main_guards = [n for n in tree.body if isinstance(n, ast.If)
                   and "__main__" in ast.unparse(n.test)]
    exempt = {id(n) for guard in main_guards for n in ast.walk(guard)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlcd_jax"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mlcd_jax")}
    return {m for m in found if m in modules} - {module_name(path)}


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
    assert "mlcd_jax.evaluate.features" in edges["mlcd_jax.labels.embed"]  # inside run


def test_lint_is_clean():
    """ruff (the test extra), configured in pyproject.toml: 100 columns, E, W, F, I, B."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."],
                            cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
