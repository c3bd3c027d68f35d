"""Region and dense probes (`python -m mlcd_jax.evaluate --regions`): what an encoder knows of the
regions of an image, beside the image-level probes (RICE, Xie et al., ICCV 2025, arXiv
2507.20025, evaluates its encoder on grounding and OCR through an LLM; these are the direct,
frozen-feature counterparts on a dataset with region classes).

* Region probe: linear probe and kNN (`probes.py`) on one embedding per region, the train split's
  regions against the test split's, each region's class its label. Embeddings (a) pooled from
  patch tokens: the mean of the last hidden state's patch tokens whose patch overlaps the box
  with positive area (`models/region.patch_mask`, the rule of the Region Transformer layer), for
  any encoder; (b) the Region Transformer layer's output, where the encoder has one
  (`models.region.WithRegions`: `model(pixels, boxes=boxes).region_embedding`).
* Dense probe: each patch labelled by the class of the smallest classed box that holds its
  centre; patches in no classed box are left out (counted), so it measures which object a patch
  belongs to, not object vs background. A linear probe on the patch tokens, fit on the train
  split's patches, scored on the test split's.

Images go through the eval transform (resize the shorter side, center crop) and their boxes with
them (`transforms.eval_transform`); a box that keeps less than half its area in the crop is left
out (counted). Only regions with a class (`Regions.classes` >= 0) are probed. At most
`max_regions` train regions and `max_patches` patches per split are kept, a seeded uniform sample
(reservoir sampling over the stream), so memory does not grow with the data.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from mlcd_jax.data import transforms
from mlcd_jax.evaluate import probes, run
from mlcd_jax.models import region as region_lib
from mlcd_jax.runtime import mesh as mesh_lib
from mlcd_jax.runtime.errors import UserError

HOW = ("regions without a class and patches in no classed box are left out; boxes follow the "
       "eval transform (a box with under half its area in the crop is left out)")


def class_names(train, test, flag: str = "--regions") -> list[str]:
    """The names of the region classes both splits share; one line naming what is missing (no
    regions, no classes, other classes in the test split)."""
    names = []
    for what, source in (("train", train), ("test", test)):
        why = getattr(source, "no_regions", "this dataset has no boxes")
        if why is not None:
            raise UserError(f"{flag}: the {what} images have no regions: {why} (a folder "
                            "takes them from --annotations, ArrayRecord files from convert "
                            "--regions; the bundled --dataset digits_regions has them)")
        found = source.region_classes()
        if not found:
            raise UserError(f"{flag}: the {what} images' regions have no classes (COCO "
                            "annotations' category_id, a JSON-lines \"classes\"; SA-1B's boxes "
                            "have none): convert with an annotation file that gives them")
        names.append(list(found))
    if names[0][:len(names[1])] != names[1][:len(names[0])]:
        raise UserError(f"{flag}: the test images' region classes ({', '.join(names[1][:5])} …) "
                        f"are not the train images' ({', '.join(names[0][:5])} …): convert "
                        "both with the same annotation categories")
    return max(names, key=len)


def _slots(source) -> int:
    """The most regions one record of `source` has (a chunk of records at a time)."""
    most = 0
    for start in range(0, len(source), 1 << 20):
        counts = source.region_counts(np.arange(start, min(len(source), start + (1 << 20))))
        most = max(most, int(counts[:, 0].max(initial=0)))
    return max(most, 1)


def _prepared(source, image_size: int, slots: int, i: int):
    """Record i's eval crop, its boxes in the crop (slots × 4, zero padding) and their classes
    (-1: padding, no class, cropped away), with counts; a CorruptImage for an unreadable one."""
    regions = source.regions(i)
    n = len(regions)
    try:
        image, boxes, kept = transforms.eval_transform(source[i], image_size, regions.boxes)
    except transforms.CorruptImage as e:
        return e
    out_boxes = np.zeros((slots, 4), np.float32)
    out_classes = np.full(slots, -1, np.int32)
    out_boxes[:n] = boxes
    out_classes[:n] = np.where(kept, regions.classes, -1)
    classed = regions.classes >= 0
    return (image, out_boxes, out_classes,
            {"regions": n, "classed": int(classed.sum()),
             "cropped_away": int((classed & ~kept).sum())})


def batches(source, *, image_size: int, batch_size: int, slots: int, threads: int = 8):
    """Batches of {"image" uint8 (b, S, S, 3), "boxes" float32 (b, slots, 4) in pixels of the
    crop, "classes" int32 (b, slots), "index" (b,), "counts"}, records in order, read and
    transformed by `threads` threads; unreadable records left out ("skipped": their names)."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(source), batch_size):
            rows = range(start, min(len(source), start + batch_size))
            done = list(pool.map(functools.partial(_prepared, source, image_size, slots), rows))
            good = [(i, d) for i, d in zip(rows, done) if not isinstance(d, Exception)]
            counts = {k: sum(d[3][k] for _, d in good)
                      for k in ("regions", "classed", "cropped_away")}
            batch = {"skipped": [str(d) for d in done if isinstance(d, Exception)],
                     "counts": counts, "index": np.array([i for i, _ in good], np.int64)}
            if good:
                batch |= {k: np.stack([d[j] for _, d in good])
                          for j, k in enumerate(("image", "boxes", "classes"))}
            yield batch


