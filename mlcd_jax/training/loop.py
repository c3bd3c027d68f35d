"""The run loop every long job shares: the trainer (`train.py`) and LiT (`lit.py`).

A job builds its state, its jitted step and its batches; `Run` does the rest, the same way for
both: the job's processes joined (`join`, mlcd_jax/runtime/distributed.py), the workdir locked, the
newest checkpoint that reads back whole restored (a corrupt one set aside, the next older tried),
the resolved config written, then the steps with the log / checkpoint / eval cadence, the
progress line and ETA (reporting.py) and a profile if asked. SIGTERM on any process (preemption)
saves at a step boundary every process agrees on (jax's preemption service; one process watches
the signal itself) and exits; rerunning the command resumes exactly. A checkpoint counts as good
only once a later step's loss was finite: on a non-finite loss or parameters the unproven ones are
set aside and the run stops (`errors.Diverged`), saying where the newest good one is.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import signal
import socket
import time
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mlcd_jax.runtime import checkpoint, distributed
from mlcd_jax.runtime.errors import Diverged, UserError
from mlcd_jax.training import reporting


class WorkdirInUse(UserError):
    pass


def join(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> None:
    """Join the job's other processes (a no-op for one), before any other jax call."""
    distributed.initialize(coordinator_address, num_processes, process_id)


