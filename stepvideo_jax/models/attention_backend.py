"""The one rule that picks the attention kernel: a pure function of the case, testable on CPU.

`select_backend(AttentionCase) -> Choice(backend, reason, fallback)`. `models/attention.py` asks it
whenever no backend is given (and checks an explicit "cudnn" with it), so every model's attention
(DiT self- and cross-attention, the VAE mid attention, Step-LLM's ALiBi attention, CLIP) goes through
it. `case_of(...)` builds the case from the arrays and the running device; `cudnn_call_args(...)`
is the conversion of the project's masks to the arguments `jax.nn.dot_product_attention` takes.

The rule:
- TPU: Pallas splash attention, except with an additive bias (`bias_fn`, e.g. ALiBi), which splash
  does not take: blockwise.
- GPU: cuDNN fused (flash) attention through `jax.nn.dot_product_attention(implementation="cudnn")`
  when every limit below holds, else blockwise. The limits are those of jax's own checks in
  `jax/_src/cudnn/fused_attention_stablehlo.py` (jax 0.10.2; the same in 0.11.2): `check_layout`
  (q/k/v float16 or bfloat16; fp8 is not used here) and `check_is_flash_attention` (head dim a
  multiple of 8 and <= 128, or <= 256 from compute capability 9.0; cc 10.3 needs cuDNN >= 9.11),
  plus:
  * compute capability >= 8.0: cuDNN's flash attention needs Ampere or newer;
  * head dim in (128, 256] only on Hopper (cc 9.x) with cuDNN >= 9.13: jax accepts it for any
    cc >= 9.0, but cuDNN's Hopper backward had head-dim bugs from 9.11 fixed in 9.13
    (cudnn-frontend 1.14.1 notes) and Blackwell's d = 256 backward arrived later still; so this
    rule is stricter than jax's and refuses what it has not seen run. The VAE mid attention (one
    head of width 512 at full size) is therefore always blockwise on GPU;
  * masks: none, causal, and key padding that is a prefix of valid keys (passed as
    `key_value_seq_lengths`, mask type PADDING[_CAUSAL]); an arbitrary key mask would have to be a
    full (b, 1, sq, sk) bias, and `bias_fn` a full (h, sq, sk) bias (`combine_bias_and_mask`,
    `check_layout`'s bias shape check): blockwise. Odd lengths, which jax refuses under
    differentiation, are padded by `cudnn_attention`;
  * mesh: the cuDNN custom call's partitioner refuses a sharded sequence or head-dim axis
    (`_check_qkv_bias_mask_spec`: "Sharding on sequence dim is not allowed"), so when the logical
    `length` axis of the activations is mapped to a mesh axis of size > 1 under automatic
    partitioning: blockwise. Batch/head sharding, no mesh, and per-device code inside `shard_map`
    (the sequence-parallel modes' local attention) keep cuDNN.
- CPU (and anything else): blockwise, the pure-JAX flash kernel of `models/attention.py`.

A fallback from the preferred kernel (cuDNN, splash) is logged once per distinct reason, at
WARNING on the `stepvideo_jax.models.attention_backend` logger.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp

from stepvideo_jax.parallel.rules import logical_to_spec

log = logging.getLogger(__name__)

MASKS = ("none", "causal")            # the query/key structure; key padding and bias are separate
KEY_MASKS = ("none", "prefix", "any")
MESH_MODES = ("none", "batch_heads", "length", "manual")
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MIN_CC = (8, 0)
CUDNN_HEAD_DIM = 128                  # any cc >= 8.0
CUDNN_WIDE_HEAD_DIM = 256             # Hopper with cuDNN >= CUDNN_WIDE_MIN_VERSION
CUDNN_WIDE_MIN_VERSION = 91300


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """Everything the choice depends on.

    platform: "cpu" | "gpu" | "tpu" (jax's `Device.platform`). device_kind: e.g. "NVIDIA H200".
    compute_capability: (major, minor) of a CUDA device, None elsewhere. cudnn_version: e.g. 91300
    (major*10000 + minor*100 + patch), None if unknown. dtype: of q/k/v. head_dim; q_len, kv_len.
    causal: query i sees keys j <= i. key_mask: "none", "prefix" (valid keys are a prefix of each
    row: lengths) or "any". bias: an additive bias (`bias_fn`, e.g. ALiBi). mesh: see MESH_MODES.
    """

    platform: str
    dtype: str
    head_dim: int
    q_len: int
    kv_len: int
    causal: bool = False
    key_mask: str = "none"
    bias: bool = False
    mesh: str = "none"
    device_kind: str = ""
    compute_capability: Optional[tuple[int, int]] = None
    cudnn_version: Optional[int] = None

    def __post_init__(self):
        if self.key_mask not in KEY_MASKS:
            raise ValueError(f"key_mask {self.key_mask!r}: choose one of {KEY_MASKS}")
        if self.mesh not in MESH_MODES:
            raise ValueError(f"mesh {self.mesh!r}: choose one of {MESH_MODES}")


@dataclasses.dataclass(frozen=True)
class Choice:
    """backend: one of `models.attention_kernels.BACKENDS`; reason: why, in words; fallback: True when the
    platform's preferred kernel (cuDNN, splash) was refused for this case."""

    backend: str
    reason: str
    fallback: bool = False


def cudnn_refusal(case: AttentionCase) -> Optional[str]:
    """Why cuDNN fused attention cannot run `case` (see the module docstring), or None if it can."""
    if case.platform != "gpu":
        return f"platform {case.platform!r} is not a CUDA GPU"
    if case.dtype not in CUDNN_DTYPES:
        return f"dtype {case.dtype}: cuDNN fused attention takes {' / '.join(CUDNN_DTYPES)} only"
    cc = case.compute_capability
    if cc is None:
        return "no CUDA compute capability known for this device"
    if tuple(cc) < CUDNN_MIN_CC:
        return f"compute capability {cc[0]}.{cc[1]}: cuDNN flash attention needs 8.0 (Ampere) or newer"
    if tuple(cc) == (10, 3) and (case.cudnn_version or 0) < 91100:
        return f"compute capability 10.3 needs cuDNN >= 9.11, have {case.cudnn_version}"
    d = case.head_dim
    if d % 8:
        return f"head dim {d} is not a multiple of 8"
    if d > CUDNN_HEAD_DIM:
        wide_ok = cc[0] == 9 and (case.cudnn_version or 0) >= CUDNN_WIDE_MIN_VERSION
        if d > CUDNN_WIDE_HEAD_DIM or not wide_ok:
            return (f"head dim {d} > {CUDNN_HEAD_DIM}: allowed up to {CUDNN_WIDE_HEAD_DIM} only on Hopper "
                    f"(cc 9.x) with cuDNN >= {CUDNN_WIDE_MIN_VERSION}; have cc {cc[0]}.{cc[1]}, "
                    f"cuDNN {case.cudnn_version}")
    if case.bias:
        return "an additive bias (bias_fn) would need a materialised (h, sq, sk) bias"
    if case.key_mask == "any":
        return "a key mask that is not a prefix of valid keys would need a materialised (b, 1, sq, sk) bias"
    if case.mesh == "length":
        return "the sequence axis is sharded over the mesh, which cuDNN's partitioner refuses"
    if case.q_len < 1 or case.kv_len < 1:
        return f"empty sequence (q {case.q_len}, kv {case.kv_len})"
    return None


def select_backend(case: AttentionCase) -> Choice:
    """The kernel for `case`; never one that cannot run it (module docstring)."""
    if case.platform == "tpu":
        if case.bias:
            return Choice("blockwise", "TPU: splash takes no additive bias (bias_fn); blockwise evaluates "
                          "it per block", fallback=True)
        return Choice("splash", "TPU: Pallas splash attention")
    if case.platform == "gpu":
        refusal = cudnn_refusal(case)
        if refusal is None:
            return Choice("cudnn", f"GPU {case.device_kind or ''}: cuDNN fused attention".replace("  ", " "))
        return Choice("blockwise", f"GPU: cuDNN refused ({refusal}); blockwise instead", fallback=True)
    return Choice("blockwise", f"platform {case.platform}: the pure-JAX blockwise kernel")


# ------------------------------------------------------------------------------------------------
# facts about the running program (not pure: read once per device)


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    platform: str
    device_kind: str
    compute_capability: Optional[tuple[int, int]]
    cudnn_version: Optional[int]


def _current_device():
    default = getattr(jax.config, "jax_default_device", None)
    if isinstance(default, jax.Device):
        return default
    if isinstance(default, str):
        return jax.devices(default)[0]
    return jax.devices()[0]


@functools.lru_cache(maxsize=None)
def device_facts(device: Optional[jax.Device] = None) -> DeviceFacts:
    """Platform, kind, compute capability and cuDNN version of `device` (default: the device jax
    places new arrays on)."""
    device = device or _current_device()
    cc = getattr(device, "compute_capability", None)
    if isinstance(cc, str):
        try:
            cc = tuple(int(x) for x in cc.split(".")[:2])
        except ValueError:
            cc = None
    cudnn = None
    if device.platform == "gpu":
        try:
            from jax._src.lib import cuda_versions  # private; absent or None without CUDA

            cudnn = int(cuda_versions.cudnn_get_version()) if cuda_versions is not None else None
        except Exception:  # noqa: BLE001  (any failure means "unknown", which the rule treats strictly)
            cudnn = None
    return DeviceFacts(device.platform, getattr(device, "device_kind", ""), cc, cudnn)


def mesh_mode(rules=None) -> str:
    """How the ambient mesh splits an attention call: "none" (no mesh, or all axes of size 1),
    "manual" (inside `shard_map` over every axis of size > 1: the code sees one device's shard),
    "length" (the logical `length` axis maps to mesh axes of size > 1 under automatic
    partitioning), else "batch_heads"."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return "none"
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    auto = {name for name, t in zip(mesh.axis_names, mesh.axis_types)
            if t != jax.sharding.AxisType.Manual and sizes[name] > 1}
    if not auto:
        return "manual" if any(n > 1 for n in sizes.values()) else "none"

    kw = {} if rules is None else {"rules": rules}
    length = logical_to_spec((None, "length", None, None), mesh, **kw)[1]
    names = () if length is None else (length,) if isinstance(length, str) else tuple(length)
    return "length" if any(n in auto for n in names) else "batch_heads"


def case_of(q, k, *, causal: bool = False, key_mask=None, key_mask_is_prefix: bool = False,
            bias_fn=None, facts: Optional[DeviceFacts] = None, mesh: Optional[str] = None) -> AttentionCase:
    """The `AttentionCase` of one `attention` call: q (b, sq, h, d), k (b, sk, hkv, d)."""
    facts = facts or device_facts()
    key = "none" if key_mask is None else "prefix" if key_mask_is_prefix else "any"
    return AttentionCase(platform=facts.platform, dtype=jnp.dtype(q.dtype).name, head_dim=q.shape[-1],
                         q_len=q.shape[1], kv_len=k.shape[1], causal=causal, key_mask=key,
                         bias=bias_fn is not None, mesh=mesh_mode() if mesh is None else mesh,
                         device_kind=facts.device_kind, compute_capability=facts.compute_capability,
                         cudnn_version=facts.cudnn_version)


_logged: set = set()


def log_choice(choice: Choice) -> None:
    """Logs a fallback once per distinct reason (tracing repeats the same call many times)."""
    if choice.fallback and choice.reason not in _logged:
        _logged.add(choice.reason)
        log.warning("attention backend: %s", choice.reason)


def choose(q, k, **kw) -> Choice:
    """`select_backend(case_of(q, k, **kw))`, logged once if it is a fallback."""
    choice = select_backend(case_of(q, k, **kw))
    log_choice(choice)
    return choice


def cudnn_call_args(key_mask, causal: bool, scale: float) -> dict:
    """The project's mask form -> keyword arguments of `jax.nn.dot_product_attention`.

    key_mask (b, sk) bool whose True entries are a prefix of each row (the rule admits no other)
    becomes `key_value_seq_lengths` (b,) int32 = the count of valid keys; `causal` becomes
    `is_causal` (top-left aligned: query i sees keys j <= i, as `attention`'s causal).
    """
    lengths = None if key_mask is None else jnp.sum(key_mask.astype(jnp.int32), axis=-1)
    return dict(scale=scale, is_causal=causal, key_value_seq_lengths=lengths)


def cudnn_attention(q, k, v, *, key_mask=None, causal: bool = False, scale: float,
                    implementation: str = "cudnn"):
    """`jax.nn.dot_product_attention` as cuDNN takes it: q (b, sq, h, d), k/v (b, sk, hkv, d).

    Odd lengths are padded by one row: under differentiation jax's `check_is_flash_attention`
    refuses odd q or kv lengths whenever a bias operand is present, and its training rule always
    passes one (an empty placeholder when there is none), so e.g. the DiT's 397 text keys failed
    the backward on an H200. Padded keys are masked by `key_value_seq_lengths`, padded queries are
    sliced off. `implementation="xla"` runs the same conversion through jax's reference code (tests).
    """
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    pad_q, pad_k = sq % 2, sk % 2
    if pad_k and key_mask is None:
        key_mask = jnp.ones((b, sk), bool)
    if pad_q:
        q = jnp.pad(q, ((0, 0), (0, 1), (0, 0), (0, 0)))
    if pad_k:
        k, v = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (k, v))
        key_mask = jnp.pad(key_mask, ((0, 0), (0, 1)))
    out = jax.nn.dot_product_attention(q, k, v, **cudnn_call_args(key_mask, causal, scale),
                                       implementation=implementation)
    return out[:, :sq]