def patch_labels(boxes: np.ndarray, classes: np.ndarray, grid: tuple[int, int],
                 patch: int) -> np.ndarray:
    """(b, h·w) int32: each patch's class, that of the smallest box with a class that holds the
    patch's centre ([x0, x1) × [y0, y1); the first such box on a tie); -1 where none does."""
    gh, gw = grid
    cy, cx = np.meshgrid((np.arange(gh) + 0.5) * patch, (np.arange(gw) + 0.5) * patch,
                         indexing="ij")
    cx, cy = cx.reshape(1, 1, -1), cy.reshape(1, 1, -1)
    x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))
    inside = (x0 <= cx) & (cx < x1) & (y0 <= cy) & (cy < y1) & (classes[..., None] >= 0)
    area = ((x1 - x0) * (y1 - y0)).astype(np.float64)
    smallest = np.where(inside, area, np.inf).argmin(axis=1)  # (b, h·w): the box of each patch
    label = np.take_along_axis(classes, smallest, axis=1)
    return np.where(inside.any(axis=1), label, -1).astype(np.int32)


class Reservoir:
    """A uniform sample of at most `cap` rows of a stream (Algorithm R; None: every row), the
    same rows of every array given with them, seeded."""

    def __init__(self, cap: int | None, seed: int):
        self.cap, self.seen, self.rng = cap, 0, np.random.default_rng(seed)
        self.chunks, self.rows = [], None  # rows given while there was room; then the sample

    def add(self, **arrays: np.ndarray) -> None:
        m = len(next(iter(arrays.values())))
        room = m if self.cap is None else max(0, min(m, self.cap - self.seen))
        if room:
            self.chunks.append({k: v[:room] for k, v in arrays.items()})
        if room < m:  # row t (from 0) replaces a random one with probability cap / (t + 1)
            if self.rows is None:
                self.rows, self.chunks = self._joined(), []
            t = self.seen + room + np.arange(m - room)
            slot = (self.rng.random(m - room) * (t + 1)).astype(np.int64)
            take = slot < self.cap
            for k, v in arrays.items():  # in order: a slot drawn twice keeps the later row
                self.rows[k][slot[take]] = v[room:][take]
        self.seen += m

    def _joined(self) -> dict | None:
        if not self.chunks:
            return None
        return {k: np.concatenate([c[k] for c in self.chunks]) for k in self.chunks[0]}

    def get(self, name: str) -> np.ndarray | None:
        """The sample's rows of `name` (None: no row was given)."""
        rows = self.rows if self.rows is not None else self._joined()
        return None if rows is None else rows[name]

    def __len__(self):
        return self.seen if self.cap is None else min(self.seen, self.cap)


@dataclasses.dataclass
class Features:
    """What `extract` kept of one split."""
    regions: Reservoir   # "pooled" (R, width), "layer" (R, embed_dim) where the encoder has one,
                         # "label" (R,)
    patches: Reservoir   # "x" (P, width), "label" (P,)
    counts: dict         # regions, classed, cropped_away; patches labelled, in no classed box
    records: int         # records read (unreadable ones left out and named)


def has_region_layer(model) -> bool:
    """An encoder with Region Transformer layers (`models.region.WithRegions`)."""
    return getattr(model, "region_layers", 0) >= 1


