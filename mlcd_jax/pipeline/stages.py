"""The stages of `python -m mlcd_jax.pretrain`, each the manual path's command with its output
where the manual path puts it (RUN/data, RUN/embeddings, RUN/labels, RUN/train, RUN/hf_model):

    convert → embed → labels → [region labels] → [calibrate] → train → evaluate → export

Each stage runs as its own command (`python -m mlcd_jax.…`, printed before it runs, so the manual
path is on screen) and is recorded in RUN/pretrain.json once it has finished; a rerun skips the
finished stages and resumes the others (the trainer from its newest checkpoint, embed and assign
from their finished shards). RUN/pretrain.json also keeps what was asked: a rerun that asks for
something else is refused, naming the flag.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

from mlcd_jax.config import presets
from mlcd_jax.data import index as index_lib
from mlcd_jax.pipeline import sizing
from mlcd_jax.runtime import backend, cli, files
from mlcd_jax.runtime.errors import UserError

CALIBRATION_STEPS = 12  # the short run that measures images/s (its first log laps the compile)


@dataclasses.dataclass(frozen=True)
class Request:
    """What the user asked for (the command's flags)."""
    images: str
    teacher: str
    workdir: str
    test_images: str = ""
    regions: str = ""
    resolution: str = "square"
    minutes: float = 10.0
    config: str = ""                  # "" = the machine's preset (sizing.default_config)
    overrides: tuple[str, ...] = ()   # --config.a.b=v, as given
    num_centers: int = 0              # 0 = sizing.num_centers(N)
    num_labels: int = 0               # 0 = sizing.num_labels(K)


class StageFailed(Exception):
    """A stage's command exited non-zero (its own message is on the console above)."""

    def __init__(self, stage: str, code: int):
        super().__init__(stage, code)
        self.stage, self.code = stage, code


class Pipeline:
    def __init__(self, request: Request):
        self.request = request
        self.run_dir = pathlib.Path(request.workdir).absolute()
        self.state_path = self.run_dir / "pretrain.json"
        self.state = {"request": self._asked(), "stages": {}}
        self.rows: list[tuple[str, str, str]] = []  # (stage, time, what it made)
        self.explicit = {o.split("=", 1)[0].removeprefix("--config.")
                         for o in request.overrides}
        self.platform = ("tpu" if backend.tpu_present() else
                         "gpu" if backend.gpu_present() else "cpu")

    # -- paths: the manual path's --------------------------------------------------------------
    def data(self, split: str) -> str:
        return str(self.run_dir / "data" / split)

    def shards(self, split: str) -> str:
        return f"{self.data(split)}-*.array_record"

    @property
    def train_dir(self) -> pathlib.Path:
        return self.run_dir / "train"

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> None:
        r = self.request
        self._check_inputs()
        self._resume()
        self.config_name = r.config or sizing.default_config(self.platform, bool(r.regions))
        presets.load(self.config_name, r.overrides)  # a config mistake stops here, before work
        start = time.time()
        total = 6 + bool(r.regions) + (not self._budget_given())
        self.stage_number, self.stage_total = 0, total
        self.stage("convert", self.convert)
        if not r.config and self.state["stages"]["convert"]["texts"]:  # OCR regions: RICE's head
            self.config_name = sizing.default_config(self.platform, True, texts=True)
        self.stage("embed", self.embed)
        self.stage("labels", self.labels)
        if r.regions:
            self.stage("region labels", self.region_labels)
        if not self._budget_given():
            self.stage("calibrate", self.calibrate)
        self.stage("train", self.train)
        self.stage("evaluate", self.evaluate)
        self.stage("export", self.export)
        self.summary(time.time() - start)

    def stage(self, name: str, body) -> None:
        self.stage_number += 1
        done = self.state["stages"].get(name)
        head = f"[{self.stage_number}/{self.stage_total}] {name}"
        if done is not None:
            print(f"{head}: finished before ({done['made']})", flush=True)
            self.rows.append((name, "before", done["made"]))
            return
        print(head, flush=True)
        start = time.time()
        made, extra = body()
        seconds = time.time() - start
        self.state["stages"][name] = {"seconds": round(seconds, 1), "made": made, **extra}
        self._save()
        self.rows.append((name, f"{seconds:.0f} s", made))

    def command(self, stage: str, module: str, *args: str) -> None:
        """`python -m module args` as the manual path has it (printed first); a failure ends the
        pipeline with the command's own exit status."""
        argv = [sys.executable, "-m", module, *args]
        print("  $ " + shlex.join(["python", *argv[1:]]), flush=True)
        code = subprocess.run(argv, env=cli.command_env()).returncode
        if code:
            raise StageFailed(stage, code)

    # -- the stages ------------------------------------------------------------------------------
    def convert(self):
        r = self.request
        for split, images in (("train", r.images), ("test", r.test_images)):
            if not images:
                continue
            finished = index_lib.paths(self.data(split))[2].is_file()
            if not finished:  # a convert cut short: its partial shards are replaced
                self.command("convert", "mlcd_jax.data.convert", "--input", images,
                             "--output", self.data(split), "--overwrite",
                             *(["--regions", r.regions] if r.regions else []))
        train = index_lib.Index(self.data("train"))
        self.images = train.records
        if self.images < sizing.MIN_IMAGES:
            raise UserError(f"--images {r.images}: {self.images} images could be read; "
                            f"pretraining needs at least {sizing.MIN_IMAGES}")
        classes = len(train.classes or ())
        regions = (train.regions or {}).get("regions", 0)
        made = (f"{self.shards('train')}: {self.images:,} images"
                + (f", {classes} classes" if classes else ", no classes")
                + (f", {regions:,} regions" if r.regions else ""))
        return made, {"images": self.images, "classes": classes, "regions": regions,
                      "texts": (train.regions or {}).get("with_text", 0)}

    def embed(self):
        out = self.run_dir / "embeddings"
        self.command("embed", "mlcd_jax.labels", "embed", "--model", self.request.teacher,
                     "--source", "arrayrecord", "--path", self.shards("train"), "--out", str(out))
        manifest = json.loads((out / "manifest.json").read_text())
        count = sum(s["count"] for s in manifest["shards"])
        return f"{out}: {count:,} × {manifest['dim']}", {"embeddings": count}

    def labels(self):
        n = self.state["stages"]["embed"]["embeddings"]
        k = self._explicit_int("head.num_classes") or self.request.num_centers or \
            sizing.num_centers(n)
        l = self._explicit_int("data.num_labels") or self.request.num_labels or \
            sizing.num_labels(k)
        out = self.run_dir / "labels"
        self.command("labels", "mlcd_jax.labels", "all", "--embeddings",
                     str(self.run_dir / "embeddings"), "--out", str(out), "--num_centers", str(k),
                     "--num_labels", str(l), "--two_level", str(sizing.two_level(k)))
        return f"{out}: K = {k:,}, l = {l}", {"num_centers": k, "num_labels": l}

    def region_labels(self):
        """Object regions: each box's crop embedded by the teacher, clustered, one label each;
        OCR regions (where the boxes have texts): their texts' token ids."""
        embeddings, out = self.run_dir / "region_embeddings", self.run_dir / "region_labels"
        self.command("region labels", "mlcd_jax.labels", "embed", "--regions", "--model",
                     self.request.teacher, "--source", "arrayrecord", "--path",
                     self.shards("train"), "--out", str(embeddings))
        manifest = json.loads((embeddings / "manifest.json").read_text())
        n = sum(s["count"] for s in manifest["shards"])
        k = self._explicit_int("heads.objects.num_classes") or sizing.num_centers(n)
        self.command("region labels", "mlcd_jax.labels", "all", "--embeddings", str(embeddings),
                     "--out", str(out), "--num_centers", str(k), "--num_labels", "1")
        made, extra = f"{out}: {n:,} object regions, K = {k:,}", {"region_centers": k}
        if self.state["stages"]["convert"]["texts"]:
            ocr = self.run_dir / "ocr_labels"
            self.command("region labels", "mlcd_jax.labels", "ocr", "--source", "arrayrecord",
                         "--path", self.shards("train"), "--out", str(ocr))
            vocab = json.loads((ocr / "manifest.json").read_text())["num_classes"]
            made += f"; {ocr}: the OCR regions' token ids ({vocab:,})"
            extra["ocr_classes"] = vocab
        return made, extra

    def calibrate(self):
        """A short run of the training step on this data: its images/s set the steps."""
        run = self.run_dir / "calibrate"
        shutil.rmtree(run, ignore_errors=True)
        self.command("calibrate", "mlcd_jax.train", *self.train_args(run, calibrate=True))
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rates = [row["images_per_s"] for row in rows if "images_per_s" in row]
        if not rates:
            raise UserError(f"{run}/metrics.jsonl: the calibration run logged no speed")
        shutil.rmtree(run)
        rate = rates[-1]  # the last lap: the compile and first steps are behind it
        return f"{rate:.0f} images/s", {"images_per_s": rate}

    def train(self):
        self.command("train", "mlcd_jax.train", *self.train_args(self.train_dir))
        steps, epochs, _ = self.schedule()
        return (f"{self.train_dir}: {self.config_name}, {steps:,} steps ({epochs:.1f} epochs)",
                {"steps": steps})

    def evaluate(self):
        converted = self.state["stages"]["convert"]
        if not converted["classes"] and not self.request.regions:
            return "skipped: the images have no classes (class sub-folders) to probe", {}
        args = ["--model", str(self.train_dir), "--source", "arrayrecord",
                "--path", self.shards("train")]
        if self.request.test_images:
            args += ["--test_path", self.shards("test")]
        if self.request.regions:
            args += ["--regions"]
        self.command("evaluate", "mlcd_jax.evaluate", *args)
        result = json.loads((self.train_dir / "eval.json").read_text())
        return f"{self.train_dir / 'eval.json'}: {describe(result)}", {}

    def export(self):
        out = self.run_dir / "hf_model"
        self.command("export", "mlcd_jax.interop.hf", "export", str(self.train_dir), str(out))
        clip = "clip" in json.loads((out / "config.json").read_text()).get("model_type", "")
        beside = (out / "mlcd_jax_projection.safetensors").is_file()
        kind = ("CLIPVisionModelWithProjection" if clip else "MLCDVisionModel" + (
            " + the projection beside it (README: Using the export)" if beside else ""))
        return f"{out}: transformers {kind}", {}

    # -- sizing -----------------------------------------------------------------------------------
    def schedule(self, calibrating: bool = False) -> tuple[int, float, int]:
        """(steps, epochs, batch) of the training run (steps 0 while calibrating)."""
        config = presets.load(self.config_name, self.request.overrides)
        n = self.state["stages"]["convert"]["images"]
        batch = (config.batch_size if "batch_size" in self.explicit
                 else sizing.batch_size(config.batch_size, n))
        if calibrating:
            return 0, 0.0, batch
        if "total_steps" in self.explicit:
            steps = int(config.total_steps)
        elif "epochs" in self.explicit:
            steps = math.ceil(config.epochs * n / batch)
        else:
            rate = self.state["stages"]["calibrate"]["images_per_s"]
            steps, _ = sizing.steps(rate, self.request.minutes, n, batch)
        return steps, steps * batch / n, batch

    def train_args(self, workdir: pathlib.Path, calibrate: bool = False) -> list[str]:
        """The trainer's flags: the config, what the earlier stages made and the sizes chosen
        (a field the user set is theirs), then the user's own overrides."""
        config = presets.load(self.config_name, self.request.overrides)
        done = self.state["stages"]
        chosen = {"data.source": "arrayrecord", "data.path": self.shards("train"),
                  "data.labels": str(self.run_dir / "labels"),
                  "head.num_classes": done["labels"]["num_centers"],
                  "data.num_labels": done["labels"]["num_labels"]}
        if config.data.num_examples:  # a recipe's dataset size: this data has its own
            chosen["data.num_examples"] = 0
        if self.request.resolution == "native":
            chosen["data.resolution"] = "native"
            patch = _patch(config)
            chosen["data.max_tokens"] = (config.data.image_size // patch) ** 2
            if config.model.pos != "rope":
                chosen["model.pos"] = "rope"  # learned positions have one size
        if self.request.regions:
            chosen["heads.objects.labels"] = str(self.run_dir / "region_labels")
            chosen["heads.objects.num_classes"] = done["region labels"]["region_centers"]
            if "ocr_classes" in done["region labels"] and "ocr" in config.get("heads", {}):
                chosen["heads.ocr.labels"] = str(self.run_dir / "ocr_labels")
                chosen["heads.ocr.num_classes"] = done["region labels"]["ocr_classes"]
        _, _, batch = self.schedule(calibrating=calibrate)
        chosen["batch_size"] = batch
        if batch != config.batch_size:
            chosen["optim.lr"] = sizing.learning_rate(config.optim.lr, config.batch_size, batch)
        if calibrate:
            chosen |= {"total_steps": CALIBRATION_STEPS, "epochs": 0,
                       "log_every": CALIBRATION_STEPS // 3, "checkpoint_every": CALIBRATION_STEPS,
                       "evals.every": 0, "optim.warmup_steps": 1}
            own = [o for o in self.request.overrides
                   if o.split("=", 1)[0].removeprefix("--config.") not in chosen]
        else:
            steps, _, _ = self.schedule()
            chosen["optim.warmup_steps"] = sizing.warmup(config.optim.warmup_steps, steps)
            if not self._budget_given():
                chosen |= {"total_steps": steps, "epochs": 0}
            else:  # the user's total_steps or epochs, as given; the config's other one off
                chosen["epochs" if "total_steps" in self.explicit else "total_steps"] = 0
            chosen = {k: v for k, v in chosen.items() if k not in self.explicit}
            own = list(self.request.overrides)
        return [f"--config={self.config_name}", f"--workdir={workdir}",
                *(f"--config.{k}={v}" for k, v in chosen.items()), *own]

    # -- the record of the run --------------------------------------------------------------------
    def _asked(self) -> dict:
        r = dataclasses.asdict(self.request)
        for name in ("images", "teacher", "test_images", "regions"):
            if r[name] and "://" not in r[name]:
                r[name] = str(pathlib.Path(r[name]).absolute())
        r["overrides"] = list(r["overrides"])
        del r["workdir"]
        return r

    def _check_inputs(self) -> None:
        r = self.request
        for flag, value in (("images", r.images), ("teacher", r.teacher),
                            ("test_images", r.test_images), ("regions", r.regions)):
            if value and not (pathlib.Path(value).exists() or glob.has_magic(value)
                              or "{" in value):
                raise UserError(f"--{flag} {value}: no such file or folder")

    def _resume(self) -> None:
        if not self.state_path.is_file():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._save()
            return
        try:
            saved = json.loads(self.state_path.read_text())
            before = saved["request"]
        except (ValueError, KeyError):
            raise UserError(f"{self.state_path}: unreadable; it records this run's stages: "
                            "choose a new --workdir, or delete the file to start this one "
                            "again") from None
        for name, value in self.state["request"].items():
            if before.get(name) != value:
                flag = {"overrides": "config.*", "config": "config"}.get(name, name)
                raise UserError(f"--workdir {self.run_dir} was made with --{flag}="
                                f"{before.get(name)!r}, not {value!r}: rerun with the same flags "
                                "to resume it, or choose a new --workdir")
        self.state = saved

    def _save(self) -> None:
        files.write_json_atomic(self.state_path, self.state)

    def _budget_given(self) -> bool:
        return bool({"total_steps", "epochs"} & self.explicit)

    def _explicit_int(self, field: str) -> int:
        for o in self.request.overrides:
            name, _, value = o.partition("=")
            if name == f"--config.{field}":
                return int(value)
        return 0

    def summary(self, seconds: float) -> None:
        width = max(len(s) for s, _, _ in self.rows)
        print(f"\n{'stage':<{width}}  {'time':>7}  result")
        for stage, took, made in self.rows:
            print(f"{stage:<{width}}  {took:>7}  {made}")
        print(f"\n{seconds:.0f} s; the exported encoder: {self.run_dir / 'hf_model'}; every "
              f"stage's record: {self.state_path}")


def describe(result: dict) -> str:
    """evaluate's results in a line: the encoder's probes beside raw pixels."""
    parts = []
    for name, r in (("encoder", result), ("raw pixels", result.get("raw_pixels")),
                    ("regions", result.get("regions", {}).get("region_layer")
                     or result.get("regions", {}).get("pooled_patches"))):
        if r and "linear_probe" in r:
            parts.append(f"{name} linear probe {r['linear_probe']['accuracy']:.3f}, kNN "
                         f"{r['knn']['accuracy']:.3f}")
    return "; ".join(parts) or "no probe"


def _patch(config) -> int:
    from mlcd_jax.models import vit
    return vit.from_config(config).patch
