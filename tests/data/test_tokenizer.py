"""The text tokenizer: a BPE trained here reads back from vocab.json + merges.txt and encodes as
transformers' own CLIPTokenizer does with those files; ids, padding and truncation."""

import numpy as np
import pytest
import transformers

from mlcd_jax.data import tokenizer

CORPUS = [f"a photo of the digit {name}, written {how}." for name in
          ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
          for how in ("by hand", "in black ink", "quickly", "neatly")] * 3


def test_trained_bpe_matches_transformers_clip_tokenizer(tmp_path):
    trained = tokenizer.train(CORPUS, vocab_size=400, context_length=20)
    trained.tokenizer.model.save(str(tmp_path))          # vocab.json + merges.txt
    loaded = tokenizer.load(tmp_path, context_length=20)
    theirs = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"),
                                        str(tmp_path / "merges.txt"))
    texts = ["A photo of the digit seven, written neatly.", "the  digit   TWO!!",
             "one two three four", "eight's nine'll"]
    ours = loaded(texts)
    for row, text in zip(ours, texts):
        want = theirs(text)["input_ids"]                   # <|startoftext|> … <|endoftext|>
        assert list(row[:len(want)]) == want, (text, list(row), want)
        assert (row[len(want):] == loaded.end).all()       # padded with end tokens
    np.testing.assert_array_equal(trained(texts), ours)  # the trained one encodes the same


def test_context_length_keeps_the_end_token(tmp_path):
    tok = tokenizer.train(CORPUS, vocab_size=300, context_length=6)
    ids = tok(["a photo of the digit seven written by hand", "one"])
    assert ids.shape == (2, 6) and ids.dtype == np.int32
    assert ids[0, 0] == tok.start and ids[0, -1] == tok.end  # cut, the end token kept
    end = list(ids[1]).index(tok.end)
    assert ids[1, 0] == tok.start and end > 1 and (ids[1, end:] == tok.end).all()
    path = tok.save(tmp_path / "run")
    again = tokenizer.load(path.parent, context_length=6)
    np.testing.assert_array_equal(again(["one two"]), tok(["one two"]))


def test_a_directory_without_a_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, nor vocab.json"):
        tokenizer.load(tmp_path)


def test_training_gives_the_same_tokenizer_in_every_process():
    """(tokenizers' own BpeTrainer broke ties by hash order: another vocabulary per process.)"""
    import pathlib
    import subprocess
    import sys
    code = ("from mlcd_jax.data import tokenizer; import test_tokenizer as t; "
            "print(tokenizer.train(t.CORPUS, vocab_size=400).tokenizer.to_str())")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=pathlib.Path(__file__).parent, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) > 1000
