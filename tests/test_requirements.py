"""Every package the code under mlcd_jax/ imports at run time is named in requirements.txt: the
README's first command (`make demo`) installs only that file, and a package that arrives only with
the test extra (tokenizers came with transformers) passes every test and fails a user. Read from the
source: every import statement, module-level or inside a function, `__main__` blocks included."""

import ast
import importlib.metadata
import re
import sys

from helpers.commands import REPO


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def required() -> set[str]:
    names = set()
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonical(re.split(r"[\s<>=!~\[;]", line, maxsplit=1)[0]))
    return names


def imported_top_level() -> dict[str, str]:
    """{top-level package: a file that imports it} for third-party imports under mlcd_jax/."""
    found = {}
    for path in sorted((REPO / "mlcd_jax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("mlcd_jax", "__future__"):
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_runtime_import_is_in_requirements():
    distributions = importlib.metadata.packages_distributions()
    listed = required()
    missing = []
    for top, where in sorted(imported_top_level().items()):
        dists = {canonical(d) for d in distributions.get(top, [top])}
        if not dists & listed:
            missing.append(f"{top} (imported in {where}; distribution {sorted(dists)})")
    assert not missing, "not in requirements.txt: " + "; ".join(missing)


def test_the_check_sees_what_the_code_imports():
    """The scan is not vacuous: it finds the packages we know the code uses, at any depth."""
    found = imported_top_level()
    for top in ("jax", "flax", "tokenizers", "faiss", "orbax", "PIL"):
        assert top in found, top
    assert "torch" not in found and "transformers" not in found  # test-only, never at run time


def test_requirement_names_parse():
    listed = required()
    assert {"jax", "tokenizers", "orbax-checkpoint", "faiss-cpu"} <= listed, listed