def extract(model, source, *, image_size: int, batch_size: int = 64, mesh=None,
            max_regions: int = 50_000, max_patches: int = 20_000, dense: bool = True,
            seed: int = 0, desc: str = "region features") -> Features:
    """The region embeddings and labelled patch tokens of `source` (see the module's docstring),
    one jitted forward per batch split over `mesh`'s batch axes (the last batch padded)."""
    patch = model.cfg.patch
    grid = (image_size // patch, image_size // patch)
    layer = has_region_layer(model)
    graphdef, params = nnx.split(model)
    sharding = out_sharding = None
    if mesh is not None:
        shards = mesh_lib.num_batch_shards(mesh)
        batch_size = -(-batch_size // shards) * shards
        sharding, out_sharding = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
        params = jax.tree.map(lambda x: mesh_lib.global_array(x, out_sharding), params)

    @functools.partial(jax.jit, out_shardings=out_sharding)
    def forward(params, images, boxes):
        model = nnx.merge(graphdef, params)
        pixels = transforms.normalize(images.astype(jnp.float32))
        out = model(pixels, boxes=boxes) if layer else model(pixels)
        tokens = out.last_hidden_state[:, 1:].astype(jnp.float32)  # (b, h·w, width)
        inside = region_lib.patch_mask(boxes, *grid, patch).astype(jnp.float32)  # (b, N, h·w)
        pooled = jnp.einsum("bnp,bpw->bnw", inside, tokens) / jnp.maximum(
            inside.sum(-1, keepdims=True), 1.0)
        return {"pooled": pooled} | (
            {"layer": out.region_embedding.astype(jnp.float32)} if layer else {}) | (
            {"tokens": tokens} if dense else {})

    slots = _slots(source)
    kept_regions, kept_patches = Reservoir(max_regions, seed), Reservoir(max_patches, seed + 1)
    counts = dict.fromkeys(("regions", "classed", "cropped_away", "patches_labelled",
                            "patches_in_no_box"), 0)
    skipped, records = [], 0
    with tqdm(total=len(source), desc=desc, unit="img") as bar:
        for batch in batches(source, image_size=image_size, batch_size=batch_size, slots=slots):
            skipped += batch["skipped"]
            bar.update(len(batch["index"]) + len(batch["skipped"]))
            for k, v in batch["counts"].items():
                counts[k] += v
            n = len(batch["index"])
            if not n:
                continue
            records += n
            pad = lambda x: np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
            images, boxes = pad(batch["image"]), pad(batch["boxes"])
            if sharding is not None:
                images, boxes = (mesh_lib.global_array(x, sharding) for x in (images, boxes))
            out = {k: np.asarray(v)[:n] for k, v in forward(params, images, boxes).items()}
            classes = batch["classes"]
            mine = classes >= 0
            kept_regions.add(pooled=out["pooled"][mine], label=classes[mine],
                             **({"layer": out["layer"][mine]} if layer else {}))
            if dense:
                labels = patch_labels(batch["boxes"], classes, grid, patch)
                counts["patches_labelled"] += int((labels >= 0).sum())
                counts["patches_in_no_box"] += int((labels < 0).sum())
                kept_patches.add(x=out["tokens"][labels >= 0], label=labels[labels >= 0])
    if skipped and jax.process_index() == 0:
        print(f"{desc}: left out {len(skipped)} unreadable images ({'; '.join(skipped[:4])}"
              f"{' …' if len(skipped) > 4 else ''})", flush=True)
    return Features(kept_regions, kept_patches, counts, records)


def _probe(train_xy, test_xy, what: str, which=probes.PROBES) -> dict:
    for split, (_, y) in (("train", train_xy), ("test", test_xy)):
        if y is None or not len(y):
            raise UserError(f"--regions: the {split} split has no {what} with a class to probe")
    return run.probe(train_xy, test_xy, which)


def evaluate(model, train, test, *, image_size: int, mesh=None, batch_size: int = 64,
             max_regions: int = 50_000, max_patches: int = 20_000, dense: bool = True,
             seed: int = 0) -> dict:
    """{"regions": {...}, "dense": {...}}: the region probe (pooled patch tokens, and the region
    layer's embeddings where the encoder has one) and the dense probe, train split against test
    split (see the module's docstring)."""
    names = class_names(train, test)
    size = image_size
    if size % model.cfg.patch:
        raise UserError(f"--image_size {size} is not a multiple of the encoder's patch "
                        f"{model.cfg.patch}")
    got = {}
    for split, source, cap in (("train", train, max_regions), ("test", test, None)):
        got[split] = extract(model, source, image_size=size, batch_size=batch_size, mesh=mesh,
                             max_regions=cap, max_patches=max_patches, dense=dense, seed=seed,
                             desc=f"region features ({split})")
    tr, te = got["train"], got["test"]
    regions = {"classes": names, "how": HOW, "train": tr.counts | {"probed": len(tr.regions)},
               "test": te.counts | {"probed": len(te.regions)}}
    for split in ("train", "test"):
        for k in ("patches_labelled", "patches_in_no_box"):
            regions[split].pop(k)
    xy = lambda f, name: (f.regions.get(name), f.regions.get("label"))
    regions["pooled_patches"] = _probe(xy(tr, "pooled"), xy(te, "pooled"), "regions")
    if has_region_layer(model):
        regions["region_layer"] = _probe(xy(tr, "layer"), xy(te, "layer"), "regions")
    result = {"regions": regions}
    if dense:
        result["dense"] = {"how": "each patch the class of the smallest classed box holding its "
                                  "centre; patches in no classed box left out",
                           "train": {"patches": tr.counts["patches_labelled"],
                                     "in_no_box": tr.counts["patches_in_no_box"],
                                     "probed": len(tr.patches)},
                           "test": {"patches": te.counts["patches_labelled"],
                                    "in_no_box": te.counts["patches_in_no_box"],
                                    "probed": len(te.patches)}}
        result["dense"] |= _probe((tr.patches.get("x"), tr.patches.get("label")),
                                  (te.patches.get("x"), te.patches.get("label")), "patches",
                                  which=("linear_probe",))
    return result
