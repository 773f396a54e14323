"""Every weight source, detected in one place and loaded into a mesh.

A weight source is a path of one of these kinds (`source_kind`):
- "converted": a `python -m stepvideo_jax.convert` output: `conversion.json` at the top and one
  Orbax component directory per converted model (`<component>/manifest.json`, the model config
  record, parameter groups, the tokenizer files); restored straight into a mesh's shardings.
- "release": an official release directory (`stepfun-ai/stepvideo-t2v` as published):
  `transformer/` (config.json + sharded safetensors + index), `vae/vae_v2.safetensors`, `step_llm/`
  (config.json, shards + index, step1_chat_tokenizer.model), `hunyuan_clip/` (`clip_text_encoder/`
  config.json + weights, `tokenizer/vocab.txt`); each component converted in host memory by its
  converter (`convert.registry`), on one device.
- "transformer": one release component directory, `transformer/` (config.json + shards): a DiT.
- "workdir": a training run directory (`checkpoints/<step>/`, `dit_config.json`): its DiT, raw or
  EMA weights (`<workdir>:ema`). A LoRA run (`lora.json` beside them: rank, alpha, targets and the
  base's source) checkpoints only its adapters: its DiT is the base with the adapters folded in.

The tokenizer files sit at the same relative paths in a release and in a converted checkpoint
(`step_llm/step1_chat_tokenizer.model`, `hunyuan_clip/tokenizer/`), so the text encoders of both
load the same way.

`loader(path)` gives the four models of a text-to-video run one at a time (`CheckpointLoader`),
`load_component` one component, `dit_config` / `load_dit` the DiT of any source (training's
`model.init_from`, DPO policy and reference, the exporter).
"""
from __future__ import annotations

import abc
import dataclasses
import json
import os
import pathlib
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from stepvideo_jax import hub, paths
from stepvideo_jax.convert import config_records, orbax_io
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.release_restore import load_release_component
from stepvideo_jax.convert.registry import (COMPONENTS, CONVERTED_MARKER, QUANTISABLE, abstract_model,
                                            component_weights, config_from_record, converter)
from stepvideo_jax.dtypes import dtype_of
from stepvideo_jax.models import lora, quant, stack
from stepvideo_jax.models import offload as offload_mod
from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
from stepvideo_jax.models.vae import VAEConfig
from stepvideo_jax.text.conditioning import TextConditioner
from stepvideo_jax.text.sentencepiece_tokenizer import StepLLMTokenizer
from stepvideo_jax.text.wordpiece_tokenizer import WordPieceTokenizer

LLM_TOKENIZER = "step_llm/step1_chat_tokenizer.model"
CLIP_TOKENIZER = "hunyuan_clip/tokenizer"
WORKDIR_DIT_CONFIG = "dit_config.json"   # written by `training.loop.train`
WORKDIR_CHECKPOINTS = "checkpoints"
LORA_RECORD = "lora.json"   # a LoRA run's record (`lora_record`), written by `training.dpo`
EMA_SUFFIX = ":ema"

# component -> files (relative to the checkpoint directory) that must all exist; alternatives as tuples
CONVERTED_FILES: Mapping[str, tuple] = {
    "transformer": ("transformer/manifest.json",),
    "vae": ("vae/manifest.json",),
    "step_llm": ("step_llm/manifest.json", LLM_TOKENIZER),
    "hunyuan_clip": ("hunyuan_clip/manifest.json", f"{CLIP_TOKENIZER}/vocab.txt"),
}
RELEASE_FILES: Mapping[str, tuple] = {
    "transformer": ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json"),
    "vae": ("vae/vae_v2.safetensors",),
    "step_llm": ("step_llm/config.json",
                 ("step_llm/model.safetensors.index.json", "step_llm/model.safetensors"),
                 LLM_TOKENIZER),
    "hunyuan_clip": ("hunyuan_clip/clip_text_encoder/config.json",
                     ("hunyuan_clip/clip_text_encoder/pytorch_model.bin",
                      "hunyuan_clip/clip_text_encoder/model.safetensors"),
                     f"{CLIP_TOKENIZER}/vocab.txt"),
}
SOURCE_KINDS = {
    "converted": f"a converted checkpoint ({CONVERTED_MARKER}; python -m stepvideo_jax.convert)",
    "release": "a release directory (transformer/, vae/, step_llm/, hunyuan_clip/)",
    "transformer": "a release transformer/ directory (config.json + safetensors)",
    "workdir": f"a training workdir ({WORKDIR_CHECKPOINTS}/, {WORKDIR_DIT_CONFIG}) [{EMA_SUFFIX}]",
}


