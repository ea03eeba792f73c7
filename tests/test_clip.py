"""Parity of backend/models/clip.py with transformers 4.57.1 CLIP{Text,Vision}ModelWithProjection.

Fixtures (tools/fixtures/make_prior_clip.py): tiny towers with random weights (gelu, as the
Kandinsky 2.2 ViT-bigG config; eos_token_id 2, the legacy argmax pooling), run on tokenizer
output with padding and an attention mask, on hand-made rows that tell the two pooling rules
apart (an id above EOS, no EOS, left padding), without a mask, and with the same weights
under eos_token_id = EOS and hidden_act quick_gelu (Kandinsky 2.1's ViT-L/14).
"""
import json
import time
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor

from backend.models.clip import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from backend.weights import find_weight_files, iter_safetensors, load_model, load_state_dict, read_config
from tests.conftest import assert_close

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = Path("/work/shared/reference-configs")
if not CONFIGS.is_dir():
    CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference-configs"
TOLERANCE = 1e-4


def with_config(cls, folder: Path, **changes):
    """The fixture weights under a changed config (what transformers ran for the variant outputs)."""
    model = cls.from_config({**read_config(folder), **changes})
    files = find_weight_files(folder)
    load_state_dict(model, (kv for f in files for kv in iter_safetensors(f)), source=str(folder))
    model.set_train(False)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["cpu-numpy-path", "mindspore-ops-path"])
def text_model(request):
    """Both the CPU numpy path and the mindspore.ops path (what GPU / Ascend run) are checked."""
    model = load_model(CLIPTextModelWithProjection, FIXTURES / "clip_text_tiny")
    model.cpu_numpy_path = request.param
    return model


@pytest.fixture(scope="module")
def text_io():
    return np.load(FIXTURES / "clip_text_tiny" / "io.npz")


@pytest.fixture(scope="module", params=[True, False], ids=["cpu-numpy-path", "mindspore-ops-path"])
def vision_model(request):
    """Both the CPU numpy path and the mindspore.ops path (what GPU / Ascend run) are checked."""
    model = load_model(CLIPVisionModelWithProjection, FIXTURES / "clip_vision_tiny")
    model.cpu_numpy_path = request.param
    return model


@pytest.fixture(scope="module")
def vision_io():
    return np.load(FIXTURES / "clip_vision_tiny" / "io.npz")


def test_text_with_padding_mask(text_model, text_io):
    out = text_model(Tensor(text_io["input_ids"]), attention_mask=Tensor(text_io["attention_mask"]))
    assert_close(out.text_embeds, text_io["text_embeds"], TOLERANCE)
    assert_close(out.last_hidden_state, text_io["last_hidden_state"], TOLERANCE)


def test_text_without_mask(text_model, text_io):
    out = text_model(Tensor(text_io["input_ids"]))
    assert_close(out.text_embeds, text_io["nomask_text_embeds"], TOLERANCE)
    assert_close(out.last_hidden_state, text_io["nomask_last_hidden_state"], TOLERANCE)
    # The padding mask really changes the padded positions.
    assert np.abs(text_io["nomask_last_hidden_state"] - text_io["last_hidden_state"]).max() > 1e-2


def test_text_legacy_pooling_takes_argmax_of_ids(text_model, text_io):
    ids, mask = text_io["extra_input_ids"], text_io["extra_attention_mask"]
    assert text_model.config.eos_token_id == 2
    out = text_model(Tensor(ids), attention_mask=Tensor(mask))
    assert_close(out.text_embeds, text_io["extra_text_embeds"], TOLERANCE)
    assert_close(out.last_hidden_state, text_io["extra_last_hidden_state"], TOLERANCE)  # row 2 is left-padded
    np.testing.assert_array_equal(text_model.text_model.pooled_positions(ids), ids.argmax(-1))


def test_text_eos_pooling_takes_first_eos(text_io):
    eos = int(text_io["eos_token_id"])
    model = with_config(CLIPTextModelWithProjection, FIXTURES / "clip_text_tiny", eos_token_id=eos)
    ids, mask = text_io["extra_input_ids"], text_io["extra_attention_mask"]
    out = model(Tensor(ids), attention_mask=Tensor(mask))
    assert_close(out.text_embeds, text_io["eos_text_embeds"], TOLERANCE)
    # Row 0 has an id above EOS (the rules differ there), row 1 has no EOS at all (position 0).
    np.testing.assert_array_equal(model.text_model.pooled_positions(ids)[:2], [4, 0])
    assert np.abs(text_io["eos_text_embeds"][0] - text_io["extra_text_embeds"][0]).max() > 1e-3


def test_text_quick_gelu(text_io):
    model = with_config(CLIPTextModelWithProjection, FIXTURES / "clip_text_tiny", hidden_act="quick_gelu")
    out = model(Tensor(text_io["input_ids"]), attention_mask=Tensor(text_io["attention_mask"]))
    assert_close(out.text_embeds, text_io["quick_text_embeds"], TOLERANCE)
    assert_close(out.last_hidden_state, text_io["quick_last_hidden_state"], TOLERANCE)


