"""The fields of every Video-DPO config: the training family's (`configs/train/common.py`) plus the
`dpo` block, with their defaults. DPO compares two videos of one prompt (no conditioning dropout)
and has no flow-matching held-out loss (`eval_every` stays 0).
"""
import ml_collections

from stepvideo_jax import config_files

train_common = config_files.module("train/common.py")


def base() -> ml_collections.ConfigDict:
    c = train_common.base()
    c.objective = "dpo"               # python -m stepvideo_jax.train_dpo (not ...train)
    c.step.cond_dropout = 0.0
    c.dpo = ml_collections.ConfigDict(dict(
        beta=500.0,                   # Diffusion-DPO used 5000; the paper lowered it
        beta_schedule="constant",     # or "t_squared"
        sft_weight=0.0,               # flow-matching term on the preferred sample
        policy_from="",               # "" seed init | training workdir[:ema] | release (transformer/) | converted root
        reference_from="",            # "" = the initial policy
        reference_dtype="bfloat16",   # the frozen reference's storage dtype
        lora_rank=0,                  # > 0: LoRA on the attention projections instead of full fine-tuning
        lora_alpha=16.0,
        lora_targets=("attn1.q", "attn1.k", "attn1.v", "attn1.o", "attn2.q", "attn2.k", "attn2.v", "attn2.o")))
    return c