def short_reason(error: BaseException, limit: int = 300) -> str:
    """The first line of an error, without tensorstore's spec dump, at most `limit` characters:
    Orbax/tensorstore messages run to thousands of characters."""
    text = (str(error).strip().splitlines() or [""])[0]
    text = text.split(" [tensorstore_spec=")[0].split("See full TensorStore details")[0].strip()
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# detection


def is_converted(path) -> bool:
    """True for a converter output (its `conversion.json` marker), whatever components it holds."""
    return (paths.as_path(path) / CONVERTED_MARKER).is_file()   # a gs:// URI stays one


def source_kind(path) -> str:
    """Which of `SOURCE_KINDS` `path` is; a ValueError naming the kinds otherwise."""
    path = paths.as_path(path)
    if is_converted(path):
        return "converted"
    if (path / WORKDIR_CHECKPOINTS).is_dir():
        return "workdir"
    if (path / "transformer").is_dir():
        return "release"
    if (path / "config.json").is_file():
        return "transformer"
    raise ValueError(f"weight source {str(path)!r} is none of: {'; '.join(SOURCE_KINDS.values())}")


def check_checkpoint_dir(path) -> pathlib.Path:
    """A converted checkpoint or release directory holding all four components: raise a ValueError
    listing every missing component file, before anything is loaded."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint_dir {path} is not a directory (expected a Step-Video-T2V release "
                         f"or a converted checkpoint with {', '.join(c + '/' for c in RELEASE_FILES)})")
    layout = CONVERTED_FILES if is_converted(path) else RELEASE_FILES
    missing = []
    for component, files in layout.items():
        for entry in files:
            options = entry if isinstance(entry, tuple) else (entry,)
            if not any((path / f).is_file() for f in options):
                missing.append(f"{component}: {' or '.join(options)}")
    if missing:
        kind = "converted checkpoint" if layout is CONVERTED_FILES else "release directory"
        raise ValueError(f"checkpoint_dir {path} ({kind}) is missing component files: " + "; ".join(missing))
    return path


# ---------------------------------------------------------------------------------------------
# one component of a converted checkpoint or a release directory


def component_config(root, component: str):
    """The model config of `<root>/<component>`: the manifest's record (converted) or the
    release's config files."""
    root = paths.as_path(root)
    if is_converted(root):
        return config_from_record(orbax_io.read_manifest(root / component)["config"], component)
    return converter(component).read_config(root / component)


def load_converted(root: str | os.PathLike, component: str, *, dtype=None, param_dtype=None, mesh=None,
                   shardings=None, weights: str | None = None, offload: bool = False,
                   **build_kwargs) -> nnx.Module:
    """The model of `<root>/<component>` (a converter output) restored into its shardings.

    Parameters take `param_dtype` (default: the stored dtype), computation `dtype` (default:
    `param_dtype`); `mesh` / `shardings` as in `orbax_io.restore`; `build_kwargs` go to the
    component's `build` (e.g. `attention_backend`). `weights`: the block linears' scheme
    (`models.quant`; default: the stored one); a float checkpoint is quantised on load, a
    quantised one restores only with its own scheme. `offload`: the stacked layers restore into host
    memory (`models.offload`; the DiT and the Step-LLM only); quantised on load, they are quantised
    on the device and then moved (for one small chip, convert with `--quantize` first).
    """
    if weights is not None:
        quant.check_scheme(weights)
    folder = paths.as_path(root) / component
    manifest = orbax_io.read_manifest(folder)
    stored = orbax_io.stored_scheme(manifest)
    weights = component_weights(component, stored if weights is None else weights)
    if stored != "bf16" and weights != stored:
        raise ValueError(f"{folder} stores {stored} weights; load it with weights={stored} (got weights={weights})")
    param_dtype = dtype_of(manifest["dtype"], what=f"{folder}: stored dtype") if param_dtype is None else param_dtype
    model = abstract_model(converter(component), config_from_record(manifest["config"], component), param_dtype,
                           dtype, **build_kwargs)
    quant.quantize(model, weights)
    if offload and weights != stored:   # quantised on load where the float layers lie (the device), then moved
        return offload_mod.offload(orbax_io.restore(folder, model, shardings=shardings, mesh=mesh))
    if offload:
        shardings = offload_mod.placement(model, mesh)
    model = orbax_io.restore(folder, model, shardings=shardings, mesh=mesh)
    return offload_mod.mark(model) if offload else model


