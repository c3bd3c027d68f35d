"""MLCD pretraining: python -m mlcd_jax.train --config=configs/test_tiny.py --workdir=DIR

`train` reads top to bottom: join the other processes (multi-host) → mesh → lock the workdir →
data (its size sets the epochs) → `build`: model, head, optimizer and one jitted train step, all
abstract (`python -m mlcd_jax.plan` compiles the same for TPUs) → checkpoint (resume from the
newest good one) or a sharded init → compile → loop, with periodic evals. SIGTERM (preemption)
saves a checkpoint at the next step boundary and exits; rerunning the command resumes exactly. A
config or data mistake, a diverged run or a failed save ends in one line (`main`).
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import signal
import socket
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from mlcd_jax import (
    checkpoint,
    config as config_lib,
    distributed,
    mesh as mesh_lib,
    reporting,
    step as step_lib,
    weights,
)
from mlcd_jax.data import input as input_lib
from mlcd_jax.evaluate import run as eval_run

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the resolved config.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile the train step, print its "
                                  "per-device memory, and exit: no data, no parameters allocated.")
# Multi-host: auto-detected on TPU pods, SLURM and Open MPI; else these (or JAX_* variables, as
# launch/local_multiprocess.sh sets them). See mlcd_jax/distributed.py.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def restore_input_state(inputs, data_state, report_to) -> None:
    """Each process resumes its own input iterator. On another process count the per-process
    positions do not map onto the new shares: identical states (the synthetic input) carry over;
    a grain pipeline restarts its order, said so."""
    saved = data_state["inputs"]
    if len(saved) == jax.process_count():
        inputs.set_state(saved[jax.process_index()])
    elif all(s == saved[0] for s in saved):
        inputs.set_state(saved[0])
    elif jax.process_index() == 0:
        report_to(f"warning: the checkpoint was written by {len(saved)} processes, this job has "
                  f"{jax.process_count()}: the input pipeline starts its shuffled order afresh")


class WorkdirInUse(RuntimeError):
    pass


def lock_workdir(workdir: pathlib.Path):
    """An exclusive lock on the workdir for this run (process 0 takes it; the lock goes with the
    process, so a killed run leaves none behind). A second trainer on the same workdir would log
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


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every save at INFO
    try:
        train(CONFIG.value, pathlib.Path(_WORKDIR.value).absolute())
    except (ValueError, FileNotFoundError, FloatingPointError, WorkdirInUse,
            checkpoint.SaveFailed) as e:
        # A mistake in the config or the data, a diverged run, a full disk: one line, not a
        # traceback (whatever was saved is kept).
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3 if isinstance(e, FloatingPointError) else 2)


