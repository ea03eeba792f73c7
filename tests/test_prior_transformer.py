"""Parity of backend/models/prior_transformer.py with diffusers 0.35.2 `PriorTransformer`.

Fixtures (tools/fixtures/make_prior_clip.py): a tiny prior in the Kandinsky layout with every
weight random (clip_mean / clip_std / positional and prd embeddings included), fed the tiny
CLIP text encoder's outputs with the tokenizer's padding mask, at python-int, per-sample and
0-d timesteps, with and without the mask; and a variant with every optional layer flipped.
"""
import json
import time
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor

from backend.models.prior_transformer import PriorTransformer
from backend.nn import get_timestep_embedding
from backend.weights import load_model
from tests.conftest import as_numpy, assert_close

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = Path("/work/shared/reference-configs")
if not CONFIGS.is_dir():
    CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference-configs"
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=[True, False], ids=["cpu-numpy-path", "mindspore-ops-path"])
def prior(request):
    """Both the CPU numpy path and the mindspore.ops path (what GPU / Ascend run) are checked."""
    model = load_model(PriorTransformer, FIXTURES / "prior_tiny")
    model.cpu_numpy_path = request.param
    return model


@pytest.fixture(scope="module")
def io():
    return np.load(FIXTURES / "prior_tiny" / "io.npz")


def run(model, io, timestep, mask=True, proj=None):
    out = model(Tensor(io["hidden_states"]), timestep, Tensor(io["proj_embedding"] if proj is None else proj),
                encoder_hidden_states=Tensor(io["encoder_hidden_states"]),
                attention_mask=Tensor(io["attention_mask"]) if mask else None)
    return as_numpy(out)


def test_python_int_timestep_with_text_mask(prior, io):
    assert_close(run(prior, io, 999), io["out_t999"], TOLERANCE)
    # diffusers turns a Python number into a long tensor: 999.7 -> 999.
    assert_close(run(prior, io, 999.7), io["out_t999"], TOLERANCE)


def test_per_sample_timesteps(prior, io):
    assert_close(run(prior, io, Tensor(io["timesteps"])), io["out_tvec"], TOLERANCE)


def test_zero_dim_timestep(prior, io):
    assert_close(run(prior, io, Tensor(np.array(250, dtype=np.int64))), io["out_t0d"], TOLERANCE)


def test_without_mask_no_causal_mask(prior, io):
    # diffusers applies the causal mask only together with a text mask.
    ours = run(prior, io, 37, mask=False)
    assert_close(ours, io["out_nomask"], TOLERANCE)
    assert np.abs(ours - run(prior, io, 37)).max() > 1e-3


def test_post_process_latents(prior, io):
    assert np.abs(io["post_processed"] - io["out_t999"]).max() > 1e-2  # clip_std/mean are not trivial
    ours = prior.post_process_latents(Tensor(io["out_t999"]))
    assert_close(ours, io["post_processed"], TOLERANCE)


@pytest.mark.parametrize("host", [True, False], ids=["cpu-numpy-path", "mindspore-ops-path"])
def test_variant_with_every_optional_layer_flipped(io, host):
    variant = load_model(PriorTransformer, FIXTURES / "prior_tiny" / "variant")
    variant.cpu_numpy_path = host
    assert variant.prd_embedding is None and variant.norm_in is not None
    vio = np.load(FIXTURES / "prior_tiny" / "variant" / "io.npz")
    assert_close(run(variant, io, 999, proj=vio["proj_embedding"]), vio["out_t999"], TOLERANCE)


def test_checkpoint_names():
    model = PriorTransformer.from_config(json.loads((CONFIGS / "kandinsky-2-2-prior" / "prior.json").read_text()))
    names = {name for name, _ in model.parameters_and_names()}
    for key in ("clip_mean", "clip_std", "prd_embedding", "positional_embedding",
                "encoder_hidden_states_proj.weight", "embedding_proj.bias", "time_embedding.linear_1.weight",
                "time_embedding.linear_2.bias", "proj_in.weight", "norm_out.weight", "proj_to_clip_embeddings.weight",
                "transformer_blocks.19.attn1.to_q.weight", "transformer_blocks.0.attn1.to_out.0.bias",
                "transformer_blocks.0.ff.net.0.proj.weight", "transformer_blocks.0.ff.net.2.weight",
                "transformer_blocks.0.norm1.weight", "transformer_blocks.0.norm3.bias"):
        assert key in names, key
    assert "transformer_blocks.20.attn1.to_q.weight" not in names
    assert tuple(model.positional_embedding.shape) == (1, 81, 2048)
    assert tuple(model.clip_std.shape) == (1, 1280)


@pytest.mark.parametrize("name", ["kandinsky-2-2-prior", "kandinsky-2-1-prior"])
def test_real_config_parameter_count(name):
    expected = json.loads((FIXTURES / "prior_tiny" / "real_param_counts.json").read_text())[name]
    start = time.time()
    model = PriorTransformer.from_config(json.loads((CONFIGS / name / "prior.json").read_text()))
    total = sum(int(np.prod(p.shape)) for p in model.get_parameters())
    assert total == expected
    assert time.time() - start < 30


def test_timestep_embedding_layout():
    # the prior's time_proj
    emb = get_timestep_embedding(np.array([0.0, 10.0]), 8, flip_sin_to_cos=True, downscale_freq_shift=0)
    # flip_sin_to_cos: cos first; t = 0 gives cos 1, sin 0.
    np.testing.assert_array_equal(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(emb[1, 4], np.sin(10.0), atol=1e-6)


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="norm_in_type"):
        PriorTransformer.from_config({"num_layers": 1, "norm_in_type": "group"})
    with pytest.raises(ValueError, match="added_emb_type"):
        PriorTransformer.from_config({"num_layers": 1, "added_emb_type": "other"})
    with pytest.raises(ValueError, match="time_embed_act_fn"):
        PriorTransformer.from_config({"num_layers": 1, "time_embed_act_fn": "tanh"})


def test_missing_encoder_hidden_states_is_refused(prior, io):
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        prior(Tensor(io["hidden_states"]), 1, Tensor(io["proj_embedding"]))


def test_token_count_must_fit_the_positional_table(prior, io):
    # num_embeddings 16 text tokens + 4 additional = 20 rows; 15 text tokens make 19.
    with pytest.raises(ValueError, match="positional_embedding has 20"):
        prior(io["hidden_states"], 1, io["proj_embedding"], encoder_hidden_states=io["encoder_hidden_states"][:, 1:])
