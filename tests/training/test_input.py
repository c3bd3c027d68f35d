"""The trainer's input (mlcd_jax/training/input.py): batches made ahead on a thread, the consumed
(not the made) state, the devices' idle time, an input error raised in the trainer."""

import time

import jax
import numpy as np
import pytest

from mlcd_jax.config import schema as config_lib
from mlcd_jax.runtime import mesh as mesh_lib
from mlcd_jax.training import input as input_lib


class SlowInput(input_lib._Input):
    """Batches of a counter that take `seconds` each to make; the error `fail_at` on that batch."""

    def __init__(self, seconds, fail_at=None):
        c = config_lib.base_config()
        c.batch_size, c.grad_accum = 8, 1
        mesh = mesh_lib.make_mesh([("data", 1)], jax.devices()[:1])
        super().__init__(c, mesh_lib.batch_sharding(mesh, leading=1))
        self.seconds, self.fail_at, self.made = seconds, fail_at, 0

    def _make(self):
        time.sleep(self.seconds)
        if self.made == self.fail_at:
            raise ValueError(f"batch {self.made} is broken")
        self.made += 1
        return (np.full((8, 2), self.made - 1, np.float32), np.zeros((8, 1), np.int32)), None

    def _state(self):
        return {"made": self.made}

    def _set_state(self, state):
        self.made = state["made"]


class Busy:
    """A step that is still running on the devices."""

    def is_ready(self):
        return False


def test_prefetch_keeps_the_consumed_state_and_measures_idle_devices():
    inputs = SlowInput(0.05)
    inputs.set_state({"input": {"made": 3}, "skipped": 0})
    (images, _), idle = inputs.next()  # nothing running: the devices wait for the whole batch
    assert float(images[0, 0, 0]) == 3 and 0.03 < idle < 1.0
    (images, _), idle = inputs.next(in_flight=Busy())  # a step runs meanwhile: no idle time
    assert float(images[0, 0, 0]) == 4 and idle == 0.0
    time.sleep(0.3)  # the thread makes PREFETCH batches ahead, and stops
    assert inputs.made == 5 + input_lib.PREFETCH
    assert inputs.get_state() == {"input": {"made": 5}, "skipped": 0}  # consumed, not made
    (_, _), idle = inputs.next()
    assert idle < 0.03  # it was made ahead
    with pytest.raises(RuntimeError, match="after the first batch"):
        inputs.set_state({"input": {"made": 0}, "skipped": 0})


def test_prefetch_raises_the_input_error_in_the_trainer():
    inputs = SlowInput(0.0, fail_at=2)
    inputs.next(), inputs.next()
    with pytest.raises(ValueError, match="batch 2 is broken"):
        inputs.next()
