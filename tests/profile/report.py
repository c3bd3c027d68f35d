"""Sums a profile that tests/profile/sitecustomize.py wrote: CPU-seconds and XLA's work by kind
of process and by test (its commands), and the programs that took longest to compile.

    .venv/bin/python tests/profile/report.py /tmp/prof.jsonl [--top 30]
"""

import argparse
import collections
import json
import os

TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COLUMNS = ("processes", "cpu", "compile", "programs", "cache_reads", "trace", "lower")


def kind(argv: list[str]) -> str:
    """'tests' (a pytest process), 'command server', or the command's module."""
    first = argv[0] if argv else "python"
    if "pytest" in first or first == "-c":  # execnet starts xdist's workers as `python -c`
        return "tests"
    if first.endswith("command_server.py"):
        return "command server"
    # A forked command's argv[0] is its module; `python -m`'s is the module's file.
    path = first.removesuffix(".py").removesuffix("/__main__")
    if "mlcd_jax/" in path:
        return "mlcd_jax." + path.split("mlcd_jax/", 1)[1].replace("/", ".")
    return first


def costs(line: dict) -> dict:
    # sitecustomize.py tells a compile from a cache read, per program.
    seconds, compiles, reads = (sum(p[i] for p in line["programs"].values()) for i in range(3))
    total = lambda event: line["events"].get(event, (0.0, 0))[0]
    return {"processes": 1, "cpu": line["cpu"], "compile": seconds, "programs": compiles,
            "cache_reads": reads, "trace": total(TRACE), "lower": total(LOWER)}


def table(title: str, rows: dict, top: int, columns=COLUMNS) -> str:
    out = [f"{title:<60}" + "".join(f"{c:>12}" for c in columns)]
    for name, c in sorted(rows.items(), key=lambda kv: -kv[1][columns[1]])[:top]:
        out.append(f"{name[-60:]:<60}" + "".join(
            f"{c[k]:>12,.0f}" if isinstance(c[k], int) else f"{c[k]:>12,.1f}" for k in columns))
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=30)
    a = p.parse_args(argv)
    if not os.path.isfile(a.profile):
        p.error(f"{a.profile}: no such profile; run the suite with MLCD_PROFILE={a.profile} "
                "PYTHONPATH=tests/profile first")
    by_kind, by_test, programs = (collections.defaultdict(collections.Counter) for _ in range(3))
    with open(a.profile) as f:
        for line in map(json.loads, f):
            c = costs(line)
            by_kind[kind(line["argv"])].update(c)
            if kind(line["argv"]) not in ("tests", "command server"):
                by_test[line["test"] or "(no test)"].update(c)
            for name, (seconds, compiles, reads) in line["programs"].items():
                programs[name].update({"processes": 1, "compile": seconds, "programs": compiles,
                                       "cache_reads": reads})
    print(table("process (CPU-seconds)", by_kind, a.top))
    print()
    print(table("test, its commands only", by_test, a.top))
    print()
    print(table("program (all processes)", programs, a.top,
                ("processes", "compile", "programs", "cache_reads")))


if __name__ == "__main__":
    main()
