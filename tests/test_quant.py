"""Weight-only quantisation (`models/quant.py`): int8 and fp8 (e4m3) block linears through qwix.

Per layer, the analytic bound of weight-only rounding, exact on any instance: for output o,
`|y_q - y| <= sum_i |x_i| * e_io`, with `e_io` the worst rounding error of weight (i, o):
int8 `scale_o / 2`; fp8 e4m3 (3 mantissa bits, subnormal step 2^-9 in units of the scale)
`max(|w_io| / 16, scale_o / 1024)`. A float32 accumulation term (`n * eps32 * sum_i |x_i||w_io|`)
is added for the matmul itself.

Whole models against the float32 fixtures `dit` and `step_llm`, in float32 compute so that only the
weight rounding differs. The bound is tied to the instance's own weights: with
`rho = ||W - deq(Q(W))|| / ||W||` over every quantised kernel (the relative rms weight perturbation),
each output's max and rms errors relative to the reference must stay below `4 * rho`. Measured on
the shipped fixtures (CPU, jax 0.10.2; docs/quantization.md): DiT int8 rho 0.70 %, output max
0.81-0.89 %, rms 0.69-0.70 %; fp8 rho 2.61 %, max 2.4-2.7 %, rms 2.4-2.6 %; Step-LLM int8 rho 0.69 %,
max 1.2-1.3 %, rms 1.3 %; fp8 rho 2.60 %, max 4.5-4.8 %, rms 4.6-4.7 %. The factor 4 is empirical
(errors of 1.0-1.9 rho measured: a tiny model's few layers barely amplify them), with at least 2x margin.
The DiT is also checked as deployed, bf16 parameters and compute with quantised block linears,
against the bf16 bound of `tests/test_dit_bf16.py` plus 4 rho.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax import checkpoints
from stepvideo_jax.convert import cli, conversion, orbax_io
from stepvideo_jax.convert import dit as dit_convert
from stepvideo_jax.convert import step_llm as llm_convert
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.safetensors_io import TensorSource
from stepvideo_jax.models import layers, lora, quant, stack
from stepvideo_jax.parallel.mesh import MeshConfig, make_mesh
from stepvideo_jax.sampling import generation
from tests.fixtures import fixture_dir, load_json, load_npz

SCHEMES = ("int8", "fp8")
FACTOR = 4.0   # whole-model error <= FACTOR * rho (module docstring)


def element_bound(w, scale, scheme):
    """Worst rounding error of each weight (in, out) of a kernel quantised with `scale` (1, out)."""
    if scheme == "int8":
        return np.broadcast_to(scale / 2, w.shape)
    return np.maximum(np.abs(w) / 16, scale / 1024)


def check_linear_bound(x, w, scheme, y_q):
    """`y_q` = x @ quantised(w) within the analytic bound, for every output."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    _, scale = quant.quantize_kernel(jnp.asarray(w), scheme)
    scale = np.asarray(scale, np.float64)
    y = x64 @ w64
    bound = np.abs(x64) @ element_bound(w64, scale, scheme)
    bound += w.shape[0] * np.finfo(np.float32).eps * (np.abs(x64) @ np.abs(w64))
    err = np.abs(np.asarray(y_q, np.float64) - y)
    assert np.all(err <= bound), f"{scheme}: worst error / bound {np.max(err / bound):.3f}"
    return float(np.max(err / bound))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantised_linear_within_the_weight_rounding_bound(scheme):
    rng = np.random.default_rng(0)
    lin = layers.Linear(96, 40, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    w = rng.standard_normal((96, 40)).astype(np.float32) * np.linspace(0.01, 3, 40, dtype=np.float32)
    w[:, 3] = 0.0                                    # an all-zero output channel
    w[5, 7] = 40.0                                   # an outlier that sets its channel's scale
    lin.kernel.set_value(jnp.asarray(w))
    x = rng.standard_normal((3, 5, 96)).astype(np.float32)
    y_float = np.asarray(lin(jnp.asarray(x)))
    holder = quant.quantize(_Holder(lin), scheme)
    assert lin.kernel[...].dtype == quant.SCHEMES[scheme] and lin.kernel_scale[...].shape == (1, 40)
    assert lin.kernel_scale.get_metadata()["axes"] == (None, "mlp")
    y_q = np.asarray(holder.blocks(jnp.asarray(x)))
    ratio = check_linear_bound(x.reshape(-1, 96), w, scheme, y_q.reshape(-1, 40))
    assert 0 < ratio <= 1 and not np.array_equal(y_q, y_float)
    np.testing.assert_array_equal(y_q[..., 3], 0.0)


class _Holder(nnx.Module):
    """A module whose linear sits where `quant` looks for block linears (`blocks`)."""

    def __init__(self, lin):
        self.blocks = lin


@pytest.mark.parametrize("scheme", SCHEMES)
def test_stacked_quantised_linears_scan_within_the_bound(scheme):
    """Stacked (layers, in, out) kernels quantise per layer and output channel (scale (layers, 1,
    out), axes gain "layers") and run under `stack.scan`: every layer within its bound."""
    n, d = 3, 32
    rng = np.random.default_rng(1)
    holder = _Holder(stack.stack([layers.Linear(d, d, axes=("embed", "mlp"), use_bias=False, rngs=nnx.Rngs(i))
                                  for i in range(n)]))
    ws = [np.asarray(stack.layer(holder.blocks, i).kernel[...]) * (i + 1) for i in range(n)]
    holder.blocks.kernel.set_value(jnp.asarray(np.stack(ws)))
    quant.quantize(holder, scheme)
    assert holder.blocks.kernel_scale[...].shape == (n, 1, d)
    assert holder.blocks.kernel_scale.get_metadata()["axes"] == (stack.LAYER_AXIS, None, "mlp")
    x = rng.standard_normal((4, d)).astype(np.float32)

    def body(block, carry):
        return block(carry)

    outs = []
    y = jnp.asarray(x)
    for i in range(n):  # the scan's result, layer by layer, each checked on its own input
        outs.append((np.asarray(y), ws[i]))
        y = stack.layer(holder.blocks, i)(y)
    np.testing.assert_allclose(np.asarray(stack.scan(holder.blocks, body, jnp.asarray(x))), np.asarray(y),
                               rtol=1e-6, atol=1e-6)
    for i, (xi, w) in enumerate(outs):
        check_linear_bound(xi, w, scheme, np.asarray(stack.layer(holder.blocks, i)(jnp.asarray(xi))))


def rho(model, scheme):
    num = den = 0.0
    for _, lin in quant.quantized_linears(model):
        w = np.asarray(lin.kernel[...], np.float64)
        q, s = quant.quantize_kernel(lin.kernel[...], scheme)
        num += np.sum((w - np.asarray(q, np.float64) * np.asarray(s, np.float64)) ** 2)
        den += np.sum(w ** 2)
    return float(np.sqrt(num / den))


def rel_errors(out, ref):
    e = np.asarray(out, np.float64) - ref
    return float(np.max(np.abs(e)) / np.max(np.abs(ref))), float(np.sqrt(np.mean(e ** 2) / np.mean(ref ** 2)))


def dit_model():
    cfg = dit_convert.config_from_dict(load_json("dit")["constructor_args"])
    return dit_convert.convert(cfg, TensorSource.single(fixture_dir("dit") / "weights.safetensors"), label="dit")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantised_dit_against_the_float32_fixture(scheme):
    model = dit_model()
    r = rho(model, scheme)
    quant.quantize(model, scheme)
    assert quant.model_scheme(model) == scheme
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    for name in load_json("dit")["cases"]:
        case = load_npz("dit", f"{name}.npz")
        out = fwd(state, case["hidden_states"], case["timestep"], case["encoder_hidden_states"],
                  case["encoder_attention_mask"], case["encoder_hidden_states_2"])
        max_rel, rms_rel = rel_errors(out, case["output"])
        assert 0 < max_rel <= FACTOR * r and 0 < rms_rel <= FACTOR * r, (name, scheme, max_rel, rms_rel, r)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantised_dit_in_bf16_against_the_float32_fixture(scheme):
    """The deployed configuration: bf16 parameters and compute with quantised block linears
    (dequantised to bf16). Bound: the bf16 model's documented bound (`tests/test_dit_bf16.py`,
    timestep taken exactly) plus the weight rounding's 4 rho (measured: docs/quantization.md)."""
    import dataclasses

    from tests.test_dit_bf16 import MAX_REL, RMS_REL

    r = rho(dit_model(), scheme)
    cfg = dataclasses.replace(dit_convert.config_from_dict(load_json("dit")["constructor_args"]),
                              timestep_in_compute_dtype=False)
    model = dit_convert.convert(cfg, TensorSource.single(fixture_dir("dit") / "weights.safetensors"),
                                dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, label="dit (bf16)")
    graphdef, state = nnx.split(quant.quantize(model, scheme))
    fwd = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    for name in load_json("dit")["cases"]:
        case = load_npz("dit", f"{name}.npz")
        out = fwd(state, case["hidden_states"], case["timestep"], case["encoder_hidden_states"],
                  case["encoder_attention_mask"], case["encoder_hidden_states_2"])
        assert out.dtype == jnp.bfloat16
        max_rel, rms_rel = rel_errors(np.asarray(out, np.float32), case["output"])
        assert max_rel <= MAX_REL + FACTOR * r and rms_rel <= RMS_REL + FACTOR * r, (name, max_rel, rms_rel, r)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantised_step_llm_against_the_float32_fixture(scheme):
    d = fixture_dir("step_llm")
    model = llm_convert.load(d, weights=d / "weights.safetensors")
    r = rho(model, scheme)
    quant.quantize(model, scheme)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
    cases = load_npz("step_llm", "cases.npz")
    batches = sorted(k[: -len("_input_ids")] for k in cases if k.endswith("_input_ids"))
    assert batches
    for b in batches:
        max_rel, rms_rel = rel_errors(fwd(state, jnp.asarray(cases[f"{b}_input_ids"])), cases[f"{b}_y"])
        assert 0 < max_rel <= FACTOR * r and 0 < rms_rel <= FACTOR * r, (b, scheme, max_rel, rms_rel, r)


def release():
    return fixture_dir("release_layout") / "stepvideo-t2v"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The release layout converted twice: bfloat16, and bfloat16 with int8 block linears."""
    root = tmp_path_factory.mktemp("ckpt")
    return {w: conversion.convert_release(release(), root / w, components=list(checkpoints.QUANTISABLE),
                                   dtype="bfloat16", quantize=w) for w in ("bf16", "int8")}


def flat(model):
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.sharding
@pytest.mark.slow
@pytest.mark.parametrize("component", checkpoints.QUANTISABLE)
def test_int8_checkpoint_round_trip_on_1_and_8_devices(converted, component):
    """`convert --quantize int8` writes int8 kernels + float32 scales (manifest records the scheme);
    restored on one device and into an 8-device mesh (kernels and scales sharded by the rules) it
    equals quantise-on-load of the bf16 checkpoint, quantise-on-load of the release directory
    straight into the mesh, and the in-memory quantisation of the float model."""
    manifest = orbax_io.read_manifest(converted["int8"] / component)
    assert orbax_io.stored_scheme(manifest) == "int8" and manifest["dtype"] == "bfloat16"
    stored = {k: s for g in manifest["groups"] for k, s in g["params"].items()}
    scales = [k for k in stored if k.endswith("/" + quant.SCALE_NAME)]
    assert scales and all(stored[k[: -len(quant.SCALE_NAME)] + "kernel"][-1] == stored[k][-1] for k in scales)

    one = flat(checkpoints.load_converted(converted["int8"], component))
    mesh = make_mesh(MeshConfig.from_string("fsdp=2,sequence=2,tensor=2"))
    eight = flat(checkpoints.load_converted(converted["int8"], component, mesh=mesh))
    on_load = flat(checkpoints.load_converted(converted["bf16"], component, weights="int8", mesh=mesh))
    in_memory = flat(quant.quantize(checkpoints.load_converted(converted["bf16"], component), "int8"))
    release_direct = flat(checkpoints.load_component(release(), component, dtype=jnp.bfloat16, mesh=mesh,
                                                     weights="int8"))
    assert one.keys() == eight.keys() == on_load.keys() == in_memory.keys() == release_direct.keys()
    int8_keys = [k for k, v in one.items() if v.dtype == jnp.int8]
    assert {quant.scale_path(k) for k in int8_keys} == {conversion.stack_path(k) for k in scales}
    sharded_scales = 0
    for k, want in one.items():
        for other in (eight, on_load, in_memory, release_direct):
            assert other[k].dtype == want.dtype, k
            np.testing.assert_array_equal(np.asarray(other[k]), np.asarray(want), err_msg=k)
        assert on_load[k].sharding.is_equivalent_to(eight[k].sharding, want.ndim), k
        assert release_direct[k].sharding.is_equivalent_to(eight[k].sharding, want.ndim), k
        sharded_scales += k.endswith(quant.SCALE_NAME) and not eight[k].sharding.is_fully_replicated
    if component == "transformer":
        assert sharded_scales > 0, "the rules shard the scales like the kernels' output axis"
        model = checkpoints.load_converted(converted["int8"], component, mesh=mesh)
        kernel, scale = model.blocks.ff.fc1.kernel[...], model.blocks.ff.fc1.kernel_scale[...]
        assert kernel.sharding.spec[-1] == scale.sharding.spec[-1]


def test_fp8_checkpoint_round_trip(converted, tmp_path):
    """float8_e4m3fn kernels survive Orbax: `--quantize fp8` restores equal to fp8 quantise-on-load."""
    fp8 = conversion.convert_release(release(), tmp_path / "fp8", components=["transformer"], dtype="bfloat16",
                                     quantize="fp8")
    stored = flat(checkpoints.load_converted(fp8, "transformer"))
    on_load = flat(checkpoints.load_converted(converted["bf16"], "transformer", weights="fp8"))
    assert stored.keys() == on_load.keys()
    assert any(v.dtype == jnp.float8_e4m3fn for v in stored.values())
    for k, want in on_load.items():
        assert stored[k].dtype == want.dtype, k
        np.testing.assert_array_equal(np.asarray(stored[k].astype(jnp.float32)), np.asarray(want.astype(jnp.float32)),
                                      err_msg=k)


def test_quantised_checkpoint_refuses_another_scheme(converted):
    with pytest.raises(ValueError, match="stores int8 weights; load it with weights=int8"):
        checkpoints.load_converted(converted["int8"], "transformer", weights="bf16")
    with pytest.raises(ValueError, match="stores int8 weights"):
        checkpoints.load_converted(converted["int8"], "step_llm", weights="fp8")


def test_unknown_scheme_is_refused_before_anything_loads(tmp_path):
    for call in (lambda: quant.check_scheme("int4"),
                 lambda: checkpoints.load_converted(tmp_path / "nowhere", "transformer", weights="int4"),
                 lambda: checkpoints.loader(tmp_path / "nowhere", weights="int4")):
        with pytest.raises(ValueError, match=r"weights='int4': choose one of \['bf16', 'int8', 'fp8'\]"):
            call()
    with pytest.raises(CheckpointError, match="--quantize: weights='nf4'"):
        conversion.convert_release(release(), tmp_path / "out", quantize="nf4")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        cli.main(["--release", str(release()), "--out", str(tmp_path / "out"), "--quantize", "int4"])


def test_generate_config_weights_is_checked():
    from tests.fixtures import load_config

    config = load_config("configs/generate/tiny.py")
    assert config.weights == "bf16"
    config.weights = "int3"
    with pytest.raises(ValueError, match=r"weights='int3': choose one of"):
        generation.resolve(config)


def test_lora_refuses_a_quantised_projection():
    model = quant.quantize(dit_model(), "int8")
    with pytest.raises(ValueError, match="is quantised"):
        lora.apply_lora(model, rank=2, alpha=2.0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_plans_hold_quantised_block_linears(scheme):
    """`launch/plan.py --weights` and `launch/aot.py --weights` compile the state a quantised restore
    holds: block kernels in the scheme's dtype with float32 scales, sharded by the rules (here on the
    host's devices, one full-size layer, abstract only)."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "launch"))
    import plan

    mesh = make_mesh(MeshConfig.from_string("fsdp=2,tensor=4"))
    for build in (plan.build_denoise, plan.build_step_llm):
        _, args, shardings, _ = build(mesh, 1, scheme)
        state, state_shardings = args[0], shardings[0]
        flat_state = dict(nnx.to_flat_state(state))
        flat_shardings = dict(nnx.to_flat_state(state_shardings))
        kernels = [p for p in flat_state if p[-1] == quant.SCALE_NAME]
        assert kernels, build.__name__
        for path in kernels:
            kernel, scale = flat_state[path[:-1] + ("kernel",)].get_value(), flat_state[path].get_value()
            assert kernel.dtype == quant.SCHEMES[scheme] and scale.dtype == jnp.float32
            kernel_spec = flat_shardings[path[:-1] + ("kernel",)].spec
            scale_spec = flat_shardings[path].spec
            assert scale_spec[-1] == kernel_spec[-1] and scale_spec[-2] is None, path
        top = [p for p in flat_state if p[0] not in stack.STACKED_MODULES and p[-1] == "kernel"]
        assert all(flat_state[p].get_value().dtype == jnp.bfloat16 for p in top)   # the DiT's embeddings etc.


@pytest.mark.e2e
@pytest.mark.slow
def test_demo_command_with_int8_weights_follows_its_prompt(tmp_path):
    """README's main-job command with `--config.weights=int8`: the shipped demo checkpoint (float32)
    quantised on load, DiT and Step-LLM block linears int8; the mp4 shows the prompt's colour and
    motion (`eval/motion_checker.py`), and the run prints the scheme."""
    import os
    import subprocess
    import sys

    from stepvideo_jax.eval import motion_checker
    from stepvideo_jax.sampling import video_io
    from tests.fixtures import PROJECT_ROOT

    out = tmp_path / "video.mp4"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "stepvideo_jax.generate", "--config.prompt=a blue square moves up",
                           "--config.weights=int8", f"--config.output={out}"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "block linears: int8" in proc.stdout
    reading = motion_checker.read_video(video_io.read_mp4(out)[0])
    assert (reading.colour, reading.motion) == ("blue", "up"), reading


def test_eval_folder_records_a_quantising_scheme_only():
    """generate_eval's settings record (what a folder is resumed against) names `weights` when it
    quantises, and reads as before the field existed for bf16, so old folders stay resumable."""
    from stepvideo_jax.sampling import eval_set
    from tests.fixtures import load_config

    config = load_config("configs/generate/tiny.py")
    assert "weights" not in eval_set.settings_record(config, ["a"])
    config.weights = "int8"
    assert eval_set.settings_record(config, ["a"])["weights"] == "int8"


@pytest.mark.parametrize("record, message", [
    ({"class": "WeightQuant", "values": {"scheme": "int4"}}, "WeightQuant.scheme: value 'int4'"),
    ({"class": "os:system", "values": {"scheme": "int8"}}, "is not a registered model config"),
    ({"class": "DiTConfig", "values": {}}, "this component needs a WeightQuant"),
])
def test_manifest_quantization_record_is_checked(converted, tmp_path, record, message):
    import json
    import shutil

    folder = tmp_path / "transformer"
    shutil.copytree(converted["int8"] / "transformer", folder)
    manifest = json.loads((folder / orbax_io.MANIFEST).read_text())
    manifest["quantization"] = record
    (folder / orbax_io.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"manifest.json: quantization: .*{message}"):
        orbax_io.read_manifest(folder)
