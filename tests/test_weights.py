"""Strict, loud weight loading: every failure names the file and the tensor."""
import json
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn
from safetensors.numpy import save_file

from backend import weights
from backend.nn import GroupNorm, Linear
from backend.pipelines import KandinskyV22Pipeline

FIXTURES = Path(__file__).parent / "fixtures" / "pipelines"


class Attention(nn.Cell):
    def __init__(self):
        super().__init__()
        self.group_norm = GroupNorm(2, 4)
        self.to_q = Linear(4, 4)
        self.to_out = nn.CellList([Linear(4, 4)])


class Tiny(nn.Cell):
    @classmethod
    def from_config(cls, config):
        return cls()

    def __init__(self):
        super().__init__()
        self.attn = Attention()


def state(prefix="attn.", q="to_q", out="to_out.0"):
    rng = np.random.default_rng(0)
    return {f"{prefix}group_norm.weight": rng.standard_normal(4).astype(np.float32),
            f"{prefix}group_norm.bias": rng.standard_normal(4).astype(np.float32),
            f"{prefix}{q}.weight": rng.standard_normal((4, 4)).astype(np.float32),
            f"{prefix}{q}.bias": rng.standard_normal(4).astype(np.float32),
            f"{prefix}{out}.weight": rng.standard_normal((4, 4)).astype(np.float32),
            f"{prefix}{out}.bias": rng.standard_normal(4).astype(np.float32)}


def write(folder: Path, tensors: dict, name="diffusion_pytorch_model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    save_file(tensors, str(folder / name))
    return folder / name


def test_loads_every_parameter(tmp_path):
    tensors = state()
    write(tmp_path, tensors)
    model = weights.load_model(Tiny, tmp_path)
    for key, param in model.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), tensors[key])


def test_legacy_attention_names_are_converted(tmp_path):
    write(tmp_path, state(q="query", out="proj_attn"))
    model = weights.load_model(Tiny, tmp_path)
    np.testing.assert_array_equal(model.attn.to_q.weight.asnumpy(), state()["attn.to_q.weight"])


def test_unexpected_key_is_named(tmp_path):
    tensors = state()
    tensors["attn.extra.weight"] = np.zeros(3, np.float32)
    path = write(tmp_path, tensors)
    with pytest.raises(weights.WeightsError, match=r"attn\.extra\.weight") as error:
        weights.load_model(Tiny, tmp_path)
    assert str(path) in str(error.value)


def test_missing_key_is_named(tmp_path):
    tensors = state()
    del tensors["attn.to_q.bias"]
    write(tmp_path, tensors)
    with pytest.raises(weights.WeightsError, match=r"missing.*attn\.to_q\.bias"):
        weights.load_model(Tiny, tmp_path)


def test_wrong_shape_is_named(tmp_path):
    tensors = state()
    tensors["attn.to_q.weight"] = np.zeros((4, 5), np.float32)
    path = write(tmp_path, tensors)
    with pytest.raises(weights.WeightsError, match=r"attn\.to_q\.weight.*\(4, 5\).*\(4, 4\)") as error:
        weights.load_model(Tiny, tmp_path)
    assert str(path) in str(error.value)


def test_nan_weights_are_refused(tmp_path):
    tensors = state()
    tensors["attn.to_q.bias"][1] = np.nan
    write(tmp_path, tensors)
    with pytest.raises(weights.WeightsError, match=r"attn\.to_q\.bias.*NaN"):
        weights.load_model(Tiny, tmp_path)


def test_truncated_and_corrupt_files(tmp_path):
    path = write(tmp_path, state())
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(weights.WeightsError, match="truncated") as error:
        weights.load_model(Tiny, tmp_path)
    assert str(path) in str(error.value)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(weights.WeightsError, match="corrupt header|not a safetensors"):
        weights.load_model(Tiny, tmp_path)
    path.write_bytes(b"")
    with pytest.raises(weights.WeightsError, match="truncated or empty"):
        weights.load_model(Tiny, tmp_path)


