"""Gradio's cache folder stays bounded (kandinsky_ui/cache.py): `python app.py --demo` with its own
GRADIO_TEMP_DIR and a 24 MB cache limit; a 100-step job's previews, uploads beyond the limit and
uploads that are not images, and non-image files refused by the inputs, naming the field."""
from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from kandinsky_ui import cache
from tests.ui.server import AppServer

LIMIT = 24 * 2**20
OWNER = "d" * 32
SETTLE_S = cache.PREVIEW_GRACE_S + 2 * cache.SWEEP_EVERY_S + 5   # retired files are gone by then


def tally(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def wait_until(check, timeout: float = SETTLE_S):
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.5)
    return check()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gradio-cache")


@pytest.fixture(scope="module")
def server(tmp_path_factory, cache_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(cache_dir))
        patch.setenv(cache.LIMIT_ENV, f"{LIMIT}")
        server = AppServer(tmp_path_factory.mktemp("disk-bounds"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


def upload(server, name: str, data: bytes) -> str:
    response = httpx.post(server.url + "gradio_api/upload", files={"files": (name, data)}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()[0]


def test_previews_of_a_100_step_job_do_not_pile_up(client, cache_dir):
    before = tally(cache_dir)
    job = client.submit(owner=OWNER, prompt="many previews", width=64, height=64, num_inference_steps=100,
                        prior_num_inference_steps=2, preview="fast", preview_every=1, seed=5, api_name="/text2img")
    job.result(timeout=600)
    outputs = job.outputs()
    previews = [update[2] for update in outputs if update[2] is not None and "Denoising: step" in update[1]]
    assert 'data-state="done"' in outputs[-1][1]
    assert len(previews) >= 50, len(previews)   # streamed (some updates may be merged)
    path = previews[-1]["path"] if isinstance(previews[-1], dict) else previews[-1]
    assert Path(path).suffix == ".webp" and Image.open(path).size == (256, 256)
    right_after = tally(cache_dir)
    # while it ran, only the last PREVIEW_GRACE_S seconds of previews were on disk, each a few kB
    assert right_after[1] - before[1] < 2 * 2**20, (before, right_after)
    assert wait_until(lambda: not list(cache_dir.glob("preview-*"))), sorted(cache_dir.glob("preview-*"))
    files, size = tally(cache_dir)
    # what is left: the result shown in the preview and the gallery's copy of the saved image
    assert files - before[0] <= 4 and size - before[1] < 2**20, (before, (files, size))


def noise_png(seed: int, side: int = 1400) -> bytes:
    """An uncompressed noise PNG of about 6 MB (side 1400), different for each seed."""
    from io import BytesIO

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def test_uploads_beyond_the_limit_and_non_images_are_deleted(server, cache_dir):
    junk = [upload(server, f"junk{i}.png", os.urandom(2**20)) for i in range(3)]  # any name, not an image
    images = [upload(server, f"photo{i}.png", noise_png(i)) for i in range(6)]
    assert tally(cache_dir)[1] > LIMIT  # 6 x 5.6 MB + 3 MB of junk, kept by Gradio until the sweep
    assert wait_until(lambda: tally(cache_dir)[1] <= LIMIT), tally(cache_dir)
    assert not any(Path(path).exists() for path in junk)
    assert Path(images[-1]).exists() and not Path(images[0]).exists()  # the oldest went first
    files, size = tally(cache_dir)
    assert size <= LIMIT and files < 20, (files, size)


def test_a_file_that_is_not_an_image_is_refused_naming_the_field(client, cache_dir, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_bytes(b"MZ this is no image " + os.urandom(4096))
    with pytest.raises(Exception, match=r"image: not an image file that can be read \(PNG, JPEG, WebP"):
        client.predict(owner=OWNER, prompt="x", image=handle_file(str(fake)), width=64, height=64,
                       num_inference_steps=2, prior_num_inference_steps=2, api_name="/img2img")
    with pytest.raises(Exception, match="depth: not an image file"):
        client.predict(owner=OWNER, prompt="x", depth=handle_file(str(fake)), width=64, height=64,
                       num_inference_steps=2, prior_num_inference_steps=2, api_name="/controlnet")
    with pytest.raises(Exception, match=r"file: not a PNG file \(it does not start with the PNG signature\)"):
        client.predict(file=handle_file(str(fake)), api_name="/png_info")
    # refused files are deleted from the cache at once, not at the next sweep
    assert not [p for p in cache_dir.rglob("holiday.png")]


def test_the_sweep_deletes_oldest_first_and_only_this_apps_files_in_the_folder(tmp_path):
    from types import SimpleNamespace

    folder, outside = tmp_path / "cache", tmp_path / "outputs"
    files = {}
    for i, name in enumerate(["old", "kept", "mid", "new", "stranger"]):
        path = folder / f"h{i}" / f"{name}.png"
        path.parent.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(path)
        path.write_bytes(path.read_bytes() + bytes(1000))   # ~1.1 kB each, still an image
        os.utime(path, (1000 + i, 1000 + i))
        files[name] = path
    outside.mkdir()
    elsewhere = outside / "image.png"
    elsewhere.write_bytes(files["old"].read_bytes())
    os.utime(elsewhere, (1, 1))
    junk = folder / "j" / "upload.png"
    junk.parent.mkdir()
    junk.write_bytes(b"not an image")
    component = SimpleNamespace(keep_in_cache={str(files["kept"])})
    uploads = {str(junk)}
    blocks = SimpleNamespace(upload_file_set=uploads, blocks={1: component},
                             temp_file_sets=[uploads, {str(files[n]) for n in ("old", "kept", "mid", "new")}
                                             | {str(elsewhere)}])
    size = files["new"].stat().st_size
    bound = cache.CacheBound(blocks, limit=int(1.5 * size), folder=folder.resolve())
    count, freed = bound.sweep()
    assert not junk.exists() and not junk.parent.exists()              # not an image: deleted, folder too
    assert not files["old"].exists() and not files["mid"].exists()     # oldest first, down to the limit
    assert files["new"].exists() and files["kept"].exists()            # newest kept; a component's file kept
    assert files["stranger"].exists() and elsewhere.exists()           # not this app's / not in the folder
    assert count == 3 and freed == 2 * size + len(b"not an image")
    assert str(files["old"]) not in blocks.temp_file_sets[1] and str(junk) not in uploads
    # previews: each job's earlier preview retired, the last one when the job ends
    job = bound.follow_previews()
    first = job.add(Image.new("RGB", (256, 256), "red"))
    second = job.add(Image.new("RGB", (256, 256), "blue"))
    assert Path(first).suffix == ".webp" and Path(first).stat().st_size < 4096
    job.close()
    assert [path for _, path in bound._retired] == [first, second]
    bound._retired = [(0.0, path) for _, path in bound._retired]
    bound.sweep()
    assert not Path(first).exists() and not Path(second).parent.exists()