def load_component(root, component: str, *, dtype=jnp.float32, param_dtype=None, mesh=None,
                   weights: str | None = None, offload: bool = False) -> nnx.Module:
    """`<root>/<component>` with parameters in `param_dtype` (default `dtype`) and computation in
    `dtype`, in `mesh`'s rule shardings when given: restored from Orbax (converted), or converted
    from the release's tensors, in host memory (no mesh) or one tensor at a time straight into the
    shardings (`convert.release_restore`). `weights`: the block linears' scheme (`models.quant`;
    None: a converted checkpoint's stored scheme, float for a release), quantised on load one
    tensor at a time (a release always goes through `convert.release_restore` then).
    `offload`: the stacked layers in host memory (`models.offload`; DiT and Step-LLM), restored
    there directly (quantised on load: quantised on the device one tensor at a time, then moved)."""
    root = pathlib.Path(root)
    param_dtype = dtype if param_dtype is None else param_dtype
    if is_converted(root):
        return load_converted(root, component, dtype=dtype, param_dtype=param_dtype, mesh=mesh, weights=weights,
                              offload=offload)
    weights = component_weights(component, "bf16" if weights is None else weights)
    if offload and weights == "bf16":
        abstract = abstract_model(converter(component), converter(component).read_config(root / component),
                                  param_dtype, dtype)
        return offload_mod.mark(load_release_component(root / component, component, param_dtype=param_dtype,
                                                       dtype=dtype, shardings=offload_mod.placement(abstract, mesh)))
    if offload:
        return offload_mod.offload(load_release_component(root / component, component, param_dtype=param_dtype,
                                                          dtype=dtype, mesh=mesh, weights=weights))
    if mesh is not None or weights != "bf16":
        return load_release_component(root / component, component, param_dtype=param_dtype, dtype=dtype, mesh=mesh,
                                      weights=weights)
    return converter(component).load(root / component, dtype=dtype, param_dtype=param_dtype)


def text_encoder(root, *, llm_dtype=jnp.bfloat16, clip_dtype=jnp.float32, mesh=None,
                 llm_tokenizer: Optional[StepLLMTokenizer] = None, weights: str | None = None,
                 offload: bool = False, **kwargs) -> TextConditioner:
    """Step-LLM + Hunyuan-CLIP of a release or converted checkpoint with the tokenizer files found
    there (dtypes default to the official deployment's; `weights`: the Step-LLM's scheme, see
    `load_component`); `kwargs` go to `TextConditioner`."""
    root = pathlib.Path(root)
    return TextConditioner(
        step_llm=load_component(root, "step_llm", dtype=llm_dtype, mesh=mesh, weights=weights, offload=offload),
        llm_tokenizer=llm_tokenizer or StepLLMTokenizer(root / LLM_TOKENIZER),
        clip=load_component(root, "hunyuan_clip", dtype=clip_dtype, mesh=mesh),
        clip_tokenizer=WordPieceTokenizer.from_dir(root / CLIP_TOKENIZER), **kwargs)


def load_vae(source, *, dtype=jnp.float32, mesh=None) -> nnx.Module:
    """The Video-VAE of a converted checkpoint, a release directory or a release `vae/` directory."""
    path = pathlib.Path(source)
    if is_converted(path) or (path / "vae").is_dir():
        return load_component(path, "vae", dtype=dtype, mesh=mesh)
    return converter("vae").load(path, dtype=dtype)