def test_missing_weights_and_config(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(weights.WeightsError, match="no \\*.safetensors"):
        weights.load_model(Tiny, tmp_path)
    with pytest.raises(weights.WeightsError, match="missing config file"):
        weights.load_model(Tiny, tmp_path / "nowhere")


def test_fp16_variant_and_half_precision(tmp_path):
    tensors = state()
    write(tmp_path, {k: v + 1 for k, v in tensors.items()})
    write(tmp_path, {k: v.astype(np.float16) for k, v in tensors.items()},
          name="diffusion_pytorch_model.fp16.safetensors")
    plain = weights.load_model(Tiny, tmp_path)
    np.testing.assert_allclose(plain.attn.to_q.weight.asnumpy(), tensors["attn.to_q.weight"] + 1)
    variant = weights.load_model(Tiny, tmp_path, variant="fp16")
    assert variant.attn.to_q.weight.dtype == ms.float32  # fp16 file, fp32 model: widened
    np.testing.assert_allclose(variant.attn.to_q.weight.asnumpy(), tensors["attn.to_q.weight"], atol=1e-3)
    half = weights.load_model(Tiny, tmp_path, dtype="float16", variant="fp16")
    assert half.attn.to_q.weight.dtype == ms.float16


def test_bf16_tensors_are_read(tmp_path):
    tensors = state()
    path = write(tmp_path, tensors)
    header, start = weights.read_safetensors_header(path)
    # Rewrite one float32 tensor as bfloat16 words (the top 16 bits of each float32).
    bits = tensors["attn.to_q.weight"].view(np.uint32) >> 16
    bf16 = {k: v for k, v in tensors.items() if k != "attn.to_q.weight"}
    save_file(bf16, str(path))
    header, start = weights.read_safetensors_header(path)
    header["attn.to_q.weight"] = {"dtype": "BF16", "shape": [4, 4],
                                  "data_offsets": [path.stat().st_size - start, path.stat().st_size - start + 32]}
    raw = path.read_bytes()[start:] + bits.astype(np.uint16).tobytes()
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw)
    model = weights.load_model(Tiny, tmp_path)
    np.testing.assert_allclose(model.attn.to_q.weight.asnumpy(), tensors["attn.to_q.weight"], rtol=1e-2)


def test_repo_id_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(weights.WeightsError, match="huggingface-cli download") as error:
        weights.resolve_pretrained("kandinsky-community/kandinsky-2-2-decoder", cache_dir=tmp_path)
    assert "kandinsky-community/kandinsky-2-2-decoder" in str(error.value)
    with pytest.raises(weights.WeightsError, match="neither a local folder nor"):
        weights.resolve_pretrained("no/such/thing")


def test_pipeline_from_hf_cache_layout(tmp_path, monkeypatch):
    """A repo id resolves to the standard Hugging Face cache snapshot when offline."""
    import shutil

    repo = tmp_path / "models--kandinsky-community--kandinsky-2-2-decoder"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(FIXTURES / "kandinsky-2-2-decoder-tiny", snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    progress = []
    pipe = KandinskyV22Pipeline.from_pretrained("kandinsky-community/kandinsky-2-2-decoder", cache_dir=tmp_path,
                                                on_progress=lambda name, done, total: progress.append(name))
    assert pipe.unet.config.in_channels == 4
    assert {"unet", "movq"} <= set(progress)


def test_missing_component_names_the_index(tmp_path):
    import shutil

    shutil.copytree(FIXTURES / "kandinsky-2-2-decoder-tiny", tmp_path / "repo")
    shutil.rmtree(tmp_path / "repo" / "movq")
    with pytest.raises(weights.WeightsError, match="movq"):
        KandinskyV22Pipeline.from_pretrained(tmp_path / "repo")


def test_download_patterns_fetch_kandinsky_3s_fp16_shards_and_nothing_else():
    """kandinsky-community/kandinsky-3 ships fp16 files only, the T5 encoder in five shards."""
    from fnmatch import fnmatch

    repo_files = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/spiece.model",
                  "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
                  "text_encoder/config.json", "text_encoder/model.safetensors.index.fp16.json",
                  *[f"text_encoder/model.fp16-0000{i}-of-00005.safetensors" for i in range(1, 6)],
                  "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
                  "movq/config.json", "movq/diffusion_pytorch_model.fp16.safetensors",
                  "unet/diffusion_pytorch_model.fp16.bin", "README.md"]

    def fetched(variant):
        allow, ignore = weights.download_patterns(variant)
        return {f for f in repo_files if any(fnmatch(f, p) for p in allow)
                and not any(fnmatch(f, p) for p in ignore or [])}

    assert fetched("fp16") == set(repo_files) - {"unet/diffusion_pytorch_model.fp16.bin", "README.md"}
    # without the variant only configs come: the manager asks for fp16 for this repo
    assert not any(f.endswith(".safetensors") for f in fetched(None))
    from backend.families import CATALOGUE
    assert CATALOGUE["kandinsky-3"].variant == "fp16" and CATALOGUE["kandinsky-2-2"].variant is None


def test_nan_in_a_large_tensor_is_found_in_any_share_of_the_parallel_check():
    """Tensors over FINITE_CHECK_CHUNK elements are checked in shares over the cores."""
    size = weights.FINITE_CHECK_CHUNK * 3 + 5
    for position in (0, weights.FINITE_CHECK_CHUNK + 1, size - 1):
        array = np.ones(size, np.float32)
        assert weights._all_finite(array)
        array[position] = np.nan
        assert not weights._all_finite(array)
        array[position] = np.inf
        assert not weights._all_finite(array)
    big = np.full(size, 3e38, np.float32)   # finite, but the sum overflows: checked element-wise
    assert weights._all_finite(big)