def lock_workdir(workdir: pathlib.Path):
    """An exclusive lock on the workdir for this run (process 0 takes it; the lock goes with the
    process, so a killed run leaves none behind). A second run on the same workdir would log
    steps twice and fight over checkpoints: it is refused."""
    if jax.process_index() != 0:
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    handle = open(workdir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise WorkdirInUse(f"{workdir} is in use by another trainer ({holder}); stop it, or give "
                           "this run another --workdir") from None
    except OSError:  # a file system without locks (some network mounts): run unguarded
        return handle
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


class Inputs(Protocol):
    """A job's batches, as the loop asks for them."""

    def next(self, in_flight: jax.Array | None) -> tuple[Any, float | None]:
        """The next batch (a pytree of global arrays), and the seconds the devices sat idle
        waiting for it (None: not measured). `in_flight` is the loss of the step the devices
        are running (a batch may be made while it runs)."""

    def get_state(self) -> Any:
        """JSON of this process's position, saved with each checkpoint."""

    def log_values(self) -> dict[str, float]:
        """Extra values for each metrics record (e.g. images skipped so far)."""

    def messages(self) -> list[str]:
        """Lines to show at the next log (e.g. an unreadable image's name)."""


@jax.jit
def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class Run:
    """One run of a job in `workdir`: locked, checkpointed, reported. Use as a context manager
    (an error never loses a save already started)."""

    def __init__(self, c, workdir: pathlib.Path):
        self.c, self.workdir = c, workdir
        self._lock = lock_workdir(workdir)
        self.ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=c.keep_checkpoints)
        self.report: reporting.Reporter | None = None
        self.start, self.total_steps = 0, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.ckpt.close()
        if self.report is not None:
            self.report.close()

    def restore(self, abstract_state) -> tuple[Any, dict] | None:
        """(state, data_state) of the newest checkpoint that reads back whole, or None."""
        found = self.ckpt.restore_newest_good(abstract_state)
        if found is None:
            return None
        state, data_state, self.start = found
        if data_state["seed"] != self.c.seed:
            raise UserError(f"config.seed {self.c.seed} differs from the checkpoint's "
                            f"{data_state['seed']} in {self.ckpt.directory}; use the same seed "
                            "or a new workdir")
        return state, data_state

    def begin(self, total_steps: int, described: str,
              warnings: tuple[str, ...] = ()) -> reporting.Reporter:
        """Start reporting: metrics and evals of later steps dropped (they are redone), the
        resolved config written, and the start line."""
        self.total_steps = total_steps
        self.report = reporting.Reporter(self.workdir, total_steps=total_steps,
                                         batch_size=self.c.batch_size, start_step=self.start)
        if self.report.enabled:
            (self.workdir / "config.json").write_text(self.c.to_json_best_effort(indent=2))
        self.report.message(f"{'resuming at step ' + str(self.start) if self.start else 'starting'}"
                            f": {described}")
        for warning in warnings:
            self.report.message(f"warning: {warning}")
        return self.report

    def steps(self, state, step_fn: Callable, inputs: Inputs, *,
              evaluate: Callable | None = None) -> tuple[Any, bool]:
        """Steps start + 1 … total_steps of `step_fn(state, batch) -> (state, metrics)` (metrics
        with "loss"), `evaluate(step, state) -> {name: value}` every `config.evals.every` steps
        and after the last. Returns (state, whether it stopped for a preemption)."""
        c, report, ckpt, start, total = (self.c, self.report, self.ckpt, self.start,
                                         self.total_steps)
        sigterm = []
        if jax.process_count() == 1:  # several processes: jax's preemption service watches it
            signal.signal(signal.SIGTERM, lambda *_: sigterm.append(True))
        preempted = lambda step: (bool(sigterm)
                                  or multihost_utils.reached_preemption_sync_point(step))
        evals_every = c.evals.every if evaluate is not None else 0
        unproven = [start] if start else []  # checkpoints awaiting a finite loss after them
        profiling, in_flight = False, None  # in_flight: the loss of the step the devices run
        try:
            for step in range(start + 1, total + 1):
                if c.profile_steps and step == start + 2:  # after compile and warm-up
                    jax.profiler.start_trace(str(self.workdir / "profile"))
                    profiling = True
                batch, idle = inputs.next(in_flight)  # made ahead while the devices ran
                if idle is not None:
                    report.input_wait(idle)
                state, metrics = step_fn(state, batch)
                if in_flight is not None:  # the step before: at most two steps queued
                    in_flight.block_until_ready()
                in_flight = metrics["loss"]
                stop = preempted(step)
                if step == start + 1:  # the clock starts after the first step (compile, warm-up)
                    jax.block_until_ready(metrics)
                    report.start_clock(step)
                if profiling and (step == start + 1 + c.profile_steps or step == total):
                    jax.block_until_ready(metrics)
                    jax.profiler.stop_trace()
                    profiling = False
                    report.message(f"profile of steps {start + 2}–{step}: "
                                   f"{self.workdir / 'profile'} (TensorBoard's profile tab, or "
                                   "xprof)")
                if step % c.log_every == 0 or step == total or stop:
                    values = jax.device_get(metrics) | inputs.log_values()
                    report.log(step, values)
                    ckpt.check()  # a save that failed in the background stops the run now
                    for line in inputs.messages():
                        report.message(line)
                    loss = float(values["loss"])
                elif unproven:  # a NaN stays NaN: one finite loss proves the checkpoint before
                    loss = float(metrics["loss"])
                else:
                    loss = 0.0  # not read: no sync between logs
                if not np.isfinite(loss):
                    raise self._diverged(step, f"the loss is {loss}", unproven)
                unproven = []
                if stop or step % c.checkpoint_every == 0 or step == total:
                    if not bool(all_finite(state["params"])):
                        raise self._diverged(step, "the parameters are not finite", unproven)
                    ckpt.save(step, state, {"step": step, "seed": c.seed,
                                            "inputs": distributed.gather_json(inputs.get_state())})
                    unproven = [step]
                if evals_every and (step % evals_every == 0 or step == total) and not stop:
                    report.pause_clock(step)  # images/s and the ETA count training only
                    began = time.perf_counter()
                    results = evaluate(step, state)
                    report.log_eval(step, results, seconds=time.perf_counter() - began)
                    report.start_clock(step)
                if stop:
                    ckpt.wait()
                    report.message(f"SIGTERM: saved step {step} to {ckpt.directory}; rerun to "
                                   "resume")
                    return state, True
            return state, False
        finally:
            if profiling:
                jax.profiler.stop_trace()

    def _diverged(self, step: int, what: str, unproven: list[int]) -> Diverged:
        """Set aside the checkpoints this divergence puts in doubt; the error to stop with."""
        ckpt = self.ckpt
        ckpt.wait()
        for t in [t for t in unproven if t in ckpt.steps()]:
            ckpt.set_aside(t, "nan", f"{what} at step {step}, after it", self.report.message)
        good = ckpt.latest_step()
        where = (f"the newest good checkpoint is step {good} in {ckpt.directory}: lower "
                 "config.optim.lr or raise config.optim.warmup_steps, then rerun to resume from it"
                 if good is not None else "no good checkpoint was saved before it: lower "
                 "config.optim.lr or raise config.optim.warmup_steps and rerun from the start")
        return Diverged(f"{what} at step {step}; stopped without saving; {where}")
