"""Checkpoints that do not read back whole are set aside (STEP.corrupt) and the next older one
restores; checksums catch silent bit rot; logging never blocks or stops training."""

import gc
import json
import pathlib
import shutil
import warnings

import jax
import numpy as np
import pytest

from mlcd_jax.runtime import checkpoint, mesh as mesh_lib
from mlcd_jax.training import optim, reporting


def make_state(mesh, scale):
    rng = np.random.default_rng(0)
    return {"centers": jax.device_put(rng.normal(size=(64, 32)).astype(np.float32) * scale,
                                      mesh_lib.class_sharding(mesh)),
            "encoder": {"kernel": jax.device_put(rng.normal(size=(16, 16)).astype(np.float32)
                                                 * scale, mesh_lib.replicated(mesh))},
            "step": jax.device_put(np.int32(scale), mesh_lib.replicated(mesh))}


def data_files(step_dir: pathlib.Path):
    return sorted((p for p in (step_dir / "state").rglob("*")
                   if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size)


def flip_array_byte(step_dir):
    big = data_files(step_dir)[-1]  # the largest file holds the arrays' bytes
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 0x04
    big.write_bytes(bytes(data))


DAMAGE = {
    "a data file deleted": lambda d: data_files(d)[-1].unlink(),
    "all data files deleted": lambda d: [f.unlink() for f in data_files(d)],
    "array metadata missing": lambda d: (d / "state" / "_METADATA").unlink(),
    "the data item missing": lambda d: shutil.rmtree(d / "data"),
    "the data item unreadable": lambda d: (d / "data" / "metadata").write_text("{not json"),
    "an empty step directory": lambda d: [shutil.rmtree(d), d.mkdir()],
    "a flipped bit in an array": flip_array_byte,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_restores(devices, tmp_path,
                                                                               damage):
    mesh = mesh_lib.make_mesh([("data", -1)], devices)
    ckpt = checkpoint.Checkpointer(tmp_path, keep=5)
    for step in (1, 2, 3):
        ckpt.save(step, make_state(mesh, step), {"step": step, "seed": 0})
    ckpt.close()
    DAMAGE[damage](tmp_path / "3")
    said = []
    ckpt = checkpoint.Checkpointer(tmp_path, keep=5)
    target = checkpoint.abstract_like(make_state(mesh, 1),
                                      jax.tree.map(lambda x: x.sharding, make_state(mesh, 1)))
    state, data, step = ckpt.restore_newest_good(target, report=said.append)
    ckpt.close()
    assert step == 2 and data == {"step": 2, "seed": 0}
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(make_state(mesh, 2))):
        np.testing.assert_array_equal(got, want)
    assert len(said) == 1 and said[0].startswith("checkpoint 3 set aside as 3.corrupt: ")
    assert (tmp_path / "3.corrupt").is_dir() and not (tmp_path / "3").exists()
    assert checkpoint.Checkpointer(tmp_path).steps() == [1, 2]


def test_checksums_are_the_same_on_any_mesh_and_see_one_flipped_bit(devices):
    x = np.random.default_rng(1).normal(size=(48, 8)).astype(np.float32)
    sums = {n: checkpoint.checksums({"x": jax.device_put(x, mesh_lib.class_sharding(
        mesh_lib.make_mesh([("data", -1)], devices[:n])))}) for n in (1, 2, 4, 8)}
    assert len({json.dumps(s) for s in sums.values()}) == 1
    flipped = x.copy()
    flipped.view(np.uint32)[17, 3] ^= 1  # the lowest mantissa bit of one value
    assert checkpoint.checksums({"x": flipped}) != sums[1]
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert checkpoint.checksums({"x": swapped}) != sums[1]


def test_a_checkpoint_of_another_config_is_an_error_not_corruption(devices, tmp_path):
    mesh = mesh_lib.make_mesh([("data", -1)], devices)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, make_state(mesh, 1), {"step": 1, "seed": 0})
    ckpt.wait()
    other = {"encoder": {"kernel": jax.ShapeDtypeStruct((16, 8), np.float32,
                                                        sharding=mesh_lib.replicated(mesh))},
             "centers": jax.ShapeDtypeStruct((64, 32), np.float32,
                                             sharding=mesh_lib.class_sharding(mesh)),
             "step": jax.ShapeDtypeStruct((), np.int32, sharding=mesh_lib.replicated(mesh))}
    with pytest.raises(checkpoint.ConfigMismatch, match=r"\['encoder'\]\['kernel'\] has shape"):
        ckpt.restore_newest_good(other)
    ckpt.close()
    assert (tmp_path / "1").is_dir()  # kept where it was


