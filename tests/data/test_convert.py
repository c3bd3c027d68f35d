"""The ArrayRecord converter (mlcd_jax/data/convert.py): image folders and img2dataset tar shards to
shards and an index, captions kept in record order, unreadable files left out and listed, a second
convert into the same prefix refused."""

import io
import json
import pathlib
import sys
import tarfile
from concurrent import futures

import numpy as np
import pytest

from mlcd_jax.data import convert, index as index_lib, sources, transforms

from helpers.images import jpeg, unreadable_files


def test_convert_folder_and_tars_to_arrayrecord(tmp_path):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "dog").mkdir()
    for i in range(5):
        (tmp_path / "imgs" / ("cat" if i < 3 else "dog") / f"{i}.png").write_bytes(
            jpeg(i * 40, fmt="PNG"))
    shards = convert.convert(str(tmp_path / "imgs"), str(tmp_path / "ar" / "train"),
                             shard_size=2)["shards"]
    assert [s.rsplit("/", 1)[1] for s in shards] == [f"train-{i:05d}-of-00003.array_record"
                                                     for i in range(3)]
    ar = sources.ArrayRecordSource(str(tmp_path / "ar" / "train-*.array_record"))
    folder = sources.FolderSource(tmp_path / "imgs")
    assert len(ar) == len(folder) == 5 and folder[4]["label"] == 1
    for i in range(5):
        assert ar[i]["image_bytes"] == folder[i]["image_bytes"]
    index = [json.loads(l)
             for l in (tmp_path / "ar" / "train.index.jsonl").read_text().splitlines()]
    assert index[3] == {"record": 3, "key": "dog/3.png", "name": "dog/3.png"}

    for t in range(2):  # webdataset shards, as img2dataset writes them
        with tarfile.open(tmp_path / f"shard-{t:05d}.tar", "w") as tar:
            for k in range(3):
                for name, data in ((f"{t}{k}.jpg", jpeg(t * 100 + k)), (f"{t}{k}.txt", b"caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    convert.convert(str(tmp_path / "shard-{00000..00001}.tar"), str(tmp_path / "ar" / "web"), 100)
    web = sources.ArrayRecordSource(str(tmp_path / "ar" / "web-*.array_record"))
    assert len(web) == 6 and web[4]["image_bytes"] == jpeg(101)
    assert convert.main(["--input", str(tmp_path / "none"), "--output", str(tmp_path / "x")]) == 2


def add_to_tar(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_captions_travel_from_img2dataset_shards_and_folders(tmp_path):
    """img2dataset writes KEY.jpg beside KEY.txt (in tar shards, or files in a folder): each
    image keeps its own caption through convert, across output shards, read from any of them."""
    expected = []
    for t in range(2):
        with tarfile.open(tmp_path / f"{t:05d}.tar", "w") as tar:
            for k in range(4):
                caption = f"photo {t}-{k}: a café" if (t, k) != (1, 2) else None
                add_to_tar(tar, f"{t}{k:04d}.jpg", jpeg(t * 100 + k))
                add_to_tar(tar, f"{t}{k:04d}.json", b'{"caption": "not this one"}')
                if caption:
                    add_to_tar(tar, f"{t}{k:04d}.txt", f"  {caption}\n".encode())
                expected.append([caption] if caption else [])
    result = convert.convert(str(tmp_path / "{00000..00001}.tar"), str(tmp_path / "ar" / "web"),
                             shard_size=3)
    assert result["captioned"] == 7 and len(result["shards"]) == 3
    web = sources.ArrayRecordSource(str(tmp_path / "ar" / "web-*.array_record"))
    assert [web.captions(i) for i in range(len(web))] == expected
    assert web[5]["image_bytes"] == jpeg(101)  # captions and images in the same order
    third = sources.ArrayRecordSource(str(tmp_path / "ar" / "web-00002-of-00003.array_record"))
    assert [third.captions(i) for i in range(2)] == expected[6:]
    held_out = sources.Subset(web, np.array([1, 6]))
    assert [held_out.captions(i) for i in range(2)] == [expected[1], expected[6]]

    # A folder as img2dataset's "files" output: the caption is the .txt beside the image.
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.png").write_bytes(jpeg(1, fmt="PNG"))
    (tmp_path / "files" / "a.txt").write_text("a red square\n")
    (tmp_path / "files" / "b.png").write_bytes(jpeg(2, fmt="PNG"))
    folder = sources.FolderSource(tmp_path / "files")
    assert len(folder) == 2 and folder.captions(0) == ["a red square"] and folder.captions(1) == []
    convert.convert(str(tmp_path / "files"), str(tmp_path / "ar" / "files"), 10)
    files = sources.ArrayRecordSource(str(tmp_path / "ar" / "files-*.array_record"))
    assert [files.captions(i) for i in range(2)] == [["a red square"], []]

    # Names and captions by record (the offsets table) are what the index's lines say, in order,
    # read here line by line as the old reader did.
    lines = [json.loads(line) for line in (tmp_path / "ar" / "web.index.jsonl").open()]
    assert [web.name(i).split(" (")[0] for i in range(len(web))] == [x["name"] for x in lines]
    assert [x.get("caption") for x in lines] == [c[0] if c else None for c in expected]

    # An index from before the offsets table: one line naming the fix; names fall back to the
    # record's place; `--reindex` adds the table and everything reads as before.
    index = tmp_path / "ar" / "web.index.jsonl"
    pathlib.Path(f"{tmp_path / 'ar' / 'web'}.index.json").unlink()
    pathlib.Path(f"{tmp_path / 'ar' / 'web'}.index.offsets").unlink()
    legacy = sources.ArrayRecordSource(str(tmp_path / "ar" / "web-*.array_record"))
    with pytest.raises(ValueError, match=r"has no offsets table .* --reindex .*ar/web`"):
        legacy.captions(0)
    assert legacy.name(4).endswith("web-00001-of-00003.array_record[1]")
    assert convert.main(["--reindex", str(tmp_path / "ar" / "web")]) == 0
    again = sources.ArrayRecordSource(str(tmp_path / "ar" / "web-*.array_record"))
    assert [again.captions(i) for i in range(len(again))] == expected
    assert [again.name(i) for i in range(len(again))] == [web.name(i) for i in range(len(web))]

    # An index that lists fewer records than the shards hold is stale: said, not misread.
    index.write_text("".join(index.read_text().splitlines(keepends=True)[:6]))
    with pytest.raises(ValueError, match="web.index.json does not match .*convert again"):
        sources.ArrayRecordSource(str(tmp_path / "ar" / "web-*.array_record")).captions(0)
    assert convert.main(["--reindex", str(tmp_path / "ar" / "web")]) == 2  # and refused


def test_convert_leaves_out_and_lists_unreadable_files_and_refuses_to_mix_runs(tmp_path, capsys):
    unreadable_files(tmp_path / "imgs")
    out = str(tmp_path / "ar" / "train")
    assert convert.main(["--input", str(tmp_path / "imgs"), "--output", out,
                         "--shard_size", "3"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 3 files that are not readable images" in printed
    assert "cls/empty.jpg" in printed and "7 images" in printed
    assert ("1 images are smaller than 16 px on a side and will be upscaled: cls/tiny.png (5×5)"
            in printed)
    skipped = [json.loads(l) for l in open(f"{out}.skipped.jsonl")]
    assert sorted(s["name"] for s in skipped) == ["cls/cut.jpg", "cls/empty.jpg", "cls/notes.png"]
    # The README's glob also matches the index and the skipped list: only shards are read.
    source = sources.ArrayRecordSource(str(tmp_path / "ar" / "train*"))
    assert len(source) == 7 and len(source.files) == 3
    assert all(transforms.decode(source[i]) for i in range(7))
    assert source.name(4) == f"cls/good4.png ({out}-00001-of-00003.array_record[1])"
    # A second convert into the same prefix would leave 3 old shards beside new ones.
    assert convert.main(["--input", str(tmp_path / "imgs"), "--output", out]) == 2
    assert "3 shards of an earlier convert exist" in capsys.readouterr().err
    assert convert.main(["--input", str(tmp_path / "imgs"), "--output", out, "--overwrite"]) == 0
    assert len(sources.ArrayRecordSource(f"{out}-*.array_record")) == 7  # not 14
    assert len(convert.existing_shards(out)) == 1


def test_index_lines_read_by_many_threads_at_first_use(tmp_path):
    """grain's reading threads (and evaluate's pool) call `line` on one fresh Index at once: each
    must get its own record, never a file another thread's first open closed under it (CI once
    saw 'Bad file descriptor' there). Thread switches forced often, many fresh indexes."""
    shard = tmp_path / "x-00000.array_record"
    shard.write_bytes(b"")
    writer = index_lib.Writer(tmp_path / "x")
    writer.new_shard()
    for i in range(64):
        writer.add(f"key{i}", f"name{i}", None)
    writer.finish([str(shard)])
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(300):
            index = index_lib.Index(tmp_path / "x")
            with futures.ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda r: index.line(r)["key"], range(64)))
            assert got == [f"key{i}" for i in range(64)]
    finally:
        sys.setswitchinterval(interval)


def test_class_sub_folders_are_kept_as_classes_and_evaluation_reads_them(tmp_path):
    """A folder's class sub-folders become each record's class in the index (an image at the top
    has none); ArrayRecord files give the same ids as the folder, test files the train files'."""
    from mlcd_jax.evaluate import run as evaluation
    from mlcd_jax.runtime.errors import UserError
    train, test = tmp_path / "train", tmp_path / "test"
    for folder, names in ((train, ("zebra", "ant", "ant", "moth")), (test, ("moth", "zebra"))):
        for i, name in enumerate(names):
            (folder / name).mkdir(parents=True, exist_ok=True)
            (folder / name / f"{i}.png").write_bytes(jpeg(i * 30, size=(20, 20), fmt="PNG"))
    (train / "loose.png").write_bytes(jpeg(200, size=(20, 20), fmt="PNG"))
    for folder in (train, test):
        convert.convert(str(folder), str(tmp_path / "ar" / folder.name), shard_size=2)
    index = index_lib.Index(tmp_path / "ar" / "train")
    names = [index.line(i)["name"] for i in range(index.records)]
    met = {}  # the writer numbers classes as it meets them
    for name in names:
        if "/" in name:
            met.setdefault(name.split("/")[0], len(met))
    assert sorted(index.classes) == ["ant", "moth", "zebra"]
    assert list(index.labels()) == [met[n.split("/")[0]] if "/" in n else -1 for n in names]

    ar = sources.ArrayRecordSource(str(tmp_path / "ar" / "train-*.array_record"))
    folder = sources.FolderSource(train)
    assert ar.class_index == folder.class_index == {"ant": 0, "moth": 1, "zebra": 2}
    name = lambda source, i: source.name(i).split(" (")[0]  # without where the record lies
    by_name = {name(ar, i): ar[i]["label"] for i in range(len(ar))}
    in_folder = lambda i: str(pathlib.Path(folder.name(i)).relative_to(train))
    assert by_name == {in_folder(i): folder[i]["label"] for i in range(len(folder))} | {
        "loose.png": -1}
    got_train, got_test = evaluation.dataset_splits(
        "arrayrecord", path=str(tmp_path / "ar" / "train-*.array_record"),
        test_path=str(tmp_path / "ar" / "test-*.array_record"))
    assert {name(got_test, i): got_test[i]["label"] for i in range(len(got_test))} == {
        "moth/0.png": 1, "zebra/1.png": 2}  # the train files' ids, not the test folder's own

    with tarfile.open(tmp_path / "shard.tar", "w") as tar:  # tars have no classes
        data = jpeg(9)
        info = tarfile.TarInfo("000.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    convert.convert(str(tmp_path / "shard.tar"), str(tmp_path / "ar" / "web"), shard_size=2)
    assert index_lib.Index(tmp_path / "ar" / "web").classes is None
    with pytest.raises(UserError, match="its images have no classes"):
        evaluation.dataset_splits("arrayrecord", path=str(tmp_path / "ar" / "web-*.array_record"))
