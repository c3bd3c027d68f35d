"""What XLA compiled, read from the optimized program's text and its buffer assignment: kernels
(fusions and library calls) and how often each runs per step, collectives and their bytes, bytes
moved through device memory, and the largest temporary buffers with their shapes.

Used by `mlcd_jax.plan` on programs compiled for a GPU or TPU target this machine does not have,
so that a change to the step can be judged before it runs there. A reading of text, not a cost
model: loops count by the trip count XLA records for them (a loop whose count is only known at
run time is counted once, and said so); a kernel's bytes are what its inputs and outputs occupy,
except that a sliced input counts the slice and an in-place update counts the update.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import tempfile

BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
         "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[su](?:4|8|16|32|64)|bf16|f(?:8e\w+|16|32|64)|c64|c128)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
# Work that moves no data or that another instruction accounts for.
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
        "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "iota",
        "all-reduce-done", "all-gather-done", "collective-permute-done", "async-done",
        "copy-done", "send-done", "recv-done", "reduce-scatter-done", "all-to-all-done"}
CONTROL = {"while", "conditional", "call", "async-start"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
_SLICES = {"slice", "dynamic-slice", "gather"}
_IN_PLACE = {"dynamic-update-slice", "scatter"}


def shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape (a tuple's elements summed)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * BYTES.get(dtype, 1)  # f8 types: 1 byte
    return total


def array_shapes(shape: str) -> list[str]:
    return [f"{dtype}[{dims}]" for dtype, dims in _ARRAY.findall(shape)]


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    args: str = ""      # the text between the opcode's parentheses (a parameter's number)

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=%?([\w.\-]+)", self.attrs)
        return m.group(1) if m else None

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""


def _closing(text: str, start: int) -> int:
    """Index of the bracket that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "({[":
            depth += 1
        elif text[i] in ")}]":
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


