"""bfloat16 on the CPU (issue 13): every model loaded with dtype bfloat16 against its float32
reference, at a tolerance derived from torch's own bfloat16 error on the same fixture and inputs.

torch's error: tests/fixtures/bf16_torch_errors.json (tools/fixtures/make_bf16_errors.py) holds, for
each fixture folder and reference output, the max abs difference between diffusers / transformers
run under torch.autocast("cpu", dtype=torch.bfloat16) and the float32 output our float32 tests
compare with. Our bfloat16 model stores its product weights (and large embedding tables) in
bfloat16 and every other parameter in float32, as torch autocast keeps them (backend/nn/entry.py
Model.bfloat16_parameter_names), and runs its products through oneDNN's bf16 gemm (float32
accumulation and output); everything between products stays float32.

Tolerance rule: ours <= TORCH_ERROR_FACTOR (1.25) x torch's error on the same case, one factor for
every model and case; the 2.2 text-to-image pipeline's image <= 1 x torch's image difference (the
issue's image criterion). CLIP text's masked hidden states: torch's error is taken over the positions
that see a token (bf16_torch_errors.json says why), ours is checked on all positions.
Ours / torch, max abs, measured on this CPU (avx512_bf16):
  2.x UNets (12 cases)       0.45-0.98      Kandinsky 3 UNets (3)           0.51-0.74
  MoVQ encode, decode (8)    0.44-1.00      prior (5)                       0.54-0.83
  CLIP text (6)              0.71-1.04      CLIP vision (2)                 1.07, 1.14
  MCLIP (4)                  0.54-0.98      T5 (2)                          0.39, 0.41
Why a factor above 1: these are maxima over a few hundred values of two differently rounded runs;
on the tiny CLIPs (width 24-32) ours lands a little above torch's on 4 of 42 cases (at most 1.14x).
Storing every parameter in bfloat16 instead made CLIP, MCLIP and the prior up to 1.45x torch's
error and sent 1-2 of 768 latent pixels of a quantized MoVQ decode to another codebook entry
(2.5x and 4.8x): hence float32 for everything the products do not read.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from backend.models.clip import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from backend.models.mclip import MultilingualCLIP
from backend.models.prior_transformer import PriorTransformer
from backend.models.t5 import T5EncoderModel
from backend.models.unet_2d_condition import UNet2DConditionModel
from backend.models.unet_kandinsky3 import Kandinsky3UNet
from backend.models.vq_model import VQModel
from backend.nn.host import cpu_bf16_flags, host_gemm
from backend.weights import load_model
from tests.conftest import as_numpy, max_abs_diff
from tests.test_prior_transformer import run as run_prior
from tests.test_t5 import out as t5_states
from tests.test_unet_2d_condition import case_inputs as unet_case_inputs

FIXTURES = Path(__file__).parent / "fixtures"
TORCH_ERRORS = json.loads((FIXTURES / "bf16_torch_errors.json").read_text())
TORCH_ERROR_FACTOR = 1.25
PIPELINE = "pipelines/kandinsky-2-2-decoder-tiny"
MCLIP = "pipelines_2_1/kandinsky-2-1-tiny/text_encoder"


# ------------------------------------------------------------------ each fixture: model, reference, cases

def unet_2x(model, ref, key):
    sample, timestep, states, added = unet_case_inputs(ref, key.removesuffix("_out"))
    return model(sample, timestep, encoder_hidden_states=states, added_cond_kwargs=added)


def unet_k3(model, io, key):
    case = key.removesuffix("_out")
    t = io[f"{case}_timestep"]
    return model(io[f"{case}_sample"], int(t) if t.ndim == 0 else t, io[f"{case}_states"], io[f"{case}_mask"])


def movq(model, ref, key):
    if key == "encoded":
        return model.encode(Tensor(ref["image"]))["latents"]
    if key == "roundtrip":
        return model(Tensor(ref["image"]))
    return model.decode(Tensor(ref["latents"]), force_not_quantize=key == "decoded_not_quantized")["sample"]


def prior(model, io, key):
    timestep = {"out_t999": 999, "out_tvec": Tensor(io["timesteps"]),
                "out_t0d": Tensor(np.array(250, dtype=np.int64)), "out_nomask": 37}[key]
    return run_prior(model, io, timestep, mask=key != "out_nomask")


def prior_variant(model, vio, key):
    return run_prior(model, np.load(FIXTURES / "prior_tiny" / "io.npz"), 999, proj=vio["proj_embedding"])


def clip_text(model, io, key):
    prefix = key[:key.index("_") + 1] if key.startswith(("nomask_", "extra_")) else ""
    ids = io[f"{prefix}input_ids"] if prefix == "extra_" else io["input_ids"]
    mask = None if prefix == "nomask_" else io[f"{prefix}attention_mask"]
    out = model(ids, attention_mask=mask)
    return out.text_embeds if key.endswith("text_embeds") else out.last_hidden_state


def clip_vision(model, io, key):
    return getattr(model(io["pixel_values"]), key)


def mclip(model, ref, key):
    prefix = "mclip_short_" if key.startswith("mclip_short_") else "mclip_"
    out = model(ref[f"{prefix}input_ids"], ref[f"{prefix}attention_mask"])
    return out.text_embeds if key.endswith("text_embeds") else out.last_hidden_state


def t5(model, io, key):
    return t5_states(model, io["input_ids"], io["attention_mask"] if key == "masked" else None)


# fixture folder -> (model class, its reference file, run(model, reference, key) -> output of `key`)
MODELS = {
    **{f"unet_tiny_{v}": (UNet2DConditionModel, f"unet_tiny_{v}/reference.npz", unet_2x)
       for v in ("image", "inpaint", "hint", "text_image")},
    "unet_k3_tiny": (Kandinsky3UNet, "unet_k3_tiny/io.npz", unet_k3),
    "unet_k3_tiny_3level": (Kandinsky3UNet, "unet_k3_tiny_3level/io.npz", unet_k3),
    "movq_tiny": (VQModel, "movq_tiny/reference.npz", movq),
    "movq_tiny_group": (VQModel, "movq_tiny_group/reference.npz", movq),
    "prior_tiny": (PriorTransformer, "prior_tiny/io.npz", prior),
    "prior_tiny/variant": (PriorTransformer, "prior_tiny/variant/io.npz", prior_variant),
    "clip_text_tiny": (CLIPTextModelWithProjection, "clip_text_tiny/io.npz", clip_text),
    "clip_vision_tiny": (CLIPVisionModelWithProjection, "clip_vision_tiny/io.npz", clip_vision),
    MCLIP: (MultilingualCLIP, "pipelines_2_1/reference.npz", mclip),
    "t5_encoder_tiny": (T5EncoderModel, "t5_encoder_tiny/io.npz", t5),
}
CASES = [pytest.param(fixture, key, id=f"{fixture}:{key}")
         for fixture in MODELS for key in TORCH_ERRORS[fixture]]

_loaded: dict = {}


def bf16_model(fixture: str):
    if fixture not in _loaded:
        cls, reference, _ = MODELS[fixture]
        _loaded[fixture] = load_model(cls, FIXTURES / fixture, dtype=ms.bfloat16), dict(np.load(FIXTURES / reference))
    return _loaded[fixture]


@pytest.fixture
def bf16_gemm_calls(monkeypatch):
    """The number of dnnl_gemm_bf16bf16f32 calls made during the test (stays 0 on a CPU without native
    bfloat16 products, where bfloat16 weights multiply through the float32 sgemm)."""
    gemm, calls = host_gemm(), []
    if gemm.gemm_bf16 is not None:
        real = gemm.gemm_bf16

        def counted(*args):
            calls.append(1)
            return real(*args)

        counted.__name__ = real.__name__
        monkeypatch.setattr(gemm, "gemm_bf16", counted)
    return calls


def products_ran_in_bf16(calls: list) -> bool:
    return len(calls) > 0 if host_gemm().gemm_bf16 is not None else len(calls) == 0


def assert_float32_finite_within(out, expected: np.ndarray, tolerance: float, what: str) -> None:
    assert isinstance(out, np.ndarray) and out.dtype == np.float32, (what, type(out), getattr(out, "dtype", None))
    assert np.isfinite(out).all(), what
    error = max_abs_diff(out, expected)
    assert error <= tolerance, f"{what}: bfloat16 max abs error {error:.3e} > tolerance {tolerance:.3e}"


# ------------------------------------------------------------------------------------------ the tests

def test_every_fixture_with_a_torch_error_is_tested():
    assert set(TORCH_ERRORS) - {"_about"} == set(MODELS) | {PIPELINE}
    assert TORCH_ERRORS["_about"]["torch"].startswith("2.") and "diffusers" in TORCH_ERRORS["_about"]


def test_a_cpu_with_native_bf16_products_uses_the_bf16_gemm():
    """Otherwise every test below would pass on the float32 fallback without exercising the bf16 gemm."""
    if cpu_bf16_flags():
        assert host_gemm().gemm_bf16 is not None


def assert_stored_as_bfloat16_products(model) -> None:
    """The product weights (and large embedding tables) in bfloat16, every other parameter in float32."""
    rounded = model.bfloat16_parameter_names()
    assert rounded
    for name, param in model.parameters_and_names():
        assert param.dtype == (ms.bfloat16 if name in rounded else ms.float32), (name, param.dtype)


@pytest.mark.parametrize("fixture, key", CASES)
def test_bf16_model_within_torch_bf16_error(fixture, key, bf16_gemm_calls):
    model, reference = bf16_model(fixture)
    assert_stored_as_bfloat16_products(model)
    out = as_numpy(MODELS[fixture][2](model, reference, key))
    assert products_ran_in_bf16(bf16_gemm_calls), len(bf16_gemm_calls)
    tolerance = TORCH_ERROR_FACTOR * TORCH_ERRORS[fixture][key]
    assert_float32_finite_within(out, reference[key], tolerance, f"{fixture}:{key}")


@pytest.mark.parametrize("fixture", list(MODELS))
def test_without_native_bf16_products_the_float32_fallback_holds_too(fixture, monkeypatch):
    """On a CPU without avx512_bf16 / AMX, bfloat16 weights multiply through the float32 sgemm (converted
    per call): the first case of each model still meets its tolerance."""
    monkeypatch.setattr(host_gemm(), "gemm_bf16", None)
    model, reference = bf16_model(fixture)
    key = next(iter(TORCH_ERRORS[fixture]))
    out = as_numpy(MODELS[fixture][2](model, reference, key))
    assert_float32_finite_within(out, reference[key], TORCH_ERROR_FACTOR * TORCH_ERRORS[fixture][key],
                                 f"{fixture}:{key} (float32 products)")


def test_text_to_image_pipeline_in_bf16_no_further_from_float32_than_torch(bf16_gemm_calls):
    """The tiny 2.2 decoder pipeline as make_pipelines.py ran reference.npz["text2img"] (3 DDPM steps,
    guidance 4, the same numpy noise): our bfloat16 image is no further from the float32 image than
    torch's bf16-autocast image is (factor 1)."""
    from backend.pipelines import KandinskyV22Pipeline

    ref = np.load(FIXTURES / "pipelines" / "reference.npz")
    pipe = KandinskyV22Pipeline.from_pretrained(FIXTURES / PIPELINE, dtype="bfloat16")
    assert pipe.unet.conv_in.weight.dtype == pipe.movq.decoder.conv_in.weight.dtype == ms.bfloat16
    image = pipe(ref["image_embeds"], ref["negative_image_embeds"], height=64, width=64, num_inference_steps=3,
                 guidance_scale=4.0, generator=np.random.default_rng(10), output_type="np")[0]
    assert products_ran_in_bf16(bf16_gemm_calls), len(bf16_gemm_calls)
    assert_float32_finite_within(image, ref["text2img"], TORCH_ERRORS[PIPELINE]["text2img"], "2.2 text2img image")


