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
import functools
import math
import os
import pathlib
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from mlcd_jax import (checkpoint, config as config_lib, distributed, head, mesh as mesh_lib, optim,
                      reporting, weights)
from mlcd_jax.data import input as input_lib, transforms
from mlcd_jax.evaluate import run as eval_run
from mlcd_jax.models import vit

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the resolved config.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile the train step, print its "
                                  "per-device memory, and exit: no data, no parameters allocated.")
# Multi-host: auto-detected on TPU pods, SLURM and Open MPI; else these (or JAX_* variables, as
# launch/local_multiprocess.sh sets them). See mlcd_jax/distributed.py.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

LOSSES = {"mlcd": head.mlcd_loss, "unicom": head.unicom_loss}


def init_state(key, *, model_cfg, num_rows, tx):
    """The train state, created from `key`: a pure function, so jit can create it sharded."""
    model_key, centers_key = jax.random.split(key)
    encoder = nnx.to_pure_dict(nnx.state(vit.ViT(model_cfg, rngs=nnx.Rngs(model_key))))
    width = model_cfg.embed_dim or model_cfg.width
    centers = jax.random.normal(centers_key, (num_rows, width), jnp.float32) * width ** -0.5
    params = {"encoder": encoder, "centers": centers}
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def train_step(state, batch, *, graphdef, tx, lr_schedule, mesh, c):
    """One optimizer step over `grad_accum` micro-batches; the key folds in the step."""
    images, labels = batch  # (grad_accum, micro, H, W, 3), (grad_accum, micro, l)
    if images.dtype == jnp.uint8:  # real images travel as uint8: 4× less host → device traffic
        images = transforms.normalize(images.astype(jnp.float32))
    key = jax.random.fold_in(jax.random.key(c.seed), state["step"])
    loss_fn = functools.partial(
        LOSSES[c.head.loss], scale=c.head.scale, margin=c.head.margin,
        margin_type=c.head.margin_type, sample_ratio=c.head.sample_ratio, mesh=mesh,
        num_classes=c.head.num_classes, chunk=c.head.chunk or None)

    def micro_step(params, images, labels, key):
        def f(params):
            embedding = nnx.merge(graphdef, params["encoder"])(images).embedding
            return loss_fn(embedding, params["centers"], labels, key=key)
        (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
        return grads, {"loss": loss, **metrics}

    params = state["params"]
    if images.shape[0] == 1:
        grads, metrics = micro_step(params, images[0], labels[0], key)
    else:
        def accumulate(carry, xs):
            i, (img, lab) = xs
            grads, metrics = micro_step(params, img, lab, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro_step, params, images[0],
                                                            labels[0], key))
        total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(images.shape[0]), (images, labels)))
        grads, metrics = jax.tree.map(lambda x: x / images.shape[0], total)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                 "step": state["step"] + 1}
    metrics |= {"grad_norm": optax.global_norm(grads), "lr": lr_schedule(state["step"])}
    return new_state, metrics


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


def state_shardings(abstract_state, *, abstract_encoder, mesh):
    """Encoder parameters by their logical axes (FSDP), centers over every device, optimizer
    moments as their parameters, counters replicated."""
    params = {"encoder": nnx.to_pure_dict(mesh_lib.param_shardings(abstract_encoder, mesh)),
              "centers": mesh_lib.class_sharding(mesh)}
    replicated = mesh_lib.replicated(mesh)
    opt_state = optim.state_shardings(abstract_state["opt_state"], abstract_state["params"], params,
                                      replicated)
    return {"params": params, "opt_state": opt_state, "step": replicated}


class Built(NamedTuple):
    """What the trainer (and `mlcd_jax.plan`) needs to compile and run the train step on a mesh."""
    c: Any
    total_steps: int
    model_cfg: vit.ViTConfig
    graphdef: Any
    init: Callable                # key → state (jit it with out_shardings=shardings)
    shardings: Any
    abstract_state: Any           # ShapeDtypeStructs with shardings: compile / restore target
    batch_sharding: NamedSharding
    abstract_batch: tuple         # (images, labels), (grad_accum, micro, ...) with shardings
    step_fn: Callable             # jitted train step, state donated

    def describe(self) -> str:
        n = sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_state["params"]["encoder"]))
        return (f"encoder {self.model_cfg.pos} {self.c.model.size} {n / 1e6:.2f}M params, head "
                f"{self.c.head.num_classes:,} × {self.model_cfg.embed_dim or self.model_cfg.width} "
                "centers")