def test_named_tuple_state_restores_field_by_field_and_resizes(devices, tmp_path):
    """Sparse AdamW's state is a named tuple whose fields' shapes differ; the stored metadata
    lists them in another order (sorted), so they must be matched by name, not position."""
    mesh = mesh_lib.make_mesh([("data", -1)], devices)
    rng = np.random.default_rng(2)
    rows = lambda k, d: jax.device_put(rng.normal(size=(k, d)).astype(np.float32),
                                       mesh_lib.class_sharding(mesh))
    state = {"opt": optim.SparseRowsState(rows(64, 32), rows(64, 32),
                                          jax.device_put(np.arange(64, dtype=np.int32)[:, None],
                                                         mesh_lib.class_sharding(mesh)),
                                          jax.device_put(np.int32(7), mesh_lib.replicated(mesh)))}
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, state, {"step": 1, "seed": 0})
    ckpt.wait()
    shardings = jax.tree.map(lambda x: x.sharding, state)
    restored, _ = ckpt.restore(checkpoint.abstract_like(state, shardings))
    assert isinstance(restored["opt"], optim.SparseRowsState)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(got, want)
    # another device count pads the centers' rows differently: every field resizes by rows
    grown = jax.tree.map(lambda x: jax.ShapeDtypeStruct((72, *x.shape[1:]), x.dtype,
                                                        sharding=x.sharding) if x.ndim else
                         jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, _ = ckpt.restore(grown, resizable="opt")
    ckpt.close()
    np.testing.assert_array_equal(np.asarray(restored["opt"].centers_count)[:64],
                                  np.arange(64)[:, None])
    np.testing.assert_array_equal(np.asarray(restored["opt"].centers_mu)[:64], state["opt"][0])
    assert int(restored["opt"].step) == 7


def test_logging_survives_a_torn_line_and_a_full_disk(tmp_path, monkeypatch, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n'
                                            '{"step": 3, "lo')
    report = reporting.Reporter(tmp_path, total_steps=10, batch_size=4, start_step=2)
    assert reporting.read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0},
                                                                 {"step": 2, "loss": 1.0}]
    report.log(3, {"loss": 0.5})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and scalars(events[0]) == {(3, "loss"): 0.5}

    from tensorboardX.event_file_writer import EventsWriter

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(EventsWriter, "write_event", full)
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()  # appending to it now fails with an OSError
    for step in (4, 5, 6):
        report.log(step, {"loss": 0.4})  # returns: never blocks on a full disk
    err = capsys.readouterr().err
    assert err.count("cannot write") == 2  # once for metrics.jsonl, once for TensorBoard
    assert ("No space left on device" in err and "Is a directory" in err
            and "training goes on" in err)
    report.close()


def scalars(path):
    """(step, tag) → value of a TensorBoard event file, read as TFRecords."""
    import struct

    from tensorboardX.proto import event_pb2
    data, out, i = path.read_bytes(), {}, 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
        for value in event.summary.value:
            out[(event.step, value.tag)] = value.simple_value
        i += 12 + length + 4
    return out


def test_writes_a_failed_save_left_unawaited_are_not_reported(tmp_path):
    """A save that failed on a full disk printed its one-line error and then Python's "coroutine
    'async_serialize_from_host.<locals>.write_fragment' was never awaited" warning (CI saw it):
    orbax drops the writes queued beside the failed one. A Checkpointer keeps that off stderr."""
    async def write_fragment():  # what orbax leaves behind
        pass

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ckpt = checkpoint.Checkpointer(tmp_path)
        write_fragment()  # made, never awaited, collected
        gc.collect()
        ckpt.close()
    assert [str(w.message) for w in seen] == []


def test_eta_averages_training_since_warm_up_and_leaves_evals_out(tmp_path, monkeypatch, capsys):
    clock = iter([0.0, 10.0, 50.0, 60.0])  # start, log 11, (eval from 10 to 50) resume, log 21
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: next(clock))
    report = reporting.Reporter(tmp_path, total_steps=101, batch_size=4)
    report.start_clock(1)
    report.log(11, {"loss": 1.0})         # 10 steps in 10 s
    report.pause_clock(11)
    report.log_eval(11, {"knn": 0.5}, seconds=40.0)  # the clock was not read: nothing to lap
    report.start_clock(11)
    report.log(21, {"loss": 1.0})         # 10 steps in 10 s; the 40 s of eval do not count
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step 21/")]
    assert "ETA 1.3 min (+ evals, 40 s so far)" in lines[0]  # 80 steps at 1 step/s
    assert [r["images_per_s"]
            for r in reporting.read_jsonl(tmp_path / "metrics.jsonl")] == [4.0, 4.0]
    report.close()


def test_small_replicated_arrays_are_saved_whole_and_large_ones_split_over_replicas(devices,
                                                                                    tmp_path):
    """Orbax's replica-parallel save slices a replicated array into one piece per replica, each
    piece its own compiled program: for small arrays that was most of a tiny run's save time
    (72 programs). Small arrays are now written whole; one over the threshold per replica is
    still split, so large hosts' writes stay parallel. Shapes no other test uses: nothing cached."""
    mesh = mesh_lib.make_mesh([("data", -1)], devices)
    compiled = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for name, shape, slices in (("small", (24, 41), 0),
                                    ("large", (8 * 1024 + 8, checkpoint.MIN_REPLICA_SLICE_BYTES
                                               // (4 * 1024)), len(devices))):
            state = {name: jax.device_put(np.ones(shape, np.float32), mesh_lib.replicated(mesh))}
            compiled.clear()
            ckpt = checkpoint.Checkpointer(tmp_path / name)
            ckpt.save(1, state, {})
            ckpt.close()
            assert compiled.count("jit(slice)") == slices, (name, compiled)
            restored, _ = checkpoint.Checkpointer(tmp_path / name).restore(
                checkpoint.abstract_like(state, jax.tree.map(lambda x: x.sharding, state)))
            np.testing.assert_array_equal(restored[name], state[name])
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
