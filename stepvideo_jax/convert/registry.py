"""The four release components and their converters: what the converter writes and a loader reads.

`COMPONENTS` maps a release folder name (`transformer`, `vae`, `step_llm`, `hunyuan_clip`) to its
converter module, the `config_records` name of its model config and the release files a converted
component keeps besides its weights. Both directions use it: `convert.cli` (release -> Orbax) and
`stepvideo_jax.checkpoints` (any weight source -> models).
"""
from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any, Mapping

from flax import nnx

from stepvideo_jax.convert import config_records
from stepvideo_jax.convert import dit as dit_convert
from stepvideo_jax.convert import hunyuan_clip as clip_convert
from stepvideo_jax.convert import step_llm as llm_convert
from stepvideo_jax.convert import vae as vae_convert
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.dtypes import DTYPES as OUTPUT_DTYPES
from stepvideo_jax.models import quant  # the dtypes a converted checkpoint stores


@dataclasses.dataclass(frozen=True)
class Component:
    """How one release folder is converted.

    `module` exposes `read_config(dir, root)`, `tensor_source(dir, root)`, `rules(cfg)`, `IGNORE`,
    `build(cfg, *, dtype, param_dtype, rngs)` and `load(dir, *, dtype, param_dtype)` (in-memory
    conversion). `config`: the `config_records.REGISTRY` name of the component's model config.
    `files`: paths relative to the release folder (files or folders) copied to the output when
    present: what generation needs besides weights.
    """

    module: ModuleType
    config: str
    files: tuple[str, ...] = ()


COMPONENTS: Mapping[str, Component] = {
    "transformer": Component(dit_convert, "DiTConfig", ("config.json",)),
    "vae": Component(vae_convert, "VAEConfig"),
    "step_llm": Component(llm_convert, "StepLLMConfig", ("config.json", "step1_chat_tokenizer.model")),
    "hunyuan_clip": Component(clip_convert, "HunyuanClipConfig", ("clip_text_encoder/config.json", "tokenizer")),
}

QUANTISABLE = ("transformer", "step_llm")   # the components whose block linears `weights` quantises


def component_weights(component: str, weights: str) -> str:
    """The scheme `weights` (`models.quant.SCHEMES`; a ValueError naming them otherwise) means for
    `component`: itself for the DiT and the Step-LLM, "bf16" (unquantised) for the VAE and CLIP."""
    quant.check_scheme(weights)
    return weights if component in QUANTISABLE else "bf16"


CONVERTED_MARKER = "conversion.json"   # at the top of a converted checkpoint: what was converted, from where


def converter(name: str) -> ModuleType:
    """The converter module of component `name`."""
    if name not in COMPONENTS:
        raise CheckpointError(f"unknown component {name!r}; choose from {sorted(COMPONENTS)}")
    return COMPONENTS[name].module


def abstract_model(module, cfg, param_dtype, dtype=None, **build_kwargs):
    """The component's model as shapes only (`nnx.eval_shape`): parameters in `param_dtype`,
    computation in `dtype` (default `param_dtype`)."""
    dtype = param_dtype if dtype is None else dtype
    return nnx.eval_shape(lambda: module.build(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                                               **build_kwargs))


def config_from_record(record: Mapping, component: str | None = None) -> Any:
    """The model config of a component manifest's `record` (`config_records`: a closed registry,
    values type-checked); given `component`, the record must hold that component's config class."""
    expect = None if component is None else config_records.REGISTRY[COMPONENTS[component].config]
    return config_records.config_from_record(record, expect=expect)
