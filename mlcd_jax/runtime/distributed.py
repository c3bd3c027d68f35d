"""Joining the processes of a multi-host job (`jax.distributed.initialize`), once, before any
other jax call.

Every host runs the same command. Where the cluster says it has several processes (a TPU pod
slice, a SLURM step with several tasks, `mpirun`), jax detects the coordinator, the process count
and this process's id by itself. Elsewhere they are given explicitly, by the arguments or by the
environment that `launch/local_multiprocess.sh` sets:

    JAX_COORDINATOR_ADDRESS=host:port  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i

With none of these it does nothing: one process owns all local devices.
"""

from __future__ import annotations

import json
import os
import socket
import time

import jax
import numpy as np

from mlcd_jax.runtime.errors import UserError

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _count(name: str) -> int:
    try:
        return int(os.environ.get(name, "1").split("(")[0])  # SLURM may write "2(x3)"
    except ValueError:
        return 1


def detected_cluster() -> str | None:
    """The multi-process cluster this process runs in, from its environment (None: not one)."""
    # Several host names (libtpu may itself write a warning sentence there on a non-TPU machine).
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h and " " not in h]
    if len(hosts) > 1:
        return "tpu"
    if "SLURM_JOB_ID" in os.environ and _count("SLURM_STEP_NUM_TASKS") * _count("SLURM_NTASKS") > 1:
        return "slurm"
    if _count("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> None:
    """Join the job's processes; a no-op for a single process or when already joined."""
    if jax.distributed.is_initialized():
        return
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    explicit = coordinator_address is not None or num_processes is not None
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise UserError(
            "multi-process start needs all three of the coordinator address, the process count and "
            f"this process's id (got {coordinator_address!r}, {num_processes!r}, {process_id!r}); "
            f"set --coordinator_address/--num_processes/--process_id or {', '.join(ENV)}")
    if not explicit and detected_cluster() is None:
        return  # one process
    if num_processes == 1:
        return
    if coordinator_address and process_id:
        # jax aborts the process (no exception) when it cannot reach the coordinator: look first.
        _wait_for(coordinator_address, process_id, timeout_s)
    # CPU devices of several processes talk through gloo (TCP); no effect on GPUs and TPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s)
    except Exception as e:  # jax raises several types (XlaRuntimeError, RuntimeError)
        where = coordinator_address or f"the coordinator {detected_cluster()} names"
        detail = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        raise _unreachable(where, process_id, timeout_s, detail) from e


def _unreachable(address: str, process_id, timeout_s, detail: str) -> UserError:
    return UserError(
        f"process {process_id} could not join the job at {address} within {timeout_s} s "
        f"({detail}). Check that every process was started with the same coordinator address "
        "and process count, that the coordinator (process 0) is running and its port is reachable")


def _wait_for(address: str, process_id: int, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise _unreachable(address, process_id, timeout_s, str(e)) from None
            time.sleep(0.5)


def gather_json(obj) -> list:
    """Every process's JSON-serialisable `obj`, in process order, on every process."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    longest = int(multihost_utils.process_allgather(np.int32(len(data))).max())
    padded = np.zeros(longest, np.uint8)
    padded[:len(data)] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row).rstrip(b"\0")) for row in gathered]


def barrier(name: str) -> None:
    """Wait until every process of the job reaches `name` (nothing to wait for in one process)."""
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
