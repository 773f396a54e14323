"""BERT WordPiece tokenizer of Hunyuan-CLIP, id-exact with transformers' `BertTokenizer`.

The official `HunyuanClip` calls `BertTokenizer(texts, padding="max_length", max_length=77,
truncation=True)`. This module reproduces that call in pure Python, step for step:

1. lower-case, character by character, everything except literal special tokens (`[CLS]`,
   `[SEP]`, `[PAD]`, `[UNK]`, `[MASK]` typed in the text), which are cut out and map to their ids;
2. basic tokenization of each remaining piece: drop NUL, U+FFFD and control/format characters
   (Unicode category C*, except tab/newline/CR), turn whitespace (tab/newline/CR, category Zs)
   into spaces, put spaces around CJK ideographs, NFC, split on whitespace, then per word
   lower-case, strip accents (NFD, drop category Mn) and split off every punctuation character
   (ASCII symbols and category P*);
3. WordPiece: greedy longest match first with `##` continuations; a word longer than 100
   characters, or one that cannot be pieced completely, becomes a single `[UNK]`;
4. keep the first `max_length - 2` pieces, add `[CLS]`/`[SEP]`, right-pad with `[PAD]`.

Why not tensorflow-text: its `BertTokenizer(lower_case=True)` applies NFKC case folding, which
turns full-width punctuation (U+FF0C etc.) into ASCII (12 of the 141 `hunyuan_clip_vocab` rows
agree). With `lower_case=False` after this module's normalisation it agrees on all 141 rows, but
still differs from the official ids on special tokens typed in the text, on Unicode line/paragraph
separators (it splits on ASCII whitespace only) and on long non-ASCII words (its limit is 100
bytes, not characters); `tests/test_hunyuan_clip_tokenizer.py` shows these cases.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import unicodedata
import warnings
from typing import Mapping, NamedTuple, Sequence

import numpy as np

SPECIAL_TOKEN_KEYS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Code-point ranges of the "CJK Unified Ideographs" blocks that BERT splits into single characters.
CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)


class TokenBatch(NamedTuple):
    """`input_ids` and `attention_mask`, both int32 (b, max_length); mask 1 on `[CLS]..[SEP]`."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class WordPieceConfig:
    """The `tokenizer_config.json` settings `BertTokenizer` acts on (released values as defaults)."""

    do_lower_case: bool = True
    do_basic_tokenize: bool = True
    tokenize_chinese_chars: bool = True
    strip_accents: bool | None = None      # None: follow do_lower_case (BERT's rule)
    never_split: tuple[str, ...] = ()
    model_max_length: int = 77
    unk_token: str = "[UNK]"
    sep_token: str = "[SEP]"
    pad_token: str = "[PAD]"
    cls_token: str = "[CLS]"
    mask_token: str = "[MASK]"
    max_input_chars_per_word: int = 100

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return tuple(getattr(self, k) for k in SPECIAL_TOKEN_KEYS)


_CONFIG_IGNORED = {"name_or_path", "tokenizer_class", "clean_up_tokenization_spaces", "tokenizer_file",
                   "special_tokens_map_file", "added_tokens_decoder", "additional_special_tokens"}
_TOKENIZER_CLASSES = ("BertTokenizer", "BertTokenizerFast")


def read_config(tokenizer_dir: str | os.PathLike) -> WordPieceConfig:
    """`WordPieceConfig` from `tokenizer_config.json` (+ `special_tokens_map.json` if present).

    Unknown keys warn; a tokenizer class other than BERT's is an error.
    """
    tokenizer_dir = pathlib.Path(tokenizer_dir)
    path = tokenizer_dir / "tokenizer_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer config not found (expected a BertTokenizer folder with "
                                "vocab.txt and tokenizer_config.json)")
    raw = json.loads(path.read_text(encoding="utf-8"))
    specials_path = tokenizer_dir / "special_tokens_map.json"
    if specials_path.is_file():
        for key, value in json.loads(specials_path.read_text(encoding="utf-8")).items():
            if key in SPECIAL_TOKEN_KEYS:
                raw[key] = value["content"] if isinstance(value, dict) else value
    cls_name = raw.get("tokenizer_class", "BertTokenizer")
    if cls_name not in _TOKENIZER_CLASSES:
        raise ValueError(f"{path}: tokenizer_class {cls_name!r} is not a WordPiece BERT tokenizer; "
                         f"supported: {_TOKENIZER_CLASSES}")
    fields = {f.name for f in dataclasses.fields(WordPieceConfig)}
    unknown = sorted(set(raw) - fields - _CONFIG_IGNORED)
    if unknown:
        warnings.warn(f"{path}: ignoring unknown tokenizer settings {unknown}")
    kwargs = {k: v for k, v in raw.items() if k in fields}
    for key in SPECIAL_TOKEN_KEYS:
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = kwargs[key]["content"]
    kwargs["never_split"] = tuple(kwargs.get("never_split") or ())
    return WordPieceConfig(**kwargs)


