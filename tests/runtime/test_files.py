"""Resumable pieces (mlcd_jax/runtime/files.py): `fresh_piece`, the check embed, assign and LiT
make before reusing a piece: finished, same fingerprint, rows (and side files) that read back, and
where asked the recorded sha256."""

import json

import numpy as np

from mlcd_jax.runtime import files as records

SIDES = (".labels.npy", ".records.npy")


def piece(tmp_path, rows=5, sides=True):
    """A finished piece made with fingerprint "a", with one label and one record per row."""
    path = tmp_path / "train.npy"
    array = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    records.write_piece(path, array, {"fingerprint": "a"})
    if sides:
        np.save(path.with_suffix(".labels.npy"), np.arange(rows))
        np.save(path.with_suffix(".records.npy"), np.arange(rows))
    return path, array


def test_a_finished_piece_of_the_same_inputs_is_reused(tmp_path):
    path, array = piece(tmp_path)
    expected = {"fingerprint": "a", "rows": 5, "sha256": records.array_sha256(array)}
    assert records.fresh_piece(path, "a") == expected
    assert records.fresh_piece(path, "a", verify_sha256=True, companions=SIDES) == expected


def test_a_piece_of_other_inputs_or_unfinished_is_not(tmp_path):
    path, _ = piece(tmp_path)
    assert records.fresh_piece(path, "b") is None
    assert records.fresh_piece(path, "b", verify_sha256=True, companions=SIDES) is None
    path.with_suffix(".json").unlink()  # cut short before its record was written
    assert records.fresh_piece(path, "a") is None
    assert records.fresh_piece(tmp_path / "never.npy", "a") is None


def test_a_cut_short_or_corrupt_array_is_not_reused(tmp_path):
    path, _ = piece(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-8])  # its data cut short under an intact record
    assert records.fresh_piece(path, "a") is None
    path.write_bytes(whole[:60])  # its header cut short
    assert records.fresh_piece(path, "a") is None
    path.write_bytes(b"not an array" * 20)
    assert records.fresh_piece(path, "a", verify_sha256=True) is None


def test_rows_that_disagree_with_the_record_are_not_reused(tmp_path):
    path, _ = piece(tmp_path)
    record = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps(record | {"rows": 4}))
    assert records.fresh_piece(path, "a") is None
    path.with_suffix(".json").write_text(json.dumps(record))
    assert records.fresh_piece(path, "a") is not None
    np.save(path, np.zeros((6, 3), np.float32))  # another array under the old record
    assert records.fresh_piece(path, "a") is None


def test_companions_must_read_back_with_one_entry_per_row(tmp_path):
    path, _ = piece(tmp_path)
    np.save(path.with_suffix(".labels.npy"), np.arange(4))
    assert records.fresh_piece(path, "a", companions=SIDES) is None
    assert records.fresh_piece(path, "a") is not None  # only checked where named
    np.save(path.with_suffix(".labels.npy"), np.zeros((5, 2)))  # per row, but not one entry
    assert records.fresh_piece(path, "a", companions=SIDES) is None
    np.save(path.with_suffix(".labels.npy"), np.arange(5))
    assert records.fresh_piece(path, "a", companions=SIDES) is not None
    side = path.with_suffix(".records.npy")
    side.write_bytes(side.read_bytes()[:100])  # a damaged side file
    assert records.fresh_piece(path, "a", companions=SIDES) is None
    side.write_bytes(b"")  # an empty one (np.load: EOFError)
    assert records.fresh_piece(path, "a", companions=SIDES) is None
    side.unlink()
    assert records.fresh_piece(path, "a", companions=SIDES) is None


def test_changed_contents_are_caught_only_where_the_checksum_is_verified(tmp_path):
    path, array = piece(tmp_path)
    changed = array.copy()
    changed[2, 1] += 1
    np.save(path, changed)  # same shape, other bytes, the old record
    assert records.fresh_piece(path, "a", verify_sha256=True) is None
    assert records.fresh_piece(path, "a", verify_sha256=True, companions=SIDES) is None
    assert records.fresh_piece(path, "a") is not None
    assert records.fresh_piece(path, "a", companions=SIDES) is not None
    np.save(path, array)
    assert records.fresh_piece(path, "a", verify_sha256=True) is not None