def check_fit(dit_cfg, llm_width: int | None, clip_width: int | None, z_channels: int | None) -> None:
    """The DiT must read the text encoders' widths and write the VAE's latent channels (None: skip)."""
    problems = []
    for name, want, got in (("Step-LLM hidden_size", dit_cfg.caption_channels[0], llm_width),
                            ("CLIP hidden_size", dit_cfg.caption_channels[1], clip_width)):
        if got is not None and got != want:
            problems.append(f"DiT caption_channels expects {name} {want}, got {got}")
    if z_channels is not None and not dit_cfg.in_channels == dit_cfg.out_channels == z_channels:
        problems.append(f"DiT in/out channels ({dit_cfg.in_channels}, {dit_cfg.out_channels}) != "
                        f"VAE z_channels {z_channels}")
    if problems:
        raise ValueError("the components do not fit together: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# the four models of a run, one at a time


@dataclasses.dataclass
class Models:
    """`text` maps prompts to DiT text inputs (`text.conditioning.TextConditioner`); `dit` and `vae`
    are the NNX modules."""

    text: Callable
    dit: nnx.Module
    vae: nnx.Module


class Loader(abc.ABC):
    """Builds each component on demand and keeps no reference to what it built, so a caller that
    drops a component (e.g. the text encoders once every prompt is encoded) frees its memory.

    The configs are read and checked against each other when the loader is made, before any weight
    is loaded. `mesh`: the mesh the parameters are placed on (None: one device).
    """

    mesh = None
    dit_cfg: DiTConfig   # the DiT's config, read when the loader is made (no weights)
    vae_cfg: VAEConfig   # the VAE's, likewise

    @abc.abstractmethod
    def text_encoder(self):
        """Step-LLM + Hunyuan-CLIP with their tokenizers (`text.conditioning.TextConditioner`)."""

    @abc.abstractmethod
    def dit(self) -> nnx.Module:
        """The `StepVideoDiT`."""

    @abc.abstractmethod
    def vae(self) -> nnx.Module:
        """The `VideoVAE`."""

    def llm_tokenizer(self):
        """The Step-LLM tokenizer the text encoder will use (no weights loaded), so that prompts can
        be tokenized before any model loads; None where the loader cannot give it alone."""
        return None

    def models(self) -> Models:
        """All four at once."""
        return Models(text=self.text_encoder(), dit=self.dit(), vae=self.vae())


class CheckpointLoader(Loader):
    """The components of a converted checkpoint or of a release directory (`load_component`), in
    `mesh`'s rule shardings if given. Defaults: the official dtypes. `weights`: the DiT's and
    Step-LLM's block-linear scheme (`models.quant.SCHEMES`; None: as stored), checked with the
    stored schemes here, before any weight loads. `dit_from`: another DiT source (any of
    `SOURCE_KINDS`, e.g. a distilled student shipped as a converted checkpoint of its transformer
    alone) replaces the checkpoint's own DiT (loaded as stored: `weights` applies to the checkpoint's).
    `offload`: "blocks" puts the DiT's and Step-LLM's stacked layers in host memory
    (`models.offload`), checked against the mesh here."""

    def __init__(self, path, *, mesh=None, dit_dtype=jnp.bfloat16, vae_dtype=jnp.bfloat16,
                 llm_dtype=jnp.bfloat16, clip_dtype=jnp.float32, attention_backend: str | None = None,
                 bf16_mask_sum: bool = False, weights: str | None = None, dit_from: str = "",
                 offload: str = "none"):
        self.weights = None if weights is None else component_weights("transformer", weights)
        self.offload = offload_mod.check_offload(offload)
        if self.offload:
            offload_mod.check_mesh(mesh)
        self.path = check_checkpoint_dir(path)
        self.mesh, self.attention_backend, self.bf16_mask_sum = mesh, attention_backend, bf16_mask_sum
        self.dit_from = dit_source(dit_from) if dit_from else None
        self._llm_tokenizer = None
        self.dtypes = {"transformer": dit_dtype, "vae": vae_dtype, "step_llm": llm_dtype, "hunyuan_clip": clip_dtype}
        cfgs = {c: component_config(self.path, c) for c in COMPONENTS if c != "transformer" or not dit_from}
        if self.dit_from is not None:
            cfgs["transformer"] = dit_config(self.dit_from)
        self.dit_cfg, self.vae_cfg = cfgs["transformer"], cfgs["vae"]
        check_fit(cfgs["transformer"], cfgs["step_llm"].hidden_size, cfgs["hunyuan_clip"].hidden_size,
                  cfgs["vae"].z_channels)
        if is_converted(self.path) and self.weights is not None:
            for c in QUANTISABLE:
                stored = orbax_io.stored_scheme(orbax_io.read_manifest(self.path / c))
                if stored != "bf16" and stored != self.weights:
                    raise ValueError(f"{self.path / c} stores {stored} weights; load it with weights={stored} "
                                     f"(got weights={self.weights})")

    def llm_tokenizer(self) -> StepLLMTokenizer:
        if self._llm_tokenizer is None:
            self._llm_tokenizer = StepLLMTokenizer(self.path / LLM_TOKENIZER)
        return self._llm_tokenizer

    def text_encoder(self) -> TextConditioner:
        return text_encoder(self.path, llm_dtype=self.dtypes["step_llm"], clip_dtype=self.dtypes["hunyuan_clip"],
                            mesh=self.mesh, llm_tokenizer=self.llm_tokenizer(), weights=self.weights,
                            offload=self.offload, attention_backend=self.attention_backend, bf16_mask_sum=self.bf16_mask_sum)

    def dit(self) -> nnx.Module:
        if self.dit_from is not None:
            dtype = self.dtypes["transformer"]
            dit = load_dit(self.dit_from, dtype=dtype, param_dtype=dtype, mesh=self.mesh)
            return offload_mod.offload(dit) if self.offload else dit
        return load_component(self.path, "transformer", dtype=self.dtypes["transformer"], mesh=self.mesh,
                              weights=self.weights, offload=self.offload)

    def vae(self) -> nnx.Module:
        return load_component(self.path, "vae", dtype=self.dtypes["vae"], mesh=self.mesh)


def loader(path, *, mesh=None, **kw) -> CheckpointLoader:
    """The components of the converted checkpoint or release directory `path` (see
    `CheckpointLoader`), each loaded when asked for."""
    return CheckpointLoader(path, mesh=mesh, **kw)


# ---------------------------------------------------------------------------------------------
# the DiT of any source


@dataclasses.dataclass(frozen=True)
class DiTSource:
    """A parsed DiT weight source: `kind` (a key of `SOURCE_KINDS`), `path`, `ema` (workdir only)."""

    kind: str
    path: pathlib.Path
    ema: bool = False


def dit_source(source: str | os.PathLike) -> DiTSource:
    """Parse `<path>` or `<workdir>:ema` (a Hugging Face repo id: its `transformer/`, downloaded into
    the hub cache) and detect its kind."""
    text = os.fspath(source)
    ema = text.endswith(EMA_SUFFIX)
    path = paths.as_path(hub.dit_source(text[:-len(EMA_SUFFIX)] if ema else text))
    kind = source_kind(path)
    if ema and kind != "workdir":
        raise ValueError(f"{text!r}: only a training workdir takes the suffix {EMA_SUFFIX!r} ({path} is "
                         f"{SOURCE_KINDS[kind]})")
    return DiTSource(kind, path, ema)


def dit_config(source) -> DiTConfig:
    """The DiTConfig of a DiT source (any of `SOURCE_KINDS`), read without loading weights."""
    src = source if isinstance(source, DiTSource) else dit_source(source)
    if src.kind == "workdir":
        return config_records.config_from_values(DiTConfig, json.loads((src.path / WORKDIR_DIT_CONFIG).read_text()))
    if src.kind == "transformer":
        return converter("transformer").read_config(src.path)
    return component_config(src.path, "transformer")


def load_dit(source, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None, step: Optional[int] = None,
             ema: bool = False) -> StepVideoDiT:
    """The DiT of `source` (any of `SOURCE_KINDS`; a run's EMA weights with `<workdir>:ema` or
    `ema=True`, `step`: a run's checkpoint, default its latest). A converted checkpoint or a
    release `transformer/` is restored straight into `mesh`'s rule shardings; a training workdir
    loads on the default device (`mesh` is ignored: place it yourself). A workdir checkpoint of the
    layout before the blocks were stacked (`blocks/<i>/...`) is stacked at load."""
    src = source if isinstance(source, DiTSource) else dit_source(source)
    if ema and src.kind != "workdir":
        raise ValueError(f"{src.path}: EMA weights come from a training workdir only ({SOURCE_KINDS['workdir']})")
    if src.kind == "workdir":
        return _load_run_dit(src.path, step=step, ema=src.ema or ema, dtype=dtype, param_dtype=param_dtype)
    if src.kind == "converted":
        return load_converted(src.path, "transformer", dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    folder = src.path / "transformer" if src.kind == "release" else src.path
    if mesh is not None:
        return load_release_component(folder, "transformer", param_dtype=param_dtype, dtype=dtype, mesh=mesh)
    return converter("transformer").load(folder, dtype=dtype, param_dtype=param_dtype)


def _load_run_dit(workdir: pathlib.Path, *, step: Optional[int], ema: bool, dtype, param_dtype) -> StepVideoDiT:
    """The DiT of a training checkpoint (`training.checkpoint.Checkpointer` layout: the `state`
    item holds `params` and, with EMA, `ema`), unsharded; a LoRA run's through `_with_adapters`."""
    workdir = paths.absolute(workdir)   # Orbax needs absolute paths; a gs:// URI stays one
    cfg = dit_config(DiTSource("workdir", workdir))
    mngr = ocp.CheckpointManager(workdir / WORKDIR_CHECKPOINTS)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {workdir / WORKDIR_CHECKPOINTS}")
        try:
            raw = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
        except Exception as e:  # noqa: BLE001  (corrupt files: tensorstore, msgpack, OS errors alike)
            raise CheckpointError(f"checkpoint step {step} in {workdir / WORKDIR_CHECKPOINTS} does not restore "
                                  f"({short_reason(e)}); `python -m stepvideo_jax.verify --checkpoint {workdir}` "
                                  "lists the steps that do") from e
    finally:
        mngr.close()
    which = "ema" if ema else "params"
    if raw.get(which) is None:
        raise ValueError(f"checkpoint {step} holds no {which!r} weights (train with step.ema_decay > 0 for EMA)")
    if (workdir / LORA_RECORD).is_file():
        record = json.loads((workdir / LORA_RECORD).read_text())
        return _with_adapters(cfg, record, _strip_value_level(raw[which], jnp.float32), dtype=dtype,
                              param_dtype=param_dtype)
    return _plain_dit(cfg, stack.stack_unrolled(_strip_value_level(raw[which], param_dtype)), dtype, param_dtype)


def _plain_dit(cfg: DiTConfig, params: dict, dtype, param_dtype) -> StepVideoDiT:
    """A `StepVideoDiT` holding `params` (a pure dict of its whole state)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: StepVideoDiT(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract)


def _with_adapters(cfg: DiTConfig, record: Mapping, adapters: dict, *, dtype, param_dtype) -> StepVideoDiT:
    """A LoRA run's DiT: its base (`record["base"]`, any DiT source; "": the seed's init, as the run
    drew it) with the run's `adapters` (a pure dict of the `LoRAParam`s) folded into the kernels in
    float32 (`models.lora.merged_state`), as a plain `StepVideoDiT` in `param_dtype`."""
    if record["base"]:
        base = load_dit(record["base"], dtype=dtype, param_dtype=jnp.float32)
    else:
        base = StepVideoDiT(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(record["seed"]))
    model = lora.apply_lora(base, rank=record["rank"], alpha=record["alpha"], targets=tuple(record["targets"]))
    state = nnx.state(model, lora.LoRAParam)
    nnx.replace_by_pure_dict(state, adapters)
    nnx.update(model, state)
    merged = nnx.to_pure_dict(lora.merged_state(model))
    return _plain_dit(cfg, jax.tree.map(lambda a: jnp.asarray(a, param_dtype), merged), dtype, param_dtype)


def lora_record(base: str, *, rank: int, alpha: float, targets, seed: int) -> dict:
    """What `load_dit` needs to rebuild a LoRA run's DiT from its adapters: rank, alpha, targets, the
    base's DiT source (a local path made absolute, so the record reads from any directory; "": the
    seed's init, drawn with `seed`)."""
    if base:
        src = dit_source(base)
        base = os.fspath(paths.absolute(src.path)) + (EMA_SUFFIX if src.ema else "")
    return {"rank": rank, "alpha": alpha, "targets": list(targets), "base": base, "seed": seed}


def _strip_value_level(tree, dtype):
    """Orbax restores an `nnx.Variable` without a target as `{"value": array}`; keep the array."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return jnp.asarray(tree["value"], dtype)
        return {k: _strip_value_level(v, dtype) for k, v in tree.items()}
    return jnp.asarray(tree, dtype)
