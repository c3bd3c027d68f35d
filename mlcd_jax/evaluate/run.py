"""Running the evaluators: a dataset's train/test splits and linear probe + kNN on frozen features.
Used by `python -m mlcd_jax.evaluate`, by the trainer's periodic evals (config `evals`) and by the
demo. The test images are never the train images: a dataset's own test split (tfds,
digits_canvas), a test folder beside a train folder, or a seeded held-out fraction."""

from __future__ import annotations

import types

import numpy as np

from mlcd_jax.config.schema import LABELLED, PROBES, WITH_SPLITS
from mlcd_jax.data import sources
from mlcd_jax.evaluate import features, probes
from mlcd_jax.runtime.errors import UserError


def split(source, test_fraction: float, seed: int = 0):
    """A seeded held-out split of a source without predefined splits."""
    order = np.random.default_rng(seed).permutation(len(source))
    n_test = int(round(len(source) * test_fraction))
    return (sources.Subset(source, np.sort(order[n_test:])),
            sources.Subset(source, np.sort(order[:n_test])))


def dataset_splits(source: str, *, path: str = "", test_path: str = "", tfds_name: str = "",
                   train_split: str = "train", test_split: str = "", test_fraction: float = 0.3,
                   flag: str = "--", labelled: bool = True, annotations: str = "",
                   test_annotations: str = ""):
    """(train, test) sources: the source's own test split (`test_split`: tfds, digits_canvas,
    digits_regions), test files (`test_path`, for a folder or ArrayRecord files), else
    `test_fraction` of the train split held out with a fixed seed. `flag` prefixes option names
    in errors ("--" or "config.evals."). `labelled=False` also takes images without classes
    (LiT's captioned data; regions with classes). `annotations` (`test_annotations`, by default
    the same) give a folder's images their regions (`FolderSource(regions=...)`)."""
    allowed = LABELLED
    if source not in allowed:
        raise UserError(f"{flag}source: must be one of {allowed}"
                        f"{' (images with classes)' if labelled else ''}, got {source!r}")
    with_files = ("folder", "arrayrecord")  # sources whose test images are other files
    if test_split and source not in WITH_SPLITS:
        raise UserError(f"{flag}test_split: {source} has no named splits (only "
                        f"{', '.join(WITH_SPLITS)} do); "
                        + (f"give the test images as {flag}test_path" if source in with_files
                            else f"{flag}test_fraction holds out part of it"))
    if annotations and source != "folder":
        raise UserError(f"{flag}annotations: only for a folder; ArrayRecord files keep the "
                        "regions `convert --regions` put in their index")
    if test_path and source not in with_files:
        raise UserError(f"{flag}test_path: only for a folder or ArrayRecord files; {source} "
                        f"takes {flag}test_split or {flag}test_fraction")
    if source == "arrayrecord":
        train = sources.ArrayRecordSource(path, field=f"{flag}path")
        if labelled and not train.class_index:
            raise UserError(f"{flag}path {path}: its images have no classes (convert keeps a "
                            "folder's class sub-folders as classes; tar shards have none): "
                            "evaluation needs images with classes")
        if test_path:
            return train, sources.ArrayRecordSource(test_path, field=f"{flag}test_path",
                                                    classes=train.class_index or None)
        return split(train, test_fraction)
    if source == "folder":
        train = sources.FolderSource(path, field=f"{flag}path", regions=annotations or None)
        if labelled and not train.class_index:
            raise UserError(f"{flag}path {path}: no class sub-folders; evaluation needs one "
                            "sub-folder per class (PATH/CLASS/image.jpg)")
        if test_path:
            return train, sources.FolderSource(test_path, classes=train.class_index,
                                               field=f"{flag}test_path",
                                               regions=test_annotations or annotations or None)
        return split(train, test_fraction)
    spec = lambda s: types.SimpleNamespace(source=source, path=path, tfds_name=tfds_name, split=s)
    if test_split:
        return sources.make_source(spec(train_split)), sources.make_source(spec(test_split))
    return split(sources.make_source(spec(train_split)), test_fraction)


def image_classes(source) -> bool:
    """Whether a dataset's images have classes (ArrayRecord files and a folder without class
    sub-folders have none)."""
    if isinstance(source, sources.Subset):
        source = source.source
    if isinstance(source, (sources.ArrayRecordSource, sources.FolderSource)):
        return bool(source.class_index)
    return True


def splits_of(section, flag: str, labelled: bool = True):
    """`dataset_splits` of a config section with its fields (`config.evals`, LiT's
    `config.data`); `flag` names the section in errors."""
    return dataset_splits(section.source, path=section.path, test_path=section.test_path,
                          tfds_name=section.tfds_name, train_split=section.train_split,
                          test_split=section.test_split, test_fraction=section.test_fraction,
                          flag=flag, labelled=labelled)


def evaluate(model, train, test, *, image_size: int, mesh=None, which=PROBES,
             desc: str = "features", native=None) -> dict:
    """{probe: result} for the probes in `which`, on the encoder's embeddings (`native`, a
    `transforms.Native`: of the images at native resolution)."""
    unknown = set(which) - set(PROBES)
    if unknown:
        raise UserError(f"unknown probes {sorted(unknown)}; known: {PROBES}")
    train_xy = features.extract(model, train, image_size=image_size, mesh=mesh,
                                desc=f"{desc} (train)", native=native)[:2]
    test_xy = features.extract(model, test, image_size=image_size, mesh=mesh,
                               desc=f"{desc} (test)", native=native)[:2]
    return probe(train_xy, test_xy, which)


def probe(train_xy, test_xy, which=PROBES) -> dict:
    """{probe: result} of the probes in `which` on given (features, labels) pairs."""
    for what, (_, y) in (("train", train_xy), ("test", test_xy)):
        if not len(y) or (y < 0).any():
            raise UserError(f"the {what} images have no class labels ({int((y < 0).sum())} of "
                            f"{len(y)} without one); probes need a labelled dataset")
    if len(np.unique(train_xy[1])) < 2:
        raise UserError("the train images are all of one class; probes need two or more")
    return {name: getattr(probes, name)(*train_xy, *test_xy) for name in which}