def load_vocab(path: str | os.PathLike) -> dict[str, int]:
    """`vocab.txt`: one token per line, id = line number.

    Lines are split on '\\n' only: the released vocabulary contains U+2028 (LINE SEPARATOR) as a
    token, which `str.splitlines` would cut in two and shift every later id.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: WordPiece vocabulary not found")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab: dict[str, int] = {}
    for index, token in enumerate(lines):
        vocab[token] = index
    return vocab


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def lower_per_character(text: str) -> str:
    """Lower-case character by character, as transformers' pre-pass does (a final capital sigma
    becomes 'σ', not the word-final 'ς' of `str.lower`)."""
    return "".join(ch.lower() for ch in text)


def clean_text(text: str) -> str:
    """Drop NUL, U+FFFD and control/format characters; every whitespace character -> ' '."""
    out = []
    for ch in text:
        if ch == "\x00" or ch == "\ufffd" or _is_control(ch):
            continue
        out.append(" " if _is_whitespace(ch) else ch)
    return "".join(out)


def space_cjk(text: str) -> str:
    """Surround every CJK ideograph with spaces, so that each one becomes a word."""
    return "".join(f" {ch} " if _is_cjk(ch) else ch for ch in text)


def strip_accents(word: str) -> str:
    """NFD, then drop combining marks (category Mn): 'café' -> 'cafe'."""
    return "".join(ch for ch in unicodedata.normalize("NFD", word) if unicodedata.category(ch) != "Mn")


def split_punctuation(word: str) -> list[str]:
    """Every punctuation character becomes its own token: 'a,b.' -> ['a', ',', 'b', '.']."""
    pieces: list[str] = []
    start_new = True
    for ch in word:
        if _is_punctuation(ch):
            pieces.append(ch)
            start_new = True
        else:
            if start_new:
                pieces.append("")
            start_new = False
            pieces[-1] += ch
    return pieces


class WordPieceTokenizer:
    """BERT tokenizer: `tokenize(text) -> pieces`, `encode(text) -> ids`, `__call__(texts) -> TokenBatch`.

    `vocab`: token -> id. `config`: the `tokenizer_config.json` settings.
    """

    def __init__(self, vocab: Mapping[str, int], config: WordPieceConfig = WordPieceConfig()):
        self.vocab = dict(vocab)
        self.config = config
        missing = [t for t in config.special_tokens if t not in self.vocab]
        if missing:
            raise ValueError(f"special tokens {missing} are not in the vocabulary "
                             f"({len(self.vocab)} entries)")
        self.unk_id = self.vocab[config.unk_token]
        self.cls_id = self.vocab[config.cls_token]
        self.sep_id = self.vocab[config.sep_token]
        self.pad_id = self.vocab[config.pad_token]
        self._specials = set(config.special_tokens)
        self._never_split = self._specials | set(config.never_split)
        by_length = sorted(self._specials, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in by_length) + ")")
        self._strip = config.do_lower_case if config.strip_accents is None else config.strip_accents

    @classmethod
    def from_dir(cls, tokenizer_dir: str | os.PathLike) -> "WordPieceTokenizer":
        """Load a released tokenizer folder (`vocab.txt`, `tokenizer_config.json`, ...)."""
        tokenizer_dir = pathlib.Path(tokenizer_dir)
        return cls(load_vocab(tokenizer_dir / "vocab.txt"), read_config(tokenizer_dir))

    @classmethod
    def released(cls) -> "WordPieceTokenizer":
        """The released Hunyuan-CLIP tokenizer (47,020 entries), shipped in the package assets."""
        return cls.from_dir(released_tokenizer_dir())

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of `text`, without `[CLS]`/`[SEP]` and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self.config.do_lower_case:
            text = "".join(p if p in self._specials else lower_per_character(p)
                           for p in self._special_re.split(text))
        out: list[str] = []
        for part in self._special_re.split(text):
            if not part:
                continue
            if part in self._specials:
                out.append(part)
                continue
            words = self._basic_tokenize(part) if self.config.do_basic_tokenize else part.split()
            for word in words:
                # `never_split` words skip WordPiece: kept whole, `[UNK]` if not in the vocabulary.
                out.extend([word] if word in self.config.never_split else self._wordpiece(word))
        return out

    def encode(self, text: str) -> list[int]:
        """Ids of `tokenize(text)`; pieces outside the vocabulary map to `[UNK]`."""
        return [self.vocab.get(t, self.unk_id) for t in self.tokenize(text)]

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> TokenBatch:
        """`[CLS] ids[:max_length-2] [SEP] [PAD]...` for each text: int32 (b, max_length) ids and mask."""
        if isinstance(texts, str):
            texts = [texts]
        max_length = self.config.model_max_length if max_length is None else max_length
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 to hold [CLS] and [SEP], got {max_length}")
        ids = np.full((len(texts), max_length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_length), np.int32)
        for row, text in enumerate(texts):
            seq = [self.cls_id, *self.encode(text)[:max_length - 2], self.sep_id]
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        return TokenBatch(ids, mask)

    def _basic_tokenize(self, text: str) -> list[str]:
        text = clean_text(text)
        if self.config.tokenize_chinese_chars:
            text = space_cjk(text)
        words: list[str] = []
        for word in unicodedata.normalize("NFC", text).split():
            if word in self._never_split:
                words.append(word)
                continue
            if self.config.do_lower_case:
                word = word.lower()
            if self._strip:
                word = strip_accents(word)
            words.extend(split_punctuation(word))
        return " ".join(words).split()

    def _wordpiece(self, word: str) -> list[str]:
        if len(word) > self.config.max_input_chars_per_word:
            return [self.config.unk_token]
        pieces = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            else:
                return [self.config.unk_token]
            pieces.append(piece)
            start = end
        return pieces


def released_tokenizer_dir() -> pathlib.Path:
    """Folder of the released tokenizer files inside the package: they ship once, in the shipped demo
    checkpoint, where every converted checkpoint keeps them (`assets/demo/hunyuan_clip/tokenizer`)."""
    return pathlib.Path(__file__).resolve().parents[1] / "assets" / "demo" / "hunyuan_clip" / "tokenizer"