def _instruction(line: str) -> Instr | None:
    m = re.match(r"\s+(?:ROOT )?%(\S+) = ", line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _closing(rest, 0) + 1
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _closing(rest, op.end() - 1)
    operands = re.findall(r"%([\w.\-]+)", rest[op.end():close])
    return Instr(m.group(1), shape, op.group(1), operands, rest[close + 1:],
                 rest[op.end():close])


def parse(text: str) -> tuple[dict[str, dict[str, Instr]], str]:
    """{computation: {instruction name: Instr}} (in program order) and the entry's name."""
    computations, entry, current = {}, "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = computations.setdefault(header.group(2), {})
            if header.group(1):
                entry = header.group(2)
        elif line.startswith("}"):
            current = None
        elif current is not None:
            instr = _instruction(line)
            if instr:
                current[instr.name] = instr
    return computations, entry


def _trip_count(instr: Instr) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
    return int(m.group(1)) if m else None


def _called(instr: Instr) -> list[str]:
    names = [instr.attr(k) for k in ("calls", "to_apply", "true_computation",
                                     "false_computation")]
    branches = re.search(r"branch_computations=\{([^}]*)\}", instr.attrs)
    if branches:
        names += re.findall(r"%([\w.\-]+)", branches.group(1))
    return [n for n in names if n]


def _collective(opcode: str) -> str | None:
    base = opcode.removesuffix("-start")
    return base if base in COLLECTIVES else None


@dataclasses.dataclass
class Kernel:
    name: str
    kind: str           # "fusion", "library" (custom-call), "collective", or the opcode
    target: str         # the library call's target or the fusion's kind; "" otherwise
    bytes: float        # per launch
    launches: float     # per step
    shape: str
    op_name: str
    payload: int = 0    # a collective's result, bytes per launch


class Program:
    """A compiled program's kernels, per step, from its optimized HLO text."""

    def __init__(self, text: str):
        self.computations, self.entry = parse(text)
        self.kernels: list[Kernel] = []
        self.unknown_loops = 0
        self._walk(self.entry, 1.0)

    def _walk(self, name: str, times: float):
        for instr in self.computations.get(name, {}).values():
            if instr.opcode in FREE:
                continue
            if instr.opcode == "while":
                trips = _trip_count(instr)
                if trips is None:
                    self.unknown_loops += 1
                    trips = 1
                self._walk(instr.attr("body"), times * trips)
                self._walk(instr.attr("condition"), times * (trips + 1))
            elif instr.opcode in CONTROL:
                called = _called(instr)
                for sub in called:  # a conditional: each branch at its share
                    self._walk(sub, times / (len(called) if instr.opcode == "conditional" else 1))
            else:
                self.kernels.append(self._kernel(name, instr, times))

    def _kernel(self, computation: str, instr: Instr, times: float) -> Kernel:
        target = ""
        if instr.opcode == "fusion":
            kind, target = "fusion", instr.attr("kind") or ""
            moved = self._fusion_bytes(computation, instr)
        else:
            kind = ("library" if instr.opcode == "custom-call"
                    else "collective" if _collective(instr.opcode) else instr.opcode)
            if kind == "library":
                m = re.search(r'custom_call_target="([^"]+)"', instr.attrs)
                target = m.group(1) if m else "?"
            elif kind == "collective":
                target = _collective(instr.opcode)
            moved = self._operand_bytes(computation, instr) + _output_bytes(instr)
        payload = shape_bytes(_result(instr)) if kind == "collective" else 0
        return Kernel(instr.name, kind, target, moved, times, instr.shape, instr.op_name, payload)

    def _operand_bytes(self, computation: str, instr: Instr) -> int:
        scope = self.computations[computation]
        return sum(shape_bytes(scope[o].shape) for o in instr.operands if o in scope)

    def _fusion_bytes(self, computation: str, instr: Instr) -> int:
        """Inputs (a parameter read only through slices counts the slices; one updated in place
        counts nothing) and outputs (an in-place update counts the update)."""
        body = self.computations.get(instr.attr("calls") or "", {})
        scope = self.computations[computation]
        users = collections.defaultdict(list)
        for i in body.values():
            for o in i.operands:
                users[o].append(i)
        params = {int(i.args): i for i in body.values() if i.opcode == "parameter"}
        moved = 0
        for index, operand in enumerate(instr.operands):
            whole = shape_bytes(scope[operand].shape) if operand in scope else 0
            moved += _read_bytes(params[index], users, whole) if index in params else whole
        root = next((i for i in reversed(body.values())), None)
        moved += _written_bytes(root, body) if root else shape_bytes(instr.shape)
        return moved

    # -- summaries ------------------------------------------------------------------------------

    def library_calls(self) -> dict[str, int]:
        """Library calls in the program (static), by target."""
        return dict(collections.Counter(k.target for k in self.kernels if k.kind == "library"))

    def summary(self) -> dict:
        kernels = [k for k in self.kernels if k.kind != "collective"]
        collectives = collections.defaultdict(lambda: {"count": 0.0, "bytes": 0.0})
        for k in self.kernels:
            if k.kind == "collective":
                collectives[k.target]["count"] += k.launches
                collectives[k.target]["bytes"] += k.launches * k.payload
        targets = self.library_calls()
        transposes = [k for k in kernels if _is_transpose(k)]
        return {
            "fusions": sum(k.kind == "fusion" for k in kernels),
            "library_calls": sum(targets.values()),
            "library_targets": targets,
            "other_kernels": sum(k.kind not in ("fusion", "library") for k in kernels),
            "launches_per_step": sum(k.launches for k in kernels),
            "cudnn_attention": any(t.startswith("__cudnn$fmha") for t in targets),
            "collectives": {k: dict(v) for k, v in collectives.items()},
            "collective_bytes": sum(v["bytes"] for v in collectives.values()),
            "hbm_bytes": sum(k.bytes * k.launches for k in self.kernels),
            "transposes": {"kernels": len(transposes),
                           "bytes": sum(k.bytes * k.launches for k in transposes)},
            "loops_of_unknown_length": self.unknown_loops,
        }

    def heaviest(self, n: int = 5) -> list[dict]:
        """The `n` kernels that move the most bytes per step."""
        top = sorted(self.kernels, key=lambda k: -k.bytes * k.launches)[:n]
        return [{"kernel": k.name, "kind": k.kind, "target": k.target,
                 "bytes_per_step": k.bytes * k.launches, "launches": k.launches,
                 "shape": " ".join(array_shapes(k.shape)[:2]), "source": k.op_name}
                for k in top]

    def arrays_shaped(self, dims: list[int]) -> list[str]:
        """The program's arrays whose axes are `dims` in any order (axes of size 1 aside), e.g.
        (batch, heads, T, T): attention scores held whole."""
        want, found = sorted(d for d in dims if d != 1), set()
        for comp in self.computations.values():
            for instr in comp.values():
                for shape in array_shapes(instr.shape):
                    axes = [int(d) for d in shape[shape.index("[") + 1:-1].split(",") if d]
                    if sorted(d for d in axes if d != 1) == want:
                        found.add(shape)
        return sorted(found)

    def op_names(self) -> dict[str, str]:
        return {n: i.op_name for comp in self.computations.values() for n, i in comp.items()}


def _read_bytes(param: Instr, users, whole: int) -> int:
    """What a fusion reads of one input: the slices it takes, nothing if it is only updated in
    place, else all of it (through bitcasts)."""
    seen, frontier, sliced = set(), [param], 0
    while frontier:
        node = frontier.pop()
        for user in users.get(node.name, []):
            if user.name in seen:
                continue
            seen.add(user.name)
            if user.opcode == "bitcast":
                frontier.append(user)
            elif user.opcode in _SLICES and user.operands[0] == node.name:
                sliced += shape_bytes(user.shape)
            elif user.opcode in _IN_PLACE and user.operands[0] == node.name:
                continue
            else:
                return whole
    return min(sliced, whole)


def _written_bytes(root: Instr, body: dict[str, Instr]) -> int:
    if root.opcode == "tuple":
        return sum(_written_bytes(body[o], body) if o in body else 0 for o in root.operands)
    if root.opcode == "dynamic-update-slice" and root.operands[1] in body:
        return shape_bytes(body[root.operands[1]].shape)
    if root.opcode == "scatter" and root.operands[-1] in body:
        return shape_bytes(body[root.operands[-1]].shape)
    if root.opcode == "bitcast" and root.operands and root.operands[0] in body:
        return _written_bytes(body[root.operands[0]], body)
    return shape_bytes(root.shape)


def _output_bytes(instr: Instr) -> int:
    """A kernel's outputs, without a library call's scratch space (a u8 / s8 vector)."""
    if instr.opcode == "custom-call":
        return sum(shape_bytes(s) for s in array_shapes(instr.shape)
                   if not re.match(r"[su]8\[\d*\]$", s))
    return shape_bytes(instr.shape)


def _result(instr: Instr) -> str:
    """A collective's result: an asynchronous all-gather's or collective-permute's shape holds
    its input before its output."""
    if instr.opcode in ("all-gather-start", "collective-permute-start"):
        parts = _tuple_elements(instr.shape)
        return parts[1] if len(parts) > 1 else instr.shape
    return instr.shape


def _tuple_elements(shape: str) -> list[str]:
    """The top-level elements of a tuple shape ([shape] for an array)."""
    if not shape.startswith("("):
        return [shape]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(shape):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if (ch == "," and depth == 1) or (ch == ")" and depth == 0):
            parts.append(re.sub(r"/\*.*?\*/", "", shape[start:i]).strip())
            start = i + 1
    return parts


def _is_transpose(k: Kernel) -> bool:
    """A kernel whose job is to transpose: a transpose fusion, or a copy (a layout change)."""
    return k.kind == "copy" or (k.kind == "fusion" and "transpose" in k.name)


# -- buffer assignment -----------------------------------------------------------------------------

_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+), (.*)$")
_VALUE = re.compile(r"^ value: <\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\): (.*)$")
_NOT_TEMP = ("parameter", "constant", "maybe-live-out", "thread-local", "output shape")


