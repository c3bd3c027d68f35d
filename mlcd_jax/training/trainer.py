"""MLCD pretraining, the trainer behind `python -m mlcd_jax.train` (its flags: mlcd_jax/train.py).

`run` reads top to bottom: join the other processes (multi-host) → mesh → lock the workdir →
data (its size sets the epochs) → `build`: model, head, optimizer and one jitted train step, all
abstract (`python -m mlcd_jax.plan` compiles the same for TPUs) → checkpoint (resume from the
newest good one) or a sharded init → compile → the steps, with periodic evals. The run loop
(`loop.py`, shared with LiT) owns the lock, checkpoints and their proof, preemption (SIGTERM saves
at the next step boundary and exits; rerunning the command resumes exactly), the cadence and the
progress line; a config or data mistake, a diverged run or a failed save ends in one line.
"""

from __future__ import annotations

import pathlib

import jax
from flax import nnx

from mlcd_jax.config import schema as config_lib
from mlcd_jax.data import transforms
from mlcd_jax.evaluate import run as eval_run
from mlcd_jax.interop import weights
from mlcd_jax.runtime import mesh as mesh_lib
from mlcd_jax.training import input as input_lib, loop, step as step_lib, validation


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


def run(c, workdir, *, explicit=frozenset(), compile_only: bool = False,
        multihost=(None, None, None)) -> None:
    """Train config `c` in `workdir` (resuming from its newest good checkpoint). `explicit`: the
    config fields set on the command line (an encoder to continue from may not contradict them);
    `compile_only`: compile the step, print its per-device memory and return (no data, nothing
    allocated); `multihost`: (coordinator, process count, process id) where not auto-detected."""
    loop.join(*multihost)
    workdir = pathlib.Path(workdir).absolute()
    c = config_lib.upgrade(c)

    # Mesh (over every process's devices), and every check that can fail before compute. An
    # encoder to continue from sets the architecture (a command-line field may not contradict it).
    adopted = weights.adopt_architecture(c, explicit) if c.model.init_from else ""
    model_cfg, head_cfg = validation.validate(c, jax.device_count())
    mesh = mesh_lib.make_mesh(c.mesh)
    if compile_only:  # memory from shapes alone: no data, nothing allocated
        built = step_lib.build(c, mesh, config_lib.total_steps(c), model_cfg, head_cfg)
        print(f"compiled: {step_lib.summarize(built, mesh)}", flush=True)
        for line in built.replicated:
            print(f"warning: {line}", flush=True)
        return
    with loop.Run(c, workdir) as run:  # the workdir locked, its checkpoints opened
        # Data: synthetic, or a real source through grain, each record joined with its labels by
        # key (the store checked now); an epoch is the labelled records.
        source = input_lib.open_source(c)
        joined = input_lib.join_labels(c, source)
        regions = input_lib.join_regions(c, joined, source)  # each region head's, by key
        num_examples = (len(joined.source) if joined else len(source)) if source else None
        total_steps = config_lib.total_steps(c, num_examples)

        # Model, head, optimizer and the train step, from shapes (`python -m mlcd_jax.plan`
        # compiles this same step for TPUs).
        built = step_lib.build(c, mesh, total_steps, model_cfg, head_cfg)
        shardings, graphdef = built.shardings, built.graphdef
        native = transforms.native_sizing(c.data, model_cfg.patch)  # None: square images
        inputs = input_lib.make_train_input(c, built.batch_sharding, source, joined, regions,
                                            native)
        if c.evals.every:
            eval_splits = eval_run.splits_of(c.evals, "config.evals.")

        # Checkpoint: resume from the newest one that reads back whole, else initialize.
        found = run.restore(built.abstract_state)
        if found is None:
            state = jax.jit(built.init, out_shardings=shardings)(jax.random.key(c.seed))
            if c.model.init_from:
                state["params"]["encoder"], loaded = weights.init_from(
                    c.model.init_from, state["params"]["encoder"], shardings["params"]["encoder"])
                adopted = f"encoder: {adopted}: {loaded}"
        else:
            state, data_state = found
            restore_input_state(inputs, data_state, report_to=print)
            if adopted:
                adopted = f"encoder: {adopted}: resuming, its weights not loaded again"
        compiled = built.step_fn.lower(built.abstract_state, built.abstract_batch).compile()
        labelled = (f"; labels joined {joined.how}" if joined else "") + "".join(
            f"; {name}: {r.how}" for name, r in regions.items())
        report = run.begin(total_steps, step_lib.summarize(built, mesh, compiled) + labelled,
                           validation.warnings(c, total_steps, num_examples) + built.replicated)
        if adopted:
            report.message(adopted)

        def evaluate(step, state):
            encoder = nnx.merge(graphdef, state["params"]["encoder"])
            results = eval_run.evaluate(encoder, *eval_splits, image_size=c.data.image_size,
                                        mesh=mesh, which=c.evals.probes,
                                        desc=f"eval at step {step}", native=native)
            return {k: v["accuracy"] for k, v in results.items()}

        run.steps(state, compiled, inputs, evaluate=evaluate)