def test_text_accepts_numpy_ids_and_refuses_too_long(text_model, text_io):
    out = text_model(text_io["input_ids"], attention_mask=text_io["attention_mask"])
    assert_close(out.text_embeds, text_io["text_embeds"], TOLERANCE)
    with pytest.raises(ValueError, match="at most 16"):
        text_model(np.zeros((1, 17), np.int64))


def test_vision(vision_model, vision_io):
    out = vision_model(Tensor(vision_io["pixel_values"]))
    assert_close(out.image_embeds, vision_io["image_embeds"], TOLERANCE)
    assert_close(out.last_hidden_state, vision_io["last_hidden_state"], TOLERANCE)


def test_vision_quick_gelu(vision_io):
    model = with_config(CLIPVisionModelWithProjection, FIXTURES / "clip_vision_tiny", hidden_act="quick_gelu")
    out = model(Tensor(vision_io["pixel_values"]))
    assert_close(out.image_embeds, vision_io["quick_image_embeds"], TOLERANCE)
    assert_close(out.last_hidden_state, vision_io["quick_last_hidden_state"], TOLERANCE)


def test_vision_refuses_other_sizes(vision_model):
    with pytest.raises(ValueError, match="doesn't match"):
        vision_model(Tensor(np.zeros((1, 3, 30, 36), np.float32)))


def test_checkpoint_names():
    text = CLIPTextModelWithProjection.from_config(
        json.loads((CONFIGS / "kandinsky-2-2-prior" / "text_encoder.json").read_text()))
    names = {name for name, _ in text.parameters_and_names()}
    for key in ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
                "text_model.encoder.layers.31.self_attn.q_proj.weight", "text_model.encoder.layers.0.mlp.fc2.bias",
                "text_model.encoder.layers.0.layer_norm1.weight", "text_model.final_layer_norm.bias",
                "text_projection.weight"):
        assert key in names, key
    assert "text_projection.bias" not in names
    vision = CLIPVisionModelWithProjection.from_config(
        json.loads((CONFIGS / "kandinsky-2-2-prior" / "image_encoder.json").read_text()))
    names = {name for name, _ in vision.parameters_and_names()}
    for key in ("vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
                "vision_model.embeddings.position_embedding.weight", "vision_model.pre_layrnorm.weight",
                "vision_model.encoder.layers.47.self_attn.out_proj.bias", "vision_model.post_layernorm.bias",
                "visual_projection.weight"):
        assert key in names, key
    assert "vision_model.embeddings.patch_embedding.bias" not in names
    assert tuple(vision.vision_model.embeddings.position_embedding.weight.shape) == (257, 1664)


@pytest.mark.parametrize("cls,file", [(CLIPTextModelWithProjection, "text_encoder.json"),
                                      (CLIPVisionModelWithProjection, "image_encoder.json")])
@pytest.mark.parametrize("name", ["kandinsky-2-2-prior", "kandinsky-2-1-prior"])
def test_real_config_parameter_count(cls, file, name):
    folder = "clip_text_tiny" if cls is CLIPTextModelWithProjection else "clip_vision_tiny"
    expected = json.loads((FIXTURES / folder / "real_param_counts.json").read_text())[name]
    start = time.time()
    model = cls.from_config(json.loads((CONFIGS / name / file).read_text()))
    assert sum(int(np.prod(p.shape)) for p in model.get_parameters()) == expected
    assert time.time() - start < 30


def test_config_fields():
    config = json.loads((CONFIGS / "kandinsky-2-1-prior" / "text_encoder.json").read_text())
    model = CLIPTextModelWithProjection.from_config(config)
    assert model.config.hidden_act == "quick_gelu" and model.config.eos_token_id == 2
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextModelWithProjection.from_config({**config, "num_hidden_layers": 1, "hidden_act": "tanh"})
    with pytest.raises(ValueError, match="divisible"):
        CLIPVisionModelWithProjection.from_config({"num_hidden_layers": 1, "hidden_size": 30,
                                                   "num_attention_heads": 4})
    # A full CLIPConfig nests the towers' fields.
    nested = CLIPTextModelWithProjection.from_config({"model_type": "clip", "text_config": {
        "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "projection_dim": 4, "vocab_size": 10}})
    assert nested.config.hidden_size == 16 and nested.config.vocab_size == 10


def test_tiny_tokenizer_folder_gives_the_fixture_ids(text_io):
    # The pipelines' tokenizer folder: the app environment's transformers reads what 4.57.1 saved.
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(FIXTURES / "clip_tokenizer_tiny"))
    prompts = ["a red cat", "photo of a dog on a mat", "",
               "a cat and a dog and a red cat on a photo of a mat and a dog"]
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="np")
    assert tokenizer.model_max_length == 16
    np.testing.assert_array_equal(tokens.input_ids, text_io["input_ids"])
    np.testing.assert_array_equal(tokens.attention_mask, text_io["attention_mask"])