def build(c, mesh, total_steps: int | None = None) -> Built:
    """The model, head, optimizer and jitted train step of config `c` on `mesh`, all abstract.
    `total_steps` (the schedule's length) defaults to the config's (planning has no data)."""
    total_steps = config_lib.total_steps(c) if total_steps is None else total_steps
    model_cfg = config_lib.vit_config(c)
    num_rows = mesh_lib.padded_num_classes(c.head.num_classes, mesh.size)

    # Data layout: batch `step` is (grad_accum, micro, ...), micro split over the batch axes.
    batch_shape = (c.grad_accum, c.batch_size // c.grad_accum)
    batch_sharding = NamedSharding(mesh, P(None, mesh_lib.batch_axes(mesh) or None))
    image_shape = (c.data.image_size, c.data.image_size, 3)
    abstract_batch = (jax.ShapeDtypeStruct(batch_shape + image_shape, input_lib.image_dtype(c),
                                           sharding=batch_sharding),
                      jax.ShapeDtypeStruct(batch_shape + (c.data.num_labels,), jnp.int32,
                                           sharding=batch_sharding))

    # Model, head and optimizer: shapes first; a jitted init creates them sharded.
    tx = optim.make_optimizer(c, total_steps)
    graphdef, abstract_encoder = nnx.split(nnx.eval_shape(lambda: vit.ViT(model_cfg,
                                                                         rngs=nnx.Rngs(0))))
    init = functools.partial(init_state, model_cfg=model_cfg, num_rows=num_rows, tx=tx)
    abstract_state = jax.eval_shape(init, jax.random.key(0))
    shardings = state_shardings(abstract_state, abstract_encoder=abstract_encoder, mesh=mesh)

    # The train step: explicit shardings, the state donated.
    step_fn = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx,
                          lr_schedule=optim.schedule(c, total_steps), mesh=mesh, c=c),
        in_shardings=(shardings, (batch_sharding, batch_sharding)),
        out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
    return Built(c, total_steps, model_cfg, graphdef, init, shardings,
                 checkpoint.abstract_like(abstract_state, shardings), batch_sharding,
                 abstract_batch, step_fn)


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


@jax.jit
def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


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

    # Mesh (over every process's devices), and every check that can fail before compute.
    config_lib.validate(c, jax.device_count())
    mesh = mesh_lib.make_mesh(c.mesh)
    if _COMPILE_ONLY.value:  # memory from shapes alone: no data, nothing allocated
        built = build(c, mesh)
        print(f"compiled: {summarize(built, mesh)}", flush=True)
        return
    lock = lock_workdir(workdir)  # noqa: F841 (held until the process ends)

    # Data: synthetic, or a real source through grain joined with its label store (checked
    # now); an epoch is the data's own size.
    source = input_lib.open_source(c)
    num_examples = len(source) if source is not None else None
    total_steps = config_lib.total_steps(c, num_examples)

    # Model, head, optimizer and the train step, from shapes (`python -m mlcd_jax.plan` compiles
    # this same step for TPUs).
    built = build(c, mesh, total_steps)
    shardings, graphdef = built.shardings, built.graphdef
    inputs = input_lib.make_train_input(c, built.batch_sharding, source)
    if c.evals.every:
        e = c.evals
        eval_splits = eval_run.dataset_splits(
            e.dataset, path=e.path, test_path=e.test_path, tfds_name=e.tfds_name,
            train_split=e.train_split, test_split=e.test_split, test_fraction=e.test_fraction,
            flag="config.evals.")

    # Checkpoint: resume from the newest one that reads back whole, else initialize.
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=c.keep_checkpoints)
    found = ckpt.restore_newest_good(built.abstract_state)
    if found is None:
        state = jax.jit(built.init, out_shardings=shardings)(jax.random.key(c.seed))
        start = 0
        if c.model.init_from:
            state["params"]["encoder"], taken, total = weights.init_from(
                c.model.init_from, state["params"]["encoder"], shardings["params"]["encoder"])
            print(f"encoder: {taken} of {total} parameter arrays from {c.model.init_from}")
    else:
        state, data_state, start = found
        if data_state["seed"] != c.seed:
            raise ValueError(f"config.seed {c.seed} differs from the checkpoint's {data_state['seed']}"
                             f" in {ckpt.directory}; use the same seed or a new workdir")
        restore_input_state(inputs, data_state, report_to=print)
    compiled = built.step_fn.lower(built.abstract_state, built.abstract_batch).compile()
    report = reporting.Reporter(workdir, total_steps=total_steps, batch_size=c.batch_size,
                                start_step=start)
    if report.enabled:
        (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
    report.message(f"{'resuming at step ' + str(start) if start else 'starting'}: "
                   f"{summarize(built, mesh, compiled)}")
    for warning in config_lib.warnings(c, total_steps, num_examples):
        report.message(f"warning: {warning}")

    # Preemption: finish the step in flight, save, exit. Several processes agree on the step through
    # jax's preemption service (it watches SIGTERM itself); one process watches it here.
    sigterm = []
    if jax.process_count() == 1:
        signal.signal(signal.SIGTERM, lambda *_: sigterm.append(True))
    preempted = lambda step: bool(sigterm) or multihost_utils.reached_preemption_sync_point(step)

    def run_evals(step):
        encoder = nnx.merge(graphdef, state["params"]["encoder"])
        results = eval_run.evaluate(encoder, *eval_splits, image_size=c.data.image_size, mesh=mesh,
                                    which=c.evals.probes, desc=f"eval at step {step}")
        report.log_eval(step, {k: v["accuracy"] for k, v in results.items()})
        report.start_clock(step)  # images/s counts training only

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

    try:
        for step in range(start + 1, total_steps + 1):
            state, metrics = compiled(state, inputs.next())
            stop = preempted(step)
            if step == start + 1:  # the clock starts after the first step (compile, warm-up)
                jax.block_until_ready(metrics)
                report.start_clock(step)
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
                if not bool(all_finite(state["params"])):
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
        ckpt.close()
        report.close()


def summarize(built: Built, mesh, compiled=None) -> str:
    """Steps, mesh, model and the compiled step's per-device memory, in one line."""
    compiled = compiled or built.step_fn.lower(built.abstract_state, built.abstract_batch).compile()
    mem = compiled.memory_analysis()
    return (f"{built.total_steps} steps on {mesh.size} devices {dict(mesh.shape)}; "
            f"{built.describe()}; per device: arguments {mem.argument_size_in_bytes / 2**20:.1f} "
            f"MiB, temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=config_lib.parse_flags)
