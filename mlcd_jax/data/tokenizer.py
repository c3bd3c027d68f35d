"""Text → token ids for the text tower, with the `tokenizers` library; nothing is downloaded.

CLIP's tokenizer where the user has one (a local directory with `tokenizer.json`, or CLIP's
`vocab.json` + `merges.txt`, read with CLIP's own normalisation and splitting: lower case, words,
single digits and punctuation runs, byte-level BPE with `</w>` ending each word); for data that
comes with none (the demo, tests), a BPE of the same form trained here on the captions and saved
beside the run. Each text becomes <|startoftext|> ids <|endoftext|>, cut to the context length
(keeping the end-of-text token) and padded with end-of-text tokens (as transformers pads; the text
tower pools at the first one).
"""

from __future__ import annotations

import collections
import json
import pathlib

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from mlcd_jax.runtime.errors import MissingFile, UserError

START, END = "<|startoftext|>", "<|endoftext|>"
# CLIP's word pattern: contractions, letter runs, single digits, runs of other symbols.
WORDS = Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def _clip_form(model: models.BPE) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(),
                                           normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(WORDS, behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


class TextTokenizer:
    """`tokenizer(texts)` → (N, context_length) int32 ids."""

    def __init__(self, tokenizer: Tokenizer, context_length: int = 77):
        self.tokenizer, self.context_length = tokenizer, context_length
        self.start, self.end = tokenizer.token_to_id(START), tokenizer.token_to_id(END)
        if self.start is None or self.end is None:
            raise UserError(f"the tokenizer has no {START} / {END} tokens: not a CLIP tokenizer")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __call__(self, texts) -> np.ndarray:
        out = np.full((len(texts), self.context_length), self.end, np.int32)
        for row, encoding in enumerate(self.tokenizer.encode_batch(list(texts),
                                                                   add_special_tokens=False)):
            ids = [self.start, *encoding.ids[:self.context_length - 2], self.end]
            out[row, :len(ids)] = ids
        return out

    def save(self, directory) -> pathlib.Path:
        path = pathlib.Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path


def load(directory, context_length: int = 77) -> TextTokenizer:
    """A CLIP tokenizer from a local directory: `tokenizer.json`, or `vocab.json` + `merges.txt`."""
    directory = pathlib.Path(directory)
    if (directory / "tokenizer.json").is_file():
        return TextTokenizer(Tokenizer.from_file(str(directory / "tokenizer.json")),
                             context_length)
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise MissingFile(f"{directory}: no tokenizer.json, nor vocab.json + merges.txt (a "
                          "CLIP tokenizer saved by transformers or open_clip)")
    lines = merges.read_text(encoding="utf-8").splitlines()
    pairs = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    bpe = models.BPE(vocab=json.loads(vocab.read_text(encoding="utf-8")), merges=pairs,
                     end_of_word_suffix="</w>", unk_token=END, fuse_unk=False)
    return TextTokenizer(_clip_form(bpe), context_length)


def train(texts, vocab_size: int, context_length: int = 77) -> TextTokenizer:
    """A byte-level BPE of CLIP's form learnt from `texts` (for data with no tokenizer), the same
    on every run: the most frequent adjacent pair is merged first, ties to the smaller pair.
    (tokenizers' own BpeTrainer breaks ties by hash order, which differs from process to process.)
    Written for caption sets of modest vocabulary: bring a tokenizer for web-scale text."""
    splitter = _clip_form(models.BPE())
    words = collections.Counter(
        word for text in texts
        for word, _ in splitter.pre_tokenizer.pre_tokenize_str(
            splitter.normalizer.normalize_str(text)))
    # Each word as symbols, the last one marked as a word's end (CLIP's "</w>").
    symbols = {w: (*w[:-1], w[-1] + "</w>") for w in words}
    ends = sorted({s[-1] for s in symbols.values()})
    vocab = [START, END, *sorted(pre_tokenizers.ByteLevel.alphabet()), *ends]
    if vocab_size < len(vocab):
        raise UserError(f"config.text.vocab_size {vocab_size} is below the {len(vocab)} tokens "
                        "every byte and word end needs")
    merges = []
    while len(vocab) < vocab_size:
        pairs = collections.Counter()
        for w, parts in symbols.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.append(best[0] + best[1])
        symbols = {w: _merge(parts, best) for w, parts in symbols.items()}
    bpe = models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                     end_of_word_suffix="</w>", unk_token=END, fuse_unk=False)
    return TextTokenizer(_clip_form(bpe), context_length)


def _merge(parts: tuple, pair: tuple) -> tuple:
    out, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return tuple(out)
