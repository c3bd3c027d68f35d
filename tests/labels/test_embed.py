"""The teacher's embedding pass (mlcd_jax/labels/embed.py): embed → kmeans → assign → train on the
bundled digits, unreadable images named (by evaluation's features too), an out dir of another run
refused and its shards checked."""

import numpy as np
import pytest

from mlcd_jax.data import sources, transforms
from mlcd_jax.labels import __main__ as labels_cli, embed, store

from helpers import commands
from helpers.images import unreadable_files


@pytest.mark.slow
def test_embed_kmeans_assign_then_train_on_digits(tmp_path):
    """The whole label pipeline on real (bundled) images, then the trainer on its labels."""
    from flax import nnx

    from mlcd_jax.interop import weights
    from mlcd_jax.models import vit
    model = vit.ViT(vit.vit_config("micro", embed_dim=16), rngs=nnx.Rngs(0))
    weights.save_model_dir(model, tmp_path / "teacher")
    src = sources.DigitsSource()
    assert labels_cli.main(["embed", "--model", str(tmp_path / "teacher"), "--source", "digits",
                            "--out", str(tmp_path / "emb"), "--image_size", "16", "--batch_size",
                            "128", "--shard_size", "500"]) == 0
    assert len(list((tmp_path / "emb").glob("emb_*.npy"))) == 4
    shards = store.open_embeddings(tmp_path / "emb")
    assert shards.total == len(src) and shards.dim == 16
    again = embed.run(src, model, tmp_path / "emb", model_name="micro", image_size=16,
                      batch_size=128, shard_size=500)
    assert again["embedded_now"] == 0  # finished shards are never redone
    # an embedding equals the model's own output for that image
    x = transforms.normalize(transforms.eval_transform(src[600], 16)[None].astype(np.float32))
    e = np.asarray(model(x).embedding[0])
    np.testing.assert_allclose(shards.load(1)[100], e / np.linalg.norm(e), atol=2e-3)

    assert labels_cli.main(["all", "--embeddings", str(tmp_path / "emb"), "--out",
                            str(tmp_path / "lab"), "--num_centers", "24", "--num_labels", "3"]) == 0
    on_labels = ["--config.data.source=digits", f"--config.data.labels={tmp_path / 'lab'}",
                 "--config.data.num_labels=3"]
    run = lambda workdir: commands.train(workdir, *on_labels, "--config.head.num_classes=24",
                                         "--config.total_steps=6", "--config.log_every=3",
                                         "--config.checkpoint_every=3", "--config.data.workers=1")
    run(tmp_path / "run")
    logged = lambda d: {r["step"]: (r["loss"], r["skipped_images"])
                        for r in commands.records(tmp_path / d)}
    assert sorted(logged("run")) == [3, 6]

    # Resume from step 3 (the grain iterator state is in the checkpoint): steps 4-6 repeat exactly.
    import shutil
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    run(tmp_path / "resumed")
    assert logged("resumed") == logged("run")

    bad = commands.train(tmp_path / "run2", *on_labels, "--config.head.num_classes=60", expect=2)
    assert "uses K = 24 classes but config.head.num_classes = 60" in bad.stderr


def test_unreadable_images_are_named_by_every_stage(tmp_path, capsys):
    """Features for evaluation leave them out, say which and give the records of the rows made;
    embed leaves them out and names them, the readable ones keyed (their labels are joined by
    key); a source without keys refuses them (its rows would be its label rows)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from flax import nnx

    from mlcd_jax.evaluate import features
    from mlcd_jax.models import vit
    unreadable_files(tmp_path / "imgs")
    folder = sources.FolderSource(tmp_path / "imgs")
    model = vit.ViT(vit.vit_config("micro"), rngs=nnx.Rngs(0))
    x, y, rows = features.extract(model, folder, image_size=16, batch_size=4)
    assert len(x) == 7
    assert [folder.key(int(r)) for r in rows] == [f"cls/good{i}.png" for i in range(6)] + [
        "cls/tiny.png"]
    printed = capsys.readouterr().out
    assert ("3 unreadable images skipped" in printed
            and str(tmp_path / "imgs/cls/empty.jpg") in printed)
    done = embed.run(folder, model, tmp_path / "emb", model_name="micro", image_size=16)
    assert done["keyed"] and done["complete"]
    assert "embed: left out 3 unreadable images skipped" in capsys.readouterr().out
    shards = store.open_embeddings(tmp_path / "emb")
    assert shards.total == 7 and shards.keys(0) == [folder.key(int(r)) for r in rows]
    np.testing.assert_allclose(shards.load(0).astype(np.float32),
                               x / np.linalg.norm(x, axis=1, keepdims=True), atol=2e-3)

    writer = ArrayRecordWriter(str(tmp_path / "raw.array_record"), "group_size:1")
    for i in range(4):  # ArrayRecord files made elsewhere: no convert index, so no keys
        data = (tmp_path / "imgs" / "cls" / f"good{i}.png").read_bytes()
        writer.write(data[:20] if i == 2 else data)
    writer.close()
    raw = sources.ArrayRecordSource(str(tmp_path / "raw.array_record"))
    assert "no convert index beside it" in raw.unkeyed
    with pytest.raises(ValueError, match=r"1 unreadable images skipped .*raw.array_record\[2\].*"
                                         r"Without keys every record needs an embedding"):
        embed.run(raw, model, tmp_path / "emb_raw", model_name="micro", image_size=16)


def test_embed_refuses_an_out_dir_of_another_run_and_checks_its_shards(tmp_path):
    from flax import nnx

    from mlcd_jax.models import vit
    src = sources.Subset(sources.DigitsSource(), range(40))
    model = vit.ViT(vit.vit_config("micro", embed_dim=8), rngs=nnx.Rngs(0))
    run = lambda m, s, **kw: embed.run(s, m, tmp_path / "emb", model_name="m", image_size=16,
                                       batch_size=16, shard_size=15, **kw)
    assert run(model, src)["embedded_now"] == 3
    assert run(model, src)["embedded_now"] == 0  # same images, same weights: nothing redone
    other = vit.ViT(vit.vit_config("micro", embed_dim=8), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="already holds emb_00000.npy, made from other images, "
                                         "another model"):
        run(other, src)
    with pytest.raises(ValueError, match="already holds emb_00000.npy"):
        run(model, sources.Subset(sources.DigitsSource(), range(1, 32)))
    # The same weights in bf16 make (slightly) other embeddings: not mixed with float32 ones.
    half = embed.with_dtype(model, "bfloat16")
    assert half.cfg.dtype == "bfloat16" and embed.with_dtype(model, "float32") is model
    with pytest.raises(ValueError, match="already holds emb_00000.npy"):
        run(half, src)
    bf16 = embed.run(src, half, tmp_path / "emb16", model_name="m", image_size=16, batch_size=16,
                     shard_size=15)
    assert bf16["dtype"] == "bfloat16" and bf16["embedded_now"] == 3
    a32, a16 = (np.load(tmp_path / d / "emb_00000.npy").astype(np.float32)
                for d in ("emb", "emb16"))
    assert 0 < np.abs(a32 - a16).max() < 0.05  # bf16: close to float32, not equal
    # A shard that does not match the manifest (copied from elsewhere) is caught on open.
    np.save(tmp_path / "emb" / "emb_00001.npy", np.zeros((4000, 8), np.float16))
    with pytest.raises(ValueError, match="emb_00001.npy holds 4000 × 8 embeddings but .* says "
                                         "15 × 8"):
        store.open_embeddings(tmp_path / "emb")