def test_a_bfloat16_app_loads_kandinsky_3s_t5_in_bfloat16_and_it_is_the_tested_model(demo_root, tmp_path):
    """A bfloat16 app loads T5 in bfloat16 from the published layout (fp16 shards with float32 `wo`),
    `wo` included: 2 bytes a parameter. That is load_model(..., dtype=bfloat16), the model the parity
    test above checks (t5_encoder_tiny), bit for bit; its states are float32. The UNet is bfloat16 too."""
    from safetensors.numpy import load_file, save_file

    from backend.demo import ensure_demo_models
    from backend.families import FAMILIES, ModelSpec
    from backend.manager import ModelManager

    demo = ensure_demo_models(demo_root, "3")
    folder = tmp_path / "kandinsky-3-half"
    shutil.copytree(demo.repos["decoder"], folder)
    path = folder / "text_encoder" / "model.safetensors"
    save_file({k: (v if ".wo." in k else v.astype(np.float16)) for k, v in load_file(str(path)).items()}, str(path))
    spec = ModelSpec("k3-half", "K3 half", FAMILIES["3"], {"decoder": str(folder)})
    manager = ModelManager(dtype="bfloat16")

    with manager.use(spec.stage("text_encoder")) as unit:
        pipe = unit.pipeline("default")
        encoder = pipe.text_encoder
        assert_stored_as_bfloat16_products(encoder)
        assert {name for name, _ in encoder.parameters_and_names() if ".wo." in name} <= encoder.bfloat16_parameter_names()
        (status,) = manager.status()["units"]
        assert status["bytes"] == sum(int(np.prod(p.shape)) * (2 if p.dtype == ms.bfloat16 else 4)
                                      for _, p in encoder.parameters_and_names())
        embeds, _, mask, _ = pipe.encode_prompt(["a red cat in the snow"], False, 1, None)
        direct = load_model(T5EncoderModel, folder / "text_encoder", dtype=ms.bfloat16)
        pipe.text_encoder = direct
        expected, _, _, _ = pipe.encode_prompt(["a red cat in the snow"], False, 1, None)
        pipe.text_encoder = encoder
    assert embeds.dtype == np.float32 and np.isfinite(embeds).all() and mask.sum() > 0
    assert np.array_equal(embeds, expected)
    with manager.use(spec.stage("text2img")) as unit:
        assert unit.pipeline("default").unet.conv_in.weight.dtype == ms.bfloat16
