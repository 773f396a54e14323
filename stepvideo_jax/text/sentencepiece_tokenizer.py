"""Step-LLM tokenizer, id-exact with the official `Wrapped_StepChatTokenizer`.

Per prompt: plain sentencepiece encoding of the text (no sampling, special pieces such as `<|BOT|>`
are never matched from raw text, byte fallback as the model file specifies); keep the first
`max_length - 2` pieces; `[1] + pieces + [2]`; right-pad with 2 to `max_length`. The mask is 1 on
those `len(pieces) + 2` positions. BOS = 1, EOS = PAD = 2 are fixed by the wrapper, not read from
the model file. An empty prompt list gives one row `[1, 2, 2, ...]`; a single string is one prompt.

Sentencepiece runs through tensorflow-text (`SentencepieceTokenizer`), imported on first use with
every GPU hidden from TensorFlow so that it never takes accelerator memory from JAX.
"""
from __future__ import annotations

import logging
import os
import pathlib
from typing import NamedTuple, Sequence

import numpy as np

from stepvideo_jax import logs

BOS, EOS, PAD = 1, 2, 2
# Pieces the official `StepChatTokenizer.__init__` requires in the model file.
REQUIRED_PIECES = ("<|BOT|>", "<|EOT|>", "<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>",
                   "<|THINK_END|>", "<|MASK_1e69f|>", "<|UNMASK_1e69f|>")
# The released tokenizer file ships once: in the shipped demo checkpoint, where every converted
# checkpoint keeps it (`step_llm/step1_chat_tokenizer.model`).
RELEASED_MODEL = (pathlib.Path(__file__).resolve().parents[1] / "assets" / "demo" / "step_llm"
                  / "step1_chat_tokenizer.model")

log = logging.getLogger(__name__)


class TokenBatch(NamedTuple):
    """`input_ids` and `attention_mask`, both int32 (b, max_length); mask 1 on BOS..EOS."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


def import_tensorflow_text():
    """(tensorflow, tensorflow_text), with GPUs hidden from TensorFlow before it initialises them
    (and its native start-up lines dropped in a quiet CLI run, `logs.native_stderr_quiet`)."""
    with logs.native_stderr_quiet():   # heavy (seconds): imported when the first tokenizer is built
        import tensorflow as tf

        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TensorFlow was initialised elsewhere first; its choice stands
            if tf.config.get_visible_devices("GPU"):
                log.warning("TensorFlow was initialised with visible GPUs before the tokenizer hid them")
        import tensorflow_text  # after the GPUs are hidden

    return tf, tensorflow_text


class StepLLMTokenizer:
    """The Step-LLM tokenizer; `model_file` defaults to the released model shipped in the package."""

    def __init__(self, model_file: str | os.PathLike = RELEASED_MODEL):
        path = pathlib.Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model {path} not found (the release ships it as "
                                    "step_llm/step1_chat_tokenizer.model)")
        self.model_file = path
        self._warned: set[str] = set()   # texts whose cut was reported: each is reported once
        tf, tft = import_tensorflow_text()
        self._tf = tf
        try:
            with logs.native_stderr_quiet():   # the op logs "precompiled_charsmap is empty" at INFO
                self._sp = tft.SentencepieceTokenizer(model=path.read_bytes(), out_type=tf.int32)
                self.vocab_size = int(self._sp.vocab_size())
        except tf.errors.OpError as e:
            raise ValueError(f"{path} is not a valid sentencepiece model: {e.message}") from None
        unk = int(self._sp.string_to_id("<unk>"))
        missing = [p for p in REQUIRED_PIECES if int(self._sp.string_to_id(p)) == unk]
        if missing:
            raise ValueError(f"{path}: pieces {missing} are missing; the official StepChatTokenizer "
                             f"requires {list(REQUIRED_PIECES)}")

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Raw sentencepiece ids of each text (no BOS/EOS, no truncation)."""
        texts = _as_prompts(texts)
        if not texts:
            return []
        return self._sp.tokenize(self._tf.constant(texts, dtype=self._tf.string)).to_list()

    def __call__(self, prompts: str | Sequence[str], max_length: int = 320) -> TokenBatch:
        """Ids and mask (b, max_length) int32 as the official wrapper returns them."""
        if not isinstance(max_length, (int, np.integer)) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 (room for BOS and EOS), got {max_length!r}")
        encoded = self.encode(prompts)
        self._warned.update(warn_truncated(prompts, [len(ids) for ids in encoded], max_length, skip=self._warned))
        rows = [[BOS] + ids[:max_length - 2] + [EOS] for ids in encoded] or [[BOS, EOS]]
        input_ids = np.full((len(rows), max_length), PAD, np.int32)
        attention_mask = np.zeros((len(rows), max_length), np.int32)
        for r, row in enumerate(rows):
            input_ids[r, :len(row)] = row
            attention_mask[r, :len(row)] = 1
        return TokenBatch(input_ids, attention_mask)


def warn_truncated(texts: str | Sequence[str], lengths: Sequence[int], max_length: int,
                   skip: set[str] | frozenset = frozenset()) -> list[str]:
    """One warning line naming every text longer than `max_length - 2` pieces (BOS and EOS take the
    other two), which the official wrapper cuts without a word; a long prompt loses its end, and
    with it the `pos_magic` suffix the pipeline appends. Texts in `skip` are not named again.
    Returns the texts named."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    cut = [(i, n) for i, n in enumerate(lengths) if n > max_length - 2 and texts[i] not in skip]
    if cut:
        which = ", ".join(f"{i} ({n:,} tokens, {texts[i][:30]!r}...)" for i, n in cut)
        log.warning(f"Step-LLM text longer than {max_length - 2} tokens, cut to the first {max_length - 2} "
                    f"(the end, including any pos_magic suffix, is ignored): text {which}")
    return [texts[i] for i, _ in cut]


def _as_prompts(texts) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {sorted(set(bad))}")
    return texts
