"""What the user sees of a run: a progress line (step/total, metrics, images/s, ETA), metrics.jsonl
and TensorBoard events in the workdir. Only process 0 writes."""

from __future__ import annotations

import json
import pathlib
import time

import jax


class Reporter:
    def __init__(self, workdir, *, total_steps: int, batch_size: int, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.total, self.batch = total_steps, batch_size
        self.workdir = pathlib.Path(workdir)
        self.jsonl = self.workdir / "metrics.jsonl"
        self.evals_jsonl = self.workdir / "evals.jsonl"
        self._mark = None  # (time, step) of the last report, set after the first step's compile
        self.tb = None
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._truncate_after(start_step)
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their old lines."""
        for path in (self.jsonl, self.evals_jsonl):
            if path.exists():
                keep = [l for l in path.read_text().splitlines() if json.loads(l)["step"] <= step]
                path.write_text("".join(l + "\n" for l in keep))

    def start_clock(self, step: int) -> None:
        self._mark = (time.perf_counter(), step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        rate = None
        if self._mark and step > self._mark[1]:
            rate = (step - self._mark[1]) / (now - self._mark[0])
            self._mark = (now, step)
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if rate:
            record["images_per_s"] = rate * self.batch
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step":
                self.tb.add_scalar(k, v, step)
        eta = f"{(self.total - step) / rate / 60:.1f} min" if rate else "?"
        shown = " ".join(f"{k} {record[k]:.4g}" for k in ("loss", "pos_cos", "neg_cos", "lr")
                         if k in record)
        speed = f" {record['images_per_s']:.1f} img/s" if rate else ""
        print(f"step {step}/{self.total} ({100 * step / self.total:.0f}%) {shown}{speed} "
              f"ETA {eta}", flush=True)

    def log_eval(self, step: int, accuracies: dict[str, float]) -> None:
        """Eval accuracies at `step`: evals.jsonl, TensorBoard (eval/NAME) and one line."""
        if not self.enabled:
            return
        with self.evals_jsonl.open("a") as f:
            f.write(json.dumps({"step": step, **accuracies}) + "\n")
        for k, v in accuracies.items():
            self.tb.add_scalar(f"eval/{k}", v, step)
        print(f"eval at step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in accuracies.items()),
              flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