def train(c, workdir: pathlib.Path) -> None:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    # Mesh (over every process's devices), and every check that can fail before compute. An
    # encoder to continue from sets the architecture (a command-line field may not contradict it).
    explicit = set(config_flags.get_override_values(flags.FLAGS["config"]))
    adopted = weights.adopt_architecture(c, explicit) if c.model.init_from else ""
    config_lib.validate(c, jax.device_count())
    mesh = mesh_lib.make_mesh(c.mesh)
    if _COMPILE_ONLY.value:  # memory from shapes alone: no data, nothing allocated
        built = step_lib.build(c, mesh)
        print(f"compiled: {step_lib.summarize(built, mesh)}", flush=True)
        for line in built.replicated:
            print(f"warning: {line}", flush=True)
        return
    lock = lock_workdir(workdir)  # noqa: F841 (held until the process ends)

    # Data: synthetic, or a real source through grain joined with its label store (checked
    # now); an epoch is the data's own size.
    source = input_lib.open_source(c)
    num_examples = len(source) if source is not None else None
    total_steps = config_lib.total_steps(c, num_examples)

    # Model, head, optimizer and the train step, from shapes (`python -m mlcd_jax.plan` compiles
    # this same step for TPUs).
    built = step_lib.build(c, mesh, total_steps)
    shardings, graphdef = built.shardings, built.graphdef
    inputs = input_lib.make_train_input(c, built.batch_sharding, source)
    if c.evals.every:
        eval_splits = eval_run.splits_of(c.evals, "config.evals.")

    # Checkpoint: resume from the newest one that reads back whole, else initialize.
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=c.keep_checkpoints)
    found = ckpt.restore_newest_good(built.abstract_state)
    if found is None:
        state = jax.jit(built.init, out_shardings=shardings)(jax.random.key(c.seed))
        start = 0
        if c.model.init_from:
            state["params"]["encoder"], loaded = weights.init_from(
                c.model.init_from, state["params"]["encoder"], shardings["params"]["encoder"])
            adopted = f"encoder: {adopted}: {loaded}"
    else:
        state, data_state, start = found
        if adopted:
            adopted = f"encoder: {adopted}: resuming, its weights not loaded again"
        if data_state["seed"] != c.seed:
            raise ValueError(f"config.seed {c.seed} differs from the checkpoint's "
                             f"{data_state['seed']} in {ckpt.directory}; use the same seed or a "
                             "new workdir")
        restore_input_state(inputs, data_state, report_to=print)
    compiled = built.step_fn.lower(built.abstract_state, built.abstract_batch).compile()
    report = reporting.Reporter(workdir, total_steps=total_steps, batch_size=c.batch_size,
                                start_step=start)
    if report.enabled:
        (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
    report.message(f"{'resuming at step ' + str(start) if start else 'starting'}: "
                   f"{step_lib.summarize(built, mesh, compiled)}")
    if adopted:
        report.message(adopted)
    for warning in config_lib.warnings(c, total_steps, num_examples) + built.replicated:
        report.message(f"warning: {warning}")

    # Preemption: finish the step in flight, save, exit. Several processes agree on the step through
    # jax's preemption service (it watches SIGTERM itself); one process watches it here.
    sigterm = []
    if jax.process_count() == 1:
        signal.signal(signal.SIGTERM, lambda *_: sigterm.append(True))
    preempted = lambda step: bool(sigterm) or multihost_utils.reached_preemption_sync_point(step)

    def run_evals(step):
        report.pause_clock(step)  # images/s and the ETA count training only
        began = time.perf_counter()
        encoder = nnx.merge(graphdef, state["params"]["encoder"])
        results = eval_run.evaluate(encoder, *eval_splits, image_size=c.data.image_size, mesh=mesh,
                                    which=c.evals.probes, desc=f"eval at step {step}")
        report.log_eval(step, {k: v["accuracy"] for k, v in results.items()},
                        seconds=time.perf_counter() - began)
        report.start_clock(step)

    # A checkpoint counts as good once a later step's loss was finite (a NaN stays NaN), so the
    # loss is read at each step while a saved checkpoint awaits that proof; on a non-finite loss
    # the unproven ones are set aside and the run stops.
    unproven = [start] if start else []

    def diverged(step, what):
        ckpt.wait()
        for t in [t for t in unproven if t in ckpt.steps()]:
            ckpt.set_aside(t, "nan", f"{what} at step {step}, after it", report.message)
        good = ckpt.latest_step()
        where = (f"the newest good checkpoint is step {good} in {ckpt.directory}: lower "
                 "config.optim.lr or raise config.optim.warmup_steps, then rerun to resume from it"
                 if good is not None else "no good checkpoint was saved before it: lower "
                 "config.optim.lr or raise config.optim.warmup_steps and rerun from the start")
        return FloatingPointError(f"{what} at step {step}; stopped without saving; {where}")

    profiling = False
    in_flight = None  # the loss of the step the devices are running
    try:
        for step in range(start + 1, total_steps + 1):
            if c.profile_steps and step == start + 2:  # after the first step's compile and warm-up
                jax.profiler.start_trace(str(workdir / "profile"))
                profiling = True
            batch, idle = inputs.next(in_flight)  # made ahead while the devices ran
            report.input_wait(idle)
            state, metrics = compiled(state, batch)
            if in_flight is not None:  # the step before: at most two steps queued on the devices
                in_flight.block_until_ready()
            in_flight = metrics["loss"]
            stop = preempted(step)
            if step == start + 1:  # the clock starts after the first step (compile, warm-up)
                jax.block_until_ready(metrics)
                report.start_clock(step)
            if profiling and (step == start + 1 + c.profile_steps or step == total_steps):
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
                profiling = False
                report.message(f"profile of steps {start + 2}–{step}: {workdir / 'profile'} "
                               "(TensorBoard's profile tab, or xprof)")
            if step % c.log_every == 0 or step == total_steps or stop:
                values = jax.device_get(metrics) | {"skipped_images": inputs.skipped.count}
                report.log(step, values)
                ckpt.check()  # a save that failed in the background stops the run now
                for name in inputs.new_skips():
                    report.message(f"skipped an unreadable image: {name}")
                loss = float(values["loss"])
            elif unproven:
                loss = float(metrics["loss"])
            else:
                loss = 0.0  # not read: no sync between logs
            if not np.isfinite(loss):
                raise diverged(step, f"the loss is {loss}")
            unproven = []
            if stop or step % c.checkpoint_every == 0 or step == total_steps:
                if not bool(step_lib.all_finite(state["params"])):
                    raise diverged(step, "the parameters are not finite")
                ckpt.save(step, state, {"step": step, "seed": c.seed,
                                        "inputs": distributed.gather_json(inputs.get_state())})
                unproven = [step]
            if c.evals.every and (step % c.evals.every == 0 or step == total_steps) and not stop:
                run_evals(step)
            if stop:
                ckpt.wait()
                report.message(f"SIGTERM: saved step {step} to {ckpt.directory}; rerun to resume")
                break
    finally:  # an error never loses a save already started
        if profiling:
            jax.profiler.stop_trace()
        ckpt.close()
        report.close()


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=config_lib.parse_flags)
