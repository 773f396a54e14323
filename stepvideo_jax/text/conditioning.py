"""Both text encoders -> the DiT's text inputs, as the official caption server builds them.

`api/call_remote_server.py` (`CaptionPipeline.embedding`), for the prompts it is sent:
- Step-LLM: tokenizer at max_length 320 -> `y` (n, 320, d_llm), every position (padding included),
  and its mask (n, 320);
- Hunyuan-CLIP: WordPiece at max_length 77 -> `clip` = `last_hidden_state` (n, 77, d_clip), every
  position; its mask is used inside CLIP only;
- `y_mask` = 77 ones (all CLIP positions, CLIP padding included) followed by the Step-LLM mask:
  (n, 77 + 320), int32 here (int64 in the official code). The DiT attends to text keys
  `[0, sum(y_mask))` of each row, ordered `[clip | llm]`.

The official bf16 mask-sum quirk: the DiT casts `y_mask` to its dtype (bfloat16) before summing it,
so a row with 77 + valid > 256 keys gets a bfloat16-rounded key count (round to nearest even step
of 2 between 256 and 512: 277 -> 276, 279 -> 280, 397 -> 396): the EOS of the prompt may be dropped
or one PAD output attended in addition. Rows with valid <= 179 Step-LLM tokens are exact. Default
here: off (`y_mask` is the exact mask). With `bf16_mask_sum=True` the returned `y_mask` is the prefix
of ones whose exact sum is that rounded count, so a DiT summing exactly reproduces the official keys
(and a DiT that reproduces the quirk itself, `DiTConfig.mask_sum_in_compute_dtype`, gets the same
count again: the rounding is idempotent).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

LLM_LENGTH = 320
CLIP_LENGTH = 77


def dit_text_mask(llm_mask: np.ndarray, clip_length: int = CLIP_LENGTH, *,
                  bf16_mask_sum: bool = False) -> np.ndarray:
    """(n, l_llm) 0/1 prefix mask -> `y_mask` (n, clip_length + l_llm) int32 (see module docstring)."""
    llm_mask = np.asarray(llm_mask)
    if llm_mask.ndim != 2:
        raise ValueError(f"llm_mask {llm_mask.shape} should be (batch, length)")
    y_mask = np.concatenate([np.ones((llm_mask.shape[0], clip_length), np.int32),
                             llm_mask.astype(np.int32)], axis=1)
    if not bf16_mask_sum:
        return y_mask
    lengths = y_mask.sum(1).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.int64)  # RNE
    lengths = np.minimum(lengths, y_mask.shape[1])
    return (np.arange(y_mask.shape[1])[None, :] < lengths[:, None]).astype(np.int32)


class TextConditioner:
    """prompts (n,) -> {"y": (n, 320, d_llm), "y_mask": (n, 77 + 320) int32, "clip": (n, 77, d_clip)}.

    Holds both encoders and tokenizers; the two forwards run in one jitted function (compiled once
    per batch size). `y` comes out in the Step-LLM compute dtype, `clip` in the CLIP compute dtype
    (the official deployment: bfloat16 and float32). Satisfies `sampling.pipeline.TextEncoder`.
    """

    def __init__(self, *, step_llm: nnx.Module, llm_tokenizer, clip: nnx.Module, clip_tokenizer,
                 llm_length: int = LLM_LENGTH, clip_length: int = CLIP_LENGTH, bf16_mask_sum: bool = False,
                 attention_backend: Optional[str] = None):
        self.llm_tokenizer, self.clip_tokenizer = llm_tokenizer, clip_tokenizer
        self.llm_length, self.clip_length = llm_length, clip_length
        self.bf16_mask_sum = bf16_mask_sum
        llm_graph, self.llm_state = nnx.split(step_llm)
        clip_graph, self.clip_state = nnx.split(clip)

        @jax.jit
        def encode(llm_state, clip_state, llm_ids, clip_ids, clip_mask):
            y = nnx.merge(llm_graph, llm_state)(llm_ids, backend=attention_backend)
            return y, nnx.merge(clip_graph, clip_state)(clip_ids, clip_mask)

        self._encode = encode

    def tokenize(self, prompts: str | Sequence[str]):
        """(Step-LLM batch, CLIP batch) of `TokenBatch`es for the prompts."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given: the text encoders need at least one (possibly empty) string")
        return self.llm_tokenizer(prompts, max_length=self.llm_length), self.clip_tokenizer(
            prompts, max_length=self.clip_length)

    def __call__(self, prompts: str | Sequence[str]) -> Mapping[str, jax.Array]:
        llm, clip = self.tokenize(prompts)
        y, clip_states = self._encode(self.llm_state, self.clip_state, llm.input_ids, clip.input_ids,
                                      clip.attention_mask)
        y_mask = dit_text_mask(llm.attention_mask, self.clip_length, bf16_mask_sum=self.bf16_mask_sum)
        return {"y": y, "y_mask": jnp.asarray(y_mask), "clip": clip_states}
