"""A saved PNG names its model's folders by repo id, or a local folder by its name only: never an
absolute path of the server (issue 16, item 9). Old PNGs that stored paths still read."""
import json
from pathlib import Path

import pytest
from PIL import Image

from backend.events import Result
from backend.families import FAMILIES, public_source
from backend.metadata import JSON_CHUNK, encode_png, read_png_texts, read_settings
from backend.requests import Image2ImageRequest, Text2ImageRequest

OWNER = "3c" * 16


def strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("source, public", [
    ("kandinsky-community/kandinsky-2-2-decoder", "kandinsky-community/kandinsky-2-2-decoder"),
    ("depth-anything/Depth-Anything-V2-Small-hf", "depth-anything/Depth-Anything-V2-Small-hf"),
    ("/srv/models/kandinsky-2-2-decoder", "kandinsky-2-2-decoder"),
    ("/srv/models/kandinsky-2-2-decoder/", "kandinsky-2-2-decoder"),
    (Path("/tmp/x/kandinsky-2-2-demo-v3/prior"), "prior"),
    ("C:\\Users\\me\\models\\kandinsky-3", "kandinsky-3"),
    ("../models/kandinsky-2-1", "kandinsky-2-1"),
])
def test_public_source_keeps_repo_ids_and_names_a_local_folder_only(source, public):
    assert public_source(source) == public


def test_a_relative_local_folder_is_named_not_pathed(tmp_path, monkeypatch):
    (tmp_path / "models" / "kandinsky-2-2-decoder").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert public_source("models/kandinsky-2-2-decoder") == "kandinsky-2-2-decoder"


def test_a_models_dir_folder_is_stored_by_its_name_and_the_other_roles_by_repo(tmp_path):
    local = tmp_path / "models" / "kandinsky-2-2-decoder"
    local.mkdir(parents=True)
    (local / "model_index.json").write_text("{}")
    spec = FAMILIES["2.2"].published_model(tmp_path / "models")
    assert spec.repos["decoder"] == str(local)
    public = spec.public_repos()
    assert public["decoder"] == "kandinsky-2-2-decoder"
    assert public["prior"] == "kandinsky-community/kandinsky-2-2-prior"
    assert public["depth_estimator"] == "depth-anything/Depth-Anything-V2-Small-hf"


def test_saved_pngs_carry_no_absolute_path_of_the_machine(engine, demo_root, tmp_path):
    image = Image.open("assets/samples/landscape.png")
    requests = [Text2ImageRequest(model="kandinsky-2-2-demo", prompt="a red cat", width=64, height=64,
                                  num_inference_steps=2, prior_num_inference_steps=2, seed=1),
                Image2ImageRequest(model="kandinsky-2-2-demo", prompt="a red cat", width=64, height=64,
                                   num_inference_steps=2, prior_num_inference_steps=2, seed=2, image=image)]
    forbidden = [str(Path(demo_root).resolve()), str(Path(engine.store.root).resolve()), str(Path(demo_root)),
                 str(engine.store.root), str(Path(demo_root).parent.parent), str(Path.cwd())]
    for request in requests:
        end = engine.submit(request, OWNER).wait(timeout=300)
        assert isinstance(end, Result), end
        (generated,) = end.images
        texts = read_png_texts(generated.path)
        assert set(texts) == {"parameters", JSON_CHUNK}
        for text in texts.values():
            for path in forbidden:
                assert path not in text
        stored = json.loads(texts[JSON_CHUNK])
        assert stored["repos"] == {role: role for role in
                                   ("prior", "decoder", "inpaint", "controlnet", "depth_estimator")}
        assert not [s for s in strings(stored) if s.startswith(("/", "\\")) or s[1:3] == ":\\"]
        assert read_settings(generated.path)["task"] == request.task


def test_an_old_png_with_absolute_repo_paths_still_reads(tmp_path):
    settings = {"task": "text2img", "model": "kandinsky-2-2-demo", "prompt": "a red cat", "seed": 4,
                "width": 64, "height": 64, "repos": {"decoder": "/tmp/pytest-of-root/demo/decoder"}}
    path = tmp_path / "old.png"
    path.write_bytes(encode_png(Image.new("RGB", (8, 8)), settings))
    read = read_settings(path)
    assert read["prompt"] == "a red cat" and read["seed"] == 4 and read["repos"] == settings["repos"]
