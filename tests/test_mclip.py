"""Parity of backend/models/mclip.py (Kandinsky 2.1's MultilingualCLIP) with diffusers 0.35.2 +
transformers 4.57.1, and of the XLM-R tokenizer as this environment loads it.

Fixtures: tools/fixtures/make_pipelines_2_1.py (a tiny XLM-R: 2 layers, width 24, the published
config's gelu / layer_norm_eps / pad id / single token type; a tiny unigram tokenizer). The
reference side tokenized with transformers 4.57.1; here transformers 5.x tokenizes.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor

from backend.models.mclip import MCLIPConfig, MultilingualCLIP, position_ids_from_input_ids
from backend.pipelines.loading import load_xlm_roberta_tokenizer
from backend.weights import load_model
from tests.conftest import assert_close

FIXTURES = Path(__file__).parent / "fixtures" / "pipelines_2_1"
FOLDER = FIXTURES / "kandinsky-2-1-tiny"
CONFIGS = Path("/work/shared/reference-configs")
if not CONFIGS.is_dir():
    CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference-configs"
TOL = 1e-4
TEXTS = ["a red cat", "ein rote Katze  on the mat", "кот xyz", "the dog on the mat " * 20]


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "reference.npz"))


@pytest.fixture(scope="module", params=[True, False], ids=["cpu-numpy-path", "mindspore-ops-path"])
def model(request):
    """Both the CPU numpy path and the mindspore.ops path (what GPU / Ascend run) are checked."""
    m = load_model(MultilingualCLIP, FOLDER / "text_encoder")
    m.cpu_numpy_path = request.param
    return m


def test_tokenizer_gives_the_reference_ids(ref):
    tokenizer = load_xlm_roberta_tokenizer(FOLDER / "tokenizer")
    tokens = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=77, return_attention_mask=True,
                       add_special_tokens=True, return_tensors="np")
    np.testing.assert_array_equal(tokens["input_ids"], ref["mclip_input_ids"])
    np.testing.assert_array_equal(tokens["attention_mask"], ref["mclip_attention_mask"])
    assert tokenizer.model_max_length == 512 and tokenizer.pad_token_id == 1


def test_padded_prompts(model, ref):
    text_embeds, hidden = model(Tensor(ref["mclip_input_ids"].astype(np.int32)),
                                Tensor(ref["mclip_attention_mask"].astype(np.int32)))
    assert_close(text_embeds, ref["mclip_text_embeds"], TOL)
    assert_close(hidden, ref["mclip_last_hidden_state"], TOL)


def test_short_rows_and_numpy_inputs(model, ref):
    out = model(ref["mclip_short_input_ids"], ref["mclip_short_attention_mask"])
    assert_close(out.text_embeds, ref["mclip_short_text_embeds"], TOL)
    assert_close(out.last_hidden_state, ref["mclip_short_last_hidden_state"], TOL)


def test_position_ids_skip_padding():
    ids = np.array([[0, 5, 6, 2, 1, 1], [1, 1, 0, 7, 2, 1]])
    expected = np.array([[2, 3, 4, 5, 1, 1], [1, 1, 2, 3, 4, 1]])
    np.testing.assert_array_equal(position_ids_from_input_ids(ids, 1), expected)


def test_too_many_tokens(model):
    ids = np.full((1, 79), 5)  # positions 2..80, the tiny table has 80 rows
    with pytest.raises(ValueError, match="at most 78"):
        model(ids)


def test_published_config():
    raw = json.loads((CONFIGS / "kandinsky-2-1" / "text_encoder.json").read_text())
    config = MCLIPConfig.from_dict(raw)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.max_position_embeddings) == (250002, 1024, 24, 16, 4096, 514)
    assert (config.transformerDimensions, config.numDims, config.type_vocab_size) == (1024, 768, 1)
    assert config.layer_norm_eps == 1e-5 and config.pad_token_id == 1
    # the constructor names of diffusers' MCLIPConfig are accepted too
    bare = {k: v for k, v in raw.items() if k not in ("transformerDimensions", "numDims")}
    alias = MCLIPConfig.from_dict({**bare, "transformerDimSize": 1024, "imageDimSize": 640})
    assert alias.numDims == 640
    both = MCLIPConfig.from_dict({**raw, "imageDimSize": 640})
    assert both.numDims == 768  # a saved field wins over the constructor name, as in transformers


def test_parameter_names_match_transformers(model):
    names = {name for name, _ in model.parameters_and_names()}
    for key in ("transformer.embeddings.word_embeddings.weight", "transformer.embeddings.LayerNorm.bias",
                "transformer.encoder.layer.1.attention.self.value.weight",
                "transformer.encoder.layer.0.attention.output.LayerNorm.weight",
                "transformer.encoder.layer.0.intermediate.dense.weight", "transformer.pooler.dense.bias",
                "LinearTransformation.weight"):
        assert key in names


@pytest.mark.parametrize("change,message", [
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"transformerDimensions": 512}, "transformerDimensions"),
    ({"hidden_act": "tanh"}, "hidden_act"),
    ({"num_attention_heads": 5}, "divisible"),
    ({"is_decoder": True}, "is_decoder"),
    ({"numDims": 0}, "numDims"),
])
def test_rejects_unsupported_configs(change, message):
    raw = json.loads((CONFIGS / "kandinsky-2-1" / "text_encoder.json").read_text())
    with pytest.raises(ValueError, match=message):
        MCLIPConfig.from_dict({**raw, **change})