def largest_temporaries(assignment: str, n: int = 5, op_names: dict | None = None) -> list[dict]:
    """The `n` largest temporary buffers of a buffer assignment (XLA's
    `*buffer-assignment.txt` dump): each slot of the temporary allocations (values placed at the
    same offset with the same size, at different times) with its size, the shapes that use it and
    the source of the largest."""
    slots = collections.defaultdict(list)
    allocation, temp = None, False
    for line in assignment.splitlines():
        a = _ALLOCATION.match(line)
        if a:
            allocation, temp = a.group(1), not any(t in a.group(3) for t in _NOT_TEMP)
            continue
        v = _VALUE.match(line)
        if v and temp:
            name, size, offset, shape = v.group(1), int(v.group(2)), int(v.group(3)), v.group(4)
            if not shape.startswith("("):  # a tuple's own entry is a table of pointers
                slots[(allocation, offset, size)].append((name, shape.split("{")[0]))
    top = sorted(slots.items(), key=lambda kv: -kv[0][2])[:n]
    out = []
    for (_, _, size), values in top:
        shapes = collections.Counter(s for _, s in values)
        name = values[0][0]
        out.append({"bytes": size,
                    "shapes": [f"{c}× {s}" if c > 1 else s for s, c in shapes.most_common(4)],
                    "values": len(values), "first": name,
                    "source": (op_names or {}).get(name, "")})
    return out


def compile_and_read(lowered, compiler_options: dict | None = None):
    """Compile `lowered` with XLA dumping its buffer assignment into a temporary folder; the
    compiled program and the assignment's text ("" where the backend writes none)."""
    with tempfile.TemporaryDirectory(prefix="mlcd_hlo_") as dump:
        options = dict(compiler_options or {}) | {"xla_dump_to": dump}
        compiled = lowered.compile(compiler_options=options)
        files = sorted(glob.glob(os.path.join(dump, "*after_optimizations-buffer-assignment.txt")),
                       key=os.path.getsize)
        assignment = open(files[-1]).read() if files else ""
    return compiled, assignment
