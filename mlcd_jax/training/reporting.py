"""What the user sees of a run: a progress line (step/total, metrics, images/s, ETA), metrics.jsonl
and TensorBoard events in the workdir. Only process 0 writes.

Logging never stops or blocks training: a write that fails (a full disk) is said once, in one line,
and logging to that file stops while the steps and checkpoints go on. TensorBoard events are
written synchronously (tensorboardX's own writer queues them to a thread, which on a full disk
dies and leaves the next `add_scalar` blocked forever).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time

import jax


class _Log:
    """Append-only writes to one file that, once they fail, say so once and stop."""

    def __init__(self, path: pathlib.Path):
        self.path, self.failed = path, False

    def append(self, text: str) -> None:
        if self.failed:
            return
        try:
            with self.path.open("a") as f:
                f.write(text)
        except OSError as e:
            self.fail(e)

    def fail(self, e: OSError) -> None:
        self.failed = True
        print(f"warning: cannot write {self.path} ({e.strerror or e}); training goes on without "
              "it", file=sys.stderr, flush=True)


def _tensorboardx():
    """tensorboardX's event writer, summaries and protos. tensorboardX imports torch where it is
    installed (~1.5 s) only to accept its tensors; we write plain numbers, so torch is kept out
    of that import (left alone where something imported it already)."""
    keep_out = "torch" not in sys.modules
    if keep_out:
        sys.modules["torch"] = None  # `import torch` now raises ImportError, which it expects
    try:
        from tensorboardX import summary
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2
    finally:
        if keep_out:
            del sys.modules["torch"]
    return EventsWriter, summary, event_pb2


class _TensorBoard:
    def __init__(self, directory: pathlib.Path):
        self.log = _Log(directory)
        self.writer = None
        try:
            EventsWriter, *_ = _tensorboardx()
            directory.mkdir(parents=True, exist_ok=True)
            self.writer = EventsWriter(str(directory / "events"))
        except OSError as e:
            self.log.fail(e)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None or self.log.failed:
            return
        _, summary, event_pb2 = _tensorboardx()
        try:
            for tag, value in values.items():
                if not math.isfinite(value):  # kept in metrics.jsonl; TensorBoard plots no NaN
                    continue
                self.writer.write_event(event_pb2.Event(
                    wall_time=time.time(), step=step, summary=summary.scalar(tag, value)))
            self.writer.flush()
        except OSError as e:
            self.log.fail(e)

    def close(self) -> None:
        if self.writer is not None and not self.log.failed:
            try:
                self.writer.close()
            except OSError:
                pass


def read_jsonl(path: pathlib.Path) -> list[dict]:
    """The records of a JSON-lines file; a torn line (a kill or a full disk mid-write) is
    skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_jsonl(path: pathlib.Path, after_step: int) -> None:
    """Keep the records up to `after_step` (a resumed run redoes the later steps), dropping torn
    lines; rewritten atomically."""
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path)
            if isinstance(r.get("step"), int) and r["step"] <= after_step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


class Reporter:
    """Progress, metrics and evals of a run. Its clock (big_vision's Chrono, in spirit) counts
    training time only: it starts after the first step (compile, warm-up), pauses during evals,
    and the ETA is the remaining steps at the average rate since it started, with the time spent
    in evals shown apart."""

    def __init__(self, workdir, *, total_steps: int, batch_size: int, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.total, self.batch = total_steps, batch_size
        self.workdir = pathlib.Path(workdir)
        self.metrics = _Log(self.workdir / "metrics.jsonl")
        self.evals = _Log(self.workdir / "evals.jsonl")
        self._mark = None  # (time, step) of the last report or resume; None while paused
        self._timed_steps, self._timed_seconds, self.eval_seconds = 0, 0.0, 0.0
        self._input_wait = 0.0  # seconds the devices sat idle waiting for input, this lap
        self._measures_input = False  # whether the loop reports input waits at all
        self.tb = None
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            for log in (self.metrics, self.evals):
                try:
                    truncate_jsonl(log.path, start_step)
                except OSError as e:
                    log.fail(e)
            self.tb = _TensorBoard(self.workdir / "tensorboard")

    def start_clock(self, step: int) -> None:
        """Start (or resume) timing training at `step`."""
        self._mark = (time.perf_counter(), step)
        self._input_wait = 0.0

    def input_wait(self, seconds: float) -> None:
        """The devices sat idle `seconds` waiting for the next batch (shown as a fraction of the
        time between reports)."""
        self._input_wait += seconds
        self._measures_input = True

    def pause_clock(self, step: int) -> None:
        """Stop timing (an eval follows); the steps since the last mark count as trained."""
        self._lap(step)
        self._mark = None

    def _lap(self, step: int) -> tuple[int, float] | None:
        """Add the time since the mark to training time; this lap's (steps, seconds)."""
        if self._mark is None or step <= self._mark[1]:
            return None
        now = time.perf_counter()
        steps, seconds = step - self._mark[1], now - self._mark[0]
        self._timed_steps += steps
        self._timed_seconds += seconds
        self._mark = (now, step)
        return steps, seconds

    def log(self, step: int, metrics: dict[str, float]) -> None:
        lap = self._lap(step)
        waited, self._input_wait = self._input_wait, 0.0
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if lap:
            record["images_per_s"] = lap[0] * self.batch / lap[1]
            if self._measures_input:
                record["input_wait"] = min(1.0, waited / lap[1])
        self.metrics.append(json.dumps(record) + "\n")
        self.tb.scalars(step, {k: v for k, v in record.items() if k != "step"})
        average = self._timed_steps / self._timed_seconds if self._timed_seconds else None
        eta = f"{(self.total - step) / average / 60:.1f} min" if average else "?"
        shown = " ".join(f"{k} {record[k]:.4g}" for k in ("loss", "pos_cos", "neg_cos", "lr")
                         if k in record)
        speed = f" {record['images_per_s']:.1f} img/s" if lap else ""
        if "input_wait" in record:
            speed += f" (input wait {record['input_wait']:.0%})"
        if record.get("skipped_images"):
            speed += f" ({record['skipped_images']:.0f} unreadable images skipped)"
        evals = f" (+ evals, {self.eval_seconds:.0f} s so far)" if self.eval_seconds else ""
        print(f"step {step}/{self.total} ({100 * step / self.total:.0f}%) {shown}{speed} "
              f"ETA {eta}{evals}", flush=True)

    def log_eval(self, step: int, accuracies: dict[str, float], seconds: float = 0.0) -> None:
        """Eval accuracies at `step` (which took `seconds`): evals.jsonl, TensorBoard (eval/NAME)
        and one line."""
        self.eval_seconds += seconds
        if not self.enabled:
            return
        self.evals.append(json.dumps({"step": step, **accuracies}) + "\n")
        self.tb.scalars(step, {f"eval/{k}": v for k, v in accuracies.items()})
        print(f"eval at step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in accuracies.items()),
              flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
