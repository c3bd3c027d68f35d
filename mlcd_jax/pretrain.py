"""From a folder of images to a pretrained, evaluated, exported encoder (`mlcd-pretrain`):

    python -m mlcd_jax.pretrain --images IMAGES --teacher TEACHER --workdir RUN

IMAGES: a folder (any depth; class sub-folders are kept as classes and used by the evaluation)
or img2dataset tars ('shards/{00000..00099}.tar'). TEACHER: a transformers CLIP / MLCD
checkpoint dir (or our model dir, or a training workdir). The manual path's commands run in turn,
each printed first, each output where the manual path puts it:

    RUN/data/train-*.array_record   convert (--test_images: RUN/data/test-*)
    RUN/embeddings                  the teacher's embeddings (at the teacher's own image size)
    RUN/labels                      k-means (K from the images: N / 20, 16 … 1M) and the
                                    top-l labels (l from K: 2 … 8)
    RUN/train                       MLCD pretraining (a CPU: the cpu_small preset; a GPU or TPU:
                                    mlcd_laion400m:B/16), steps from --minutes at the speed a
                                    short run measured (1 … 30 epochs)
    RUN/train/eval.json             linear probe and kNN on held-out images, raw pixels beside
    RUN/hf_model                    the transformers export

A rerun of the same command resumes: finished stages are skipped, the others resume. --config
and --config.a.b=v choose and change the training config as for `python -m mlcd_jax.train`; a field
set there is never resized (e.g. --config.epochs=5, --config.head.num_classes=1000).
--regions FILE adds RICE's object-region head (regions labelled by the teacher's clusters of their
crops; OCR regions by their texts where the boxes have texts); --resolution native trains at each
image's own aspect ratio.
"""

import sys

from absl import flags

from mlcd_jax.runtime import cli

FLAGS = flags.FlagValues()
IMAGES = flags.DEFINE_string("images", None, "The images: a folder (class sub-folders optional) "
                             "or img2dataset tars (glob or {a..b}).", flag_values=FLAGS)
TEACHER = flags.DEFINE_string("teacher", None, "The teacher whose embeddings are clustered: a "
                              "transformers CLIP / MLCD checkpoint dir, our model dir or a "
                              "training workdir.", flag_values=FLAGS)
WORKDIR = flags.DEFINE_string("workdir", None, "Every stage's output; rerun to resume.",
                              flag_values=FLAGS)
TEST_IMAGES = flags.DEFINE_string("test_images", "", "Held-out images with the same class "
                                  "sub-folders, for the evaluation (default: 30% of --images "
                                  "held out from the probes).", flag_values=FLAGS)
REGIONS = flags.DEFINE_string("regions", "", "The images' boxes (COCO-style .json, SA-1B "
                              "per-image JSON folder, .jsonl keyed by path): adds the region "
                              "heads.", flag_values=FLAGS)
RESOLUTION = flags.DEFINE_enum("resolution", "square", ["square", "native"], "square crops, or "
                               "each image at its own aspect ratio.", flag_values=FLAGS)
MINUTES = flags.DEFINE_float("minutes", 10.0, "The training's time budget (the steps that fit, "
                             "1 to 30 epochs).", lower_bound=0.1, flag_values=FLAGS)
CONFIG = flags.DEFINE_string("config", "", "The training config: a preset's name or a config "
                             "file (default: cpu_small on a CPU, mlcd_laion400m:B/16 on a GPU "
                             "or TPU; rice:…,objects with --regions).", flag_values=FLAGS)
NUM_CENTERS = flags.DEFINE_integer("num_centers", 0, "K (default: from the images).",
                                   lower_bound=0, flag_values=FLAGS)
NUM_LABELS = flags.DEFINE_integer("num_labels", 0, "l, labels per image (default: from K).",
                                  lower_bound=0, flag_values=FLAGS)


def command(args, overrides=()) -> int:
    from mlcd_jax.pipeline import stages
    if args[1:]:
        raise cli.UserError(f"unexpected arguments {args[1:]}: every input is a flag "
                            "(--images, --teacher, --workdir)")
    request = stages.Request(
        images=IMAGES.value, teacher=TEACHER.value, workdir=WORKDIR.value,
        test_images=TEST_IMAGES.value, regions=REGIONS.value, resolution=RESOLUTION.value,
        minutes=MINUTES.value, config=CONFIG.value, overrides=tuple(overrides),
        num_centers=NUM_CENTERS.value, num_labels=NUM_LABELS.value)
    try:
        stages.Pipeline(request).run()
    except stages.StageFailed as e:
        print(f"error: pretrain stopped at its {e.stage} stage (the line above says why); "
              f"fix that and rerun the same command: finished stages are kept", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:  # the stage's command got the interrupt too, and kept its work
        print("pretrain: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --config.a.b=v go to the trainer as given (the config is chosen once the data is known)
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    return cli.run(lambda args: command(args, overrides), FLAGS, rest,
                   required=("images", "teacher", "workdir"), doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
