"""Bad input, through every tab of the running app (`python app.py --demo`, gradio_client) and
through the library API: each case either works or gets a message naming the field; either way
the job ends, nothing is left running, and the next job succeeds.

gradio_client refuses to send NaN or infinite numbers and lone surrogates (its JSON encoder
forbids them), so those cases go through the plain HTTP API (`/gradio_api/call/<name>`), as any
other client may.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
from gradio_client import handle_file
from PIL import Image

from backend.metadata import read_settings
from tests.ui.server import ROOT

SAMPLES = ROOT / "assets" / "samples"
OWNER = "5" * 32          # the cases below each use their own owner: galleries stay small
TINY = dict(width=64, height=64, num_inference_steps=2, prior_num_inference_steps=2, preview="off")
LANDSCAPE = SAMPLES / "landscape.png"


# ------------------------------------------------------------------------------ files


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int, extra_chunks: bytes = b"") -> bytes:
    """A valid-looking PNG whose header claims width x height pixels, with almost no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra_chunks
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def make_files(folder: Path) -> dict[str, Path]:
    files = {}

    def put(name, data):
        path = folder / name
        if isinstance(data, Image.Image):
            data.save(path)
        else:
            path.write_bytes(data)
        files[name] = path

    good = io.BytesIO()
    Image.open(LANDSCAPE).convert("RGB").resize((64, 64)).save(good, format="PNG")
    put("corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    put("corrupt.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x13\x37" * 500)
    put("empty.png", b"")
    put("truncated.png", good.getvalue()[: len(good.getvalue()) // 2])
    put("text.png", b"this is not an image, only text with a .png name\n")
    put("zero.png", png_claiming(0, 0))
    put("bomb.png", png_claiming(20000, 20000))           # 400 megapixels: PIL's own limit refuses it
    put("large.png", png_claiming(9000, 9000))            # 81 megapixels: beyond the app's 67
    gradient = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)
    put("depth16.png", Image.fromarray(gradient, "I;16"))
    rgb = Image.open(LANDSCAPE).convert("RGB").resize((64, 64))
    put("cmyk.jpg", rgb.convert("CMYK"))
    put("jpeg.png", files["cmyk.jpg"].read_bytes())
    palette = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    put("palette.png", palette)
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize((64, 64)))
    put("alpha.png", rgba)
    put("onebit.png", rgb.convert("1"))
    put("la.png", rgb.convert("LA"))
    mask = Image.new("L", (32, 48))
    mask.paste(255, (8, 12, 24, 36))
    put("mask_small.png", mask)
    put("mask_rgb.png", Image.merge("RGB", (mask, mask, Image.new("L", mask.size))))
    half = Image.new("RGBA", (64, 64), (255, 255, 255, 255))
    half.paste((255, 255, 255, 0), (32, 0, 64, 64))           # right half transparent: keep
    put("mask_alpha.png", half)
    put("mask_black.png", Image.new("L", (64, 64), 0))
    put("mask_white.png", Image.new("L", (64, 64), 255))
    sixteen = np.full((64, 64), 20000, np.uint16)               # 78 of 255: keep (below the 128 threshold)
    sixteen[16:48, 16:48] = 65535                               # repaint
    put("mask16.png", Image.fromarray(sixteen, "I;16"))
    # PNG info: a zTXt chunk of 1 kB that unpacks to 64 MB, a 2 MB text chunk, settings on a "bomb"
    put("ztxt_bomb.png", png_claiming(8, 8, _chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"a" * (64 << 20), 9))))
    put("text_2mb.png", png_claiming(8, 8, _chunk(b"tEXt", b"parameters\0" + b"b" * (2 << 20))))
    settings = json.dumps({"prompt": "read without decoding", "seed": 5, "task": "text2img"}).encode()
    put("bomb_with_settings.png", png_claiming(20000, 20000, _chunk(b"iTXt", b"kandinsky_studio\0\0\0\0\0" + settings)))
    return files


# ------------------------------------------------------------------------------ the app


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("files"))


def raw_call(server, client, api: str, **kwargs):
    """Call a named endpoint over plain HTTP with JSON that may hold NaN/Infinity.
    Returns ("complete", data) or ("error", message)."""
    endpoint = client.view_api(print_info=False, return_format="dict")["named_endpoints"][f"/{api}"]
    data = [kwargs.pop(p["parameter_name"], p.get("parameter_default")) for p in endpoint["parameters"]]
    assert not kwargs, f"unknown parameters {sorted(kwargs)}"
    request = urllib.request.Request(f"{server.url}gradio_api/call/{api}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{server.url}gradio_api/call/{api}/{event_id}", timeout=120) as response:
        stream = response.read().decode()
    last_event, last_data = None, None
    for line in stream.splitlines():
        if line.startswith("event:"):
            last_event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            last_data = json.loads(line.split(":", 1)[1])
    if last_event == "error":
        return "error", (last_data or {}).get("error") if isinstance(last_data, dict) else str(last_data)
    return last_event, last_data


def upload(server, path: Path) -> dict:
    """Upload a file over plain HTTP; returns the FileData payload that refers to it."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{server.url}gradio_api/upload", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        (uploaded,) = json.loads(response.read())
    return {"path": uploaded, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def owner_for(case: str) -> str:
    return hashlib.md5(case.encode()).hexdigest()


def newest(server, owner: str) -> Path:
    return server.owner_images()[owner][0]


def input_image(path: Path, name: str) -> Image.Image:
    """An input image stored next to the output `path` (referenced from its settings)."""
    reference = read_settings(path)["input_images"][name]
    return Image.open(path.parent / reference)


def done(result) -> bool:
    return 'data-state="done"' in result[1]


def server_is_idle(client, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "running: none · waiting: 0" in client.predict(api_name="/models_status"):
            return True
        time.sleep(0.05)
    return False


# Each case: (name, how to call, what must come back). `call(ctx)` returns the final update, or
# raises; `error` is the text the message must contain (naming the field), None when it must work.
def _edit(background, **kw):
    return dict(editor={"background": handle_file(str(background)), "layers": [], "composite": None}, **kw)


def _img2img(files, name, **kw):
    return {"api": "/img2img", "prompt": "x", "image": handle_file(str(files[name])), "strength": 0.5, **kw}


def _controlnet(files, depth=None, **kw):
    args = {"api": "/controlnet", "prompt": "x", **kw}
    if depth is not None:
        args["depth"] = handle_file(str(files[depth]))
    return args


def _inpaint(files, mask, **kw):
    return {"api": "/inpaint", "prompt": "x", "mask_upload": handle_file(str(files[mask])), **_edit(LANDSCAPE), **kw}


def _interp(**kw):
    base = dict(api="/interpolate", input_count=2, kind_1="Text", text_1="a cat", kind_2="Text", text_2="a dog",
                weight_1=0.5, weight_2=0.5)
    base.update(kw)
    return base


def _text(**kw):
    return {"api": "/text2img", "prompt": "x", **kw}


def _raw(api, **kw):
    return dict(raw=api, **kw)


CONTROL = "nul\x00 esc\x1b[31m bell\x07 cr\r tab\t del\x7f nel\x85 ls\u2028 rlo\u202e end"
RTL = "قطة حمراء في الثلج \u200f חתול אדום בשלג"
EMOJI = "🦊🔥❄️ 👩🏽‍🚀 🇺🇦 a fox"

CASES = {
    # --- broken files, every image input
    "corrupt PNG -> img2img image": (lambda f: _img2img(f, "corrupt.png"), "image:"),
    "corrupt JPEG -> controlnet depth": (lambda f: _controlnet(f, "corrupt.jpg"), "depth:"),
    "empty file -> interpolate image_2": (lambda f: _interp(kind_2="Image",
                                                            image_2=handle_file(str(f["empty.png"]))), "image_2:"),
    "truncated PNG -> controlnet_image": (lambda f: _controlnet(f, "depth16.png", controlnet_mode="Image to image",
                                                                controlnet_image=handle_file(str(f["truncated.png"]))),
                                          "controlnet_image:"),
    "text file named .png -> img2img": (lambda f: _img2img(f, "text.png"), "image:"),
    "zero-size PNG (0x0 header) -> img2img": (lambda f: _img2img(f, "zero.png"), "image:"),
    "20000x20000 header (decompression bomb) -> img2img": (lambda f: _img2img(f, "bomb.png"),
                                                           "image: the image has more"),
    "9000x9000 header -> controlnet depth": (lambda f: _controlnet(f, "large.png"), "depth: the image is 9000x9000"),
    "corrupt editor background -> inpaint": (lambda f: _inpaint(f, "mask_white.png", **_edit(f["corrupt.png"])),
                                             "editor:"),
    "corrupt mask -> inpaint": (lambda f: _inpaint(f, "corrupt.png"), "mask_upload:"),
    "inpaint without an image": (lambda f: dict(api="/inpaint", prompt="x",
                                                mask_upload=handle_file(str(f["mask_white.png"]))),
                                 "image is required"),
    "img2img without an image": (lambda f: dict(api="/img2img", prompt="x"), "image is required"),
    "controlnet without a depth map": (lambda f: _controlnet(f), "hint is required"),
    "controlnet img2img without a start image": (lambda f: _controlnet(f, "depth16.png",
                                                                       controlnet_mode="Image to image"),
                                                 "image is required"),
    # --- odd but valid image modes: they work
    "CMYK JPEG -> img2img": (lambda f: _img2img(f, "cmyk.jpg"), None),
    "16-bit depth map -> controlnet": (lambda f: _controlnet(f, "depth16.png"), None),
    "palette PNG with transparency -> interpolate": (lambda f: _interp(kind_2="Image",
                                                                       image_2=handle_file(str(f["palette.png"]))),
                                                     None),
    "RGBA with alpha -> img2img": (lambda f: _img2img(f, "alpha.png"), None),
    "1-bit image -> controlnet depth": (lambda f: _controlnet(f, "onebit.png"), None),
    "grey + alpha editor background -> inpaint": (lambda f: _inpaint(f, "mask_small.png", **_edit(f["la.png"])), None),
    "16-bit editor background -> inpaint": (lambda f: _inpaint(f, "mask_small.png", **_edit(f["depth16.png"])), None),
    # --- masks
    "mask of another size": (lambda f: _inpaint(f, "mask_small.png"), None),
    "mask in RGB colours": (lambda f: _inpaint(f, "mask_rgb.png"), None),
    "mask with transparency": (lambda f: _inpaint(f, "mask_alpha.png"), None),
    "16-bit mask": (lambda f: _inpaint(f, "mask16.png"), None),
    "all-black mask": (lambda f: _inpaint(f, "mask_black.png"), "mask is empty"),
    "all-black mask, inverted": (lambda f: _inpaint(f, "mask_black.png", mask_invert=True), None),
    "all-white mask": (lambda f: _inpaint(f, "mask_white.png"), None),
    "mask_grow -1": (lambda f: _inpaint(f, "mask_white.png", mask_grow=-1), "mask_grow"),
    "mask_blur 10000": (lambda f: _inpaint(f, "mask_white.png", mask_blur=10000), "mask_blur"),
    # --- texts
    "prompt of 10,000 characters": (lambda f: _text(prompt="a red fox " * 1000), None),
    "prompt of 10,001 characters": (lambda f: _text(prompt="x" * 10_001), "prompt is 10001 characters long"),
    "negative prompt of 1,000,000 characters": (lambda f: _text(negative_prompt="y" * 1_000_000),
                                                "negative_prompt is 1000000 characters long"),
    "emoji prompt": (lambda f: _text(prompt=EMOJI), None),
    "right-to-left prompt": (lambda f: _text(prompt=RTL, negative_prompt=RTL), None),
    "control characters in prompts": (lambda f: _text(prompt=CONTROL, negative_prior_prompt=CONTROL), None),
    "lone surrogate in the prompt": (lambda f: _raw("text2img", prompt="half an emoji \ud83e"),
                                     "prompt is not valid Unicode"),
    "interpolation text of 20,000 characters": (lambda f: _interp(text_1="z" * 20_000),
                                                "inputs[0] is 20000 characters"),
    "interpolation: empty text": (lambda f: _interp(text_1="   "), "inputs[0] is an empty text"),
    # --- numbers
    "width 0": (lambda f: _text(width=0), "width:"),
    "height 100000": (lambda f: _text(height=100_000), "height:"),
    "width not a multiple of 64": (lambda f: _text(width=100), "width must be a multiple of 64"),
    "width 'abc'": (lambda f: _raw("text2img", prompt="x", width="abc"), "width:"),
    # text in a number field through gradio_client: the field and its range, not Python's comparison error
    "width 'x' (gradio_client)": (lambda f: _text(width="x"), "width: must be a number between 64 and 2048; got 'x'"),
    "seed 'abc' (gradio_client)": (lambda f: _text(seed="abc"), "seed: must be a finite whole number; got 'abc'"),
    "guidance [4] (gradio_client)": (lambda f: _text(guidance_scale=[4]), "guidance_scale: must be a number between"),
    "strength 'half' (gradio_client)": (lambda f: _img2img(f, "cmyk.jpg", strength="half"),
                                        "strength: must be a number between 0 and 1; got 'half'"),
    "mask_grow 'abc' (gradio_client)": (lambda f: _inpaint(f, "mask_white.png", mask_grow="abc"),
                                        "mask_grow: must be a number between 0 and 64"),
    "interpolation: input_count 'two'": (lambda f: _interp(input_count="two"), "input_count: must be a number"),
    "seed -inf": (lambda f: _raw("text2img", prompt="x", seed=float("-inf")), "seed: must be a finite whole number"),
    "guidance NaN": (lambda f: _raw("text2img", prompt="x", guidance_scale=float("nan")), "guidance_scale"),
    "guidance +inf": (lambda f: _raw("text2img", prompt="x", guidance_scale=float("inf")), "guidance_scale"),
    "prior guidance -inf": (lambda f: _raw("text2img", prompt="x", prior_guidance_scale=float("-inf")),
                            "prior_guidance_scale"),
    "guidance 1e30": (lambda f: _text(guidance_scale=1e30), "guidance_scale"),
    "steps -5": (lambda f: _text(num_inference_steps=-5), "num_inference_steps"),
    "steps NaN": (lambda f: _raw("text2img", prompt="x", num_inference_steps=float("nan")), "num_inference_steps"),
    "steps 1e9": (lambda f: _text(num_inference_steps=1e9), "num_inference_steps"),
    "prior steps 1": (lambda f: _text(prior_num_inference_steps=1), "prior_num_inference_steps"),
    "seed 2**32": (lambda f: _text(seed=2**32), "seed"),
    "seed 2**64": (lambda f: _text(seed=2**64), "seed"),
    "seed NaN": (lambda f: _raw("text2img", prompt="x", seed=float("nan")), "seed"),
    "seed -7 (random)": (lambda f: _text(seed=-7), None),
    "batch count 0": (lambda f: _text(batch_count=0), "batch_count"),
    "batch size 1000": (lambda f: _text(batch_size=1000), "batch_size"),
    "strength 1.5": (lambda f: _img2img(f, "cmyk.jpg", strength=1.5), "strength"),
    "controlnet strength NaN": (lambda f: _raw("controlnet", prompt="x", controlnet_strength=float("nan"),
                                               controlnet_mode="Image to image",
                                               files={"depth": f["depth16.png"], "controlnet_image": f["cmyk.jpg"]}),
                                "strength must be between 0.0 and 1.0; got nan"),
    "interpolation weights all zero": (lambda f: _interp(weight_1=0, weight_2=0), "weights must not all be zero"),
    "interpolation weight NaN": (lambda f: _raw("interpolate", weight_1=float("nan")), "weights[0]"),
    "interpolation: 7 inputs": (lambda f: _interp(input_count=7), "input_count"),
    "interpolation: walk of 1": (lambda f: _interp(walk_steps=1), "walk_steps"),
    "interpolation: image input without an image": (lambda f: _interp(kind_2="Image"), "inputs[1] is an image input"),
    # --- choices
    "unknown scheduler": (lambda f: _text(scheduler="euler_a"), "scheduler"),
    "unknown model": (lambda f: _text(model="stable-diffusion"), "model"),
    "unknown preview mode": (lambda f: _text(preview="sometimes"), "preview"),
    "unknown controlnet mode": (lambda f: _controlnet(f, "depth16.png", controlnet_mode="sideways"), "controlnet_mode"),
    "unknown interpolation kind": (lambda f: _interp(kind_1="Video"), "kind_1"),
    # --- PNG info and the models panel
    "PNG info: corrupt file": (lambda f: dict(api="/png_info", file=handle_file(str(f["corrupt.png"]))),
                               "cannot read the PNG's settings"),
    "PNG info: a JPEG file": (lambda f: dict(api="/png_info", file=handle_file(str(f["cmyk.jpg"]))),
                              "file: Invalid file type"),
    "PNG info: JPEG named .png": (lambda f: dict(api="/png_info", file=handle_file(str(f["jpeg.png"]))),
                                  "not a PNG file"),
    "PNG info: zTXt that unpacks to 64 MB": (lambda f: dict(api="/png_info", file=handle_file(str(f["ztxt_bomb.png"]))),
                                              "unpacks to more than"),
    "PNG info: 2 MB text chunk": (lambda f: dict(api="/png_info", file=handle_file(str(f["text_2mb.png"]))),
                                  "text chunk is 2,097,163 bytes"),
    "PNG info: settings in a 20000x20000 PNG": (lambda f: dict(api="/png_info",
                                                               file=handle_file(str(f["bomb_with_settings.png"]))),
                                                None),
    "memory budget 'lots'": (lambda f: dict(api="/set_memory_budget", text="lots"), "memory budget"),
    "memory budget infGB": (lambda f: dict(api="/set_memory_budget", text="infGB"),
                            "memory budget must be a finite size like 12GB"),
    "memory budget nanGB": (lambda f: dict(api="/set_memory_budget", text="nanGB"),
                            "memory budget must be a finite size like 12GB"),
    "memory budget 1e999": (lambda f: dict(api="/set_memory_budget", text="1e999"), "memory budget must be a finite"),
    # a file input given something that is not a file (Gradio's pydantic check runs before our code)
    "img2img image: a plain string": (lambda f: dict(api="/img2img", prompt="x", image="notafile"),
                                      "image: must be an image file: a file as gradio_client's handle_file(path)"),
    "img2img image: path of the wrong type": (lambda f: dict(api="/img2img", prompt="x", image={"path": 5}),
                                              "image: must be an image file"),
    "controlnet depth: a dict without a path": (lambda f: _raw("controlnet", prompt="x", depth={"url": "x"}),
                                                "depth: must be an image file"),
    "interpolate image_2: a number": (lambda f: _interp(kind_2="Image", image_2=5), "image_2: must be an image file"),
    "inpaint editor: a plain string": (lambda f: dict(api="/inpaint", prompt="x", editor="notafile"),
                                       "editor: must be the image editor's value"),
    "inpaint editor: background not a file": (lambda f: dict(api="/inpaint", prompt="x",
                                                             editor={"background": 5, "layers": [], "composite": None}),
                                              "editor: must be the image editor's value"),
    "PNG info: file not a file": (lambda f: dict(api="/png_info", file="zzz"), "file: must be a file"),
    "memory budget -5GB": (lambda f: dict(api="/set_memory_budget", text="-5GB"), "memory budget must be positive"),
}


def call_case(server, client, spec: dict, owner: str):
    spec = dict(spec)
    if "raw" in spec:
        api = spec.pop("raw")
        for name, path in spec.pop("files", {}).items():
            spec[name] = upload(server, path)
        status, data = raw_call(server, client, api, owner=owner, **{**TINY, **spec})
        if status == "error":
            raise RuntimeError(data)
        assert status == "complete", (status, data)
        return data
    api = spec.pop("api")
    if api in ("/text2img", "/img2img", "/inpaint", "/interpolate", "/controlnet"):
        spec = {"owner": owner, **TINY, **spec}
    return client.predict(**spec, api_name=api)


def check_success(name: str, result, server, owner: str) -> None:
    """What a case that works must have produced."""
    if name.startswith("PNG info"):
        parameters, settings = result
        if "20000x20000" in name:
            assert '"prompt": "read without decoding"' in settings
        else:
            assert "no Kandinsky Studio or A1111 settings" in settings
        return
    assert done(result), result[1]
    path = newest(server, owner)
    settings = read_settings(path)
    if name == "prompt of 10,000 characters":
        assert settings["prompt"] == "a red fox " * 1000     # stored whole, though CLIP reads 77 tokens
        assert "dropped" in result[1] and len(result[1]) < 1500  # the note quotes the dropped part, bounded
    elif name == "emoji prompt":
        assert settings["prompt"] == EMOJI
    elif name == "right-to-left prompt":
        assert settings["prompt"] == RTL and settings["negative_prompt"] == RTL
    elif name == "control characters in prompts":
        assert settings["prompt"] == CONTROL and settings["negative_prior_prompt"] == CONTROL
    elif name == "seed -7 (random)":
        assert 0 <= int(result[4]) < 2**32 and settings["seed"] == int(result[4])
    elif name == "CMYK JPEG -> img2img":
        assert input_image(path, "image").mode == "RGB"
    elif name == "16-bit depth map -> controlnet":
        hint = np.asarray(input_image(path, "hint").convert("L"), np.float32)
        # scaled to 8 bits, not clipped: a 0..65535 ramp stays a ramp (clipped, almost all of it is 255)
        assert 110 < hint.mean() < 145 and hint[:, 0].max() < 10 and hint[:, -1].min() > 245, hint.mean()
    elif name == "mask of another size":
        mask = input_image(path, "mask")
        image = input_image(path, "image")
        assert mask.size == image.size
        box = mask.getbbox()
        assert box is not None and abs(box[0] / mask.width - 0.25) < 0.05 and abs(box[3] / mask.height - 0.75) < 0.05
    elif name == "mask with transparency":
        mask = np.asarray(input_image(path, "mask").convert("L"))
        assert mask[:, : mask.shape[1] // 2 - 2].min() == 255 and mask[:, mask.shape[1] // 2 + 2:].max() == 0
    elif name == "16-bit mask":
        mask = np.asarray(input_image(path, "mask").convert("L"))
        assert mask.max() == 255 and 60 < mask.min() < 100  # 20000/65535 scaled, not clipped to white


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_clear_answer_and_the_next_job_succeeds(name, server, client, files):
    build, error = CASES[name]
    spec = build(files)
    owner = owner_for(name)
    rss_before = psutil.Process(server.process.pid).memory_info().rss
    if error is None:
        result = call_case(server, client, spec, owner)
        check_success(name, result, server, owner)
    else:
        with pytest.raises(Exception) as caught:
            call_case(server, client, spec, owner)
        message = str(caught.value)
        assert error in message, message
        assert "Traceback" not in message and "Could not preprocess" not in message, message
        assert "validation error for" not in message and "not supported between" not in message, message
    if "bomb" in name or "9000" in name:  # refused from the header: nothing of that size was allocated
        grown = psutil.Process(server.process.pid).memory_info().rss - rss_before
        assert grown < 100 * 2**20, f"the server grew by {grown / 2**20:.0f} MB"
    # the job (if any) ended, nothing waits, and the next job works
    assert server_is_idle(client), client.predict(api_name="/models_status")
    result = client.predict(owner=owner, prompt="after " + name, seed=1234, **TINY, api_name="/text2img")
    assert done(result) and result[4] == "1234", result[1]
    assert read_settings(newest(server, owner))["prompt"] == "after " + name


def test_png_info_upload_limit(server, client, tmp_path):
    """Gradio refuses an upload over 50 MB before the reader sees it."""
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.write(png_claiming(8, 8))
        f.truncate(51 * 2**20)
    with pytest.raises(Exception, match="(?i)file.*(large|size)|exceeds"):
        client.predict(file=handle_file(str(big)), api_name="/png_info")
    assert done(client.predict(owner=OWNER, prompt="after the big upload", **TINY, api_name="/text2img"))


def test_the_engine_logged_no_crash(server):
    """Every case above was answered as bad input: the engine never logged an unexpected exception
    (Gradio itself logs a traceback for each message it shows, so those are not counted)."""
    log = server.log_text()
    assert "ERROR backend" not in log and "Exception in thread" not in log, log[-3000:]


# ------------------------------------------------------------------------------ library API


@pytest.fixture(scope="module")
def pipes():
    from backend.pipelines import (KandinskyV22Img2ImgPipeline, KandinskyV22InpaintPipeline, KandinskyV22Pipeline,
                                   KandinskyV22PriorPipeline)
    fixtures = ROOT / "tests" / "fixtures" / "pipelines"
    decoder = KandinskyV22Pipeline.from_pretrained(fixtures / "kandinsky-2-2-decoder-tiny")
    return {"prior": KandinskyV22PriorPipeline.from_pretrained(fixtures / "kandinsky-2-2-prior-tiny"),
            "decoder": decoder, "img2img": KandinskyV22Img2ImgPipeline(**decoder.components),
            "inpaint": KandinskyV22InpaintPipeline.from_pretrained(fixtures / "kandinsky-2-2-inpaint-tiny")}


EMBEDS = np.ones((1, 32), np.float32)
NEGATIVE = np.zeros((1, 32), np.float32)
SMALL = dict(height=64, width=64, num_inference_steps=2)


@pytest.mark.parametrize("prompt", ["a red fox " * 1000, EMOJI, RTL, CONTROL, ""],
                         ids=["10000 characters", "emoji", "right-to-left", "control characters", "empty"])
def test_library_prior_takes_any_text(pipes, prompt):
    embeds, negative = pipes["prior"](prompt, num_inference_steps=2, generator=np.random.default_rng(0))
    assert embeds.shape == (1, 32) and np.isfinite(embeds).all() and np.isfinite(negative).all()
    assert bool(pipes["prior"].truncated_text) == (len(prompt) > 1000)


def test_library_prior_refuses_a_lone_surrogate(pipes):
    with pytest.raises(ValueError, match="`prompt` is not valid Unicode"):
        pipes["prior"]("half an emoji \ud83e", num_inference_steps=2)
    with pytest.raises(ValueError, match="`negative_prompt` is not valid Unicode"):
        pipes["prior"]("fine", negative_prompt=["\udfff"], num_inference_steps=2)


@pytest.mark.parametrize("kwargs,field", [
    (dict(guidance_scale=float("nan")), "guidance_scale"), (dict(guidance_scale=-float("inf")), "guidance_scale"),
    (dict(num_inference_steps=-3), "num_inference_steps"), (dict(num_inference_steps=True), "num_inference_steps"),
    (dict(height=0), "height"), (dict(width=10**6), "width"), (dict(generator=42), "generator"),
])
def test_library_decoder_names_the_argument(pipes, kwargs, field):
    with pytest.raises(ValueError, match=field):
        pipes["decoder"](EMBEDS, NEGATIVE, **{**SMALL, **kwargs})


def test_library_huge_guidance_still_gives_valid_pixels(pipes):
    out = pipes["decoder"](EMBEDS, NEGATIVE, guidance_scale=1e30, output_type="np", **SMALL)[0]
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_library_zero_size_image(pipes):
    with pytest.raises(ValueError, match="`image` is empty"):
        pipes["img2img"](image_embeds=EMBEDS, negative_image_embeds=NEGATIVE, image=Image.new("RGB", (0, 0)),
                         strength=0.5, **SMALL)


@pytest.mark.parametrize("mask,ok", [
    (Image.new("L", (64, 64), 0), True), (Image.new("L", (64, 64), 255), True),
    (Image.new("RGBA", (17, 90), (255, 255, 255, 0)), True), (Image.new("I;16", (64, 64), 65535), True),
    (np.ones((64, 64), bool), True), (np.zeros((64, 64, 3), np.float32), False),
    (np.full((64, 64), np.nan, np.float32), False), ("mask.png", False),
])
def test_library_inpaint_masks(pipes, mask, ok):
    image = Image.open(LANDSCAPE).convert("RGB").resize((64, 64))
    call = lambda: pipes["inpaint"](image_embeds=EMBEDS, negative_image_embeds=NEGATIVE, image=image,  # noqa: E731
                                    mask_image=mask, output_type="np", **SMALL)[0]
    if ok:
        out = call()
        assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    else:
        with pytest.raises(ValueError, match="mask_image"):
            call()


def test_library_requests_name_the_field():
    """The typed requests the app builds (backend/requests.py) check the same things without the app."""
    from backend.requests import Image2ImageRequest, InpaintRequest, InterpolateRequest, Text2ImageRequest

    cases = [
        (Text2ImageRequest(prompt="x" * 10_001), "prompt is 10001 characters"),
        (Text2ImageRequest(negative_prior_prompt="\ud800"), "negative_prior_prompt is not valid Unicode"),
        (Text2ImageRequest(width=float("nan")), "width"), (Text2ImageRequest(height=float("inf")), "height"),
        (Text2ImageRequest(guidance_scale=1e30), "guidance_scale"), (Text2ImageRequest(seed=2**40), "seed"),
        (Text2ImageRequest(prior_num_inference_steps=1), "prior_num_inference_steps"),
        (Image2ImageRequest(image=Image.new("RGB", (0, 0))), "image is empty"),
        (Image2ImageRequest(image=Image.new("1", (9000, 9000))), "image is 9000x9000 pixels"),
        (Image2ImageRequest(image=b"\x89PNG"), "image is required"),
        (InpaintRequest(image=Image.new("RGB", (8, 8)), mask=np.ones((8, 8))), "mask is required"),
        (InterpolateRequest(inputs=["a", "\udc00"], weights=[1, 1]), "inputs[1] is not valid Unicode"),
        (InterpolateRequest(inputs=["a", "b"], weights=[1, float("nan")]), "weights[1]"),
    ]
    for request, message in cases:
        with pytest.raises(ValueError) as caught:
            request.validate()
        assert message in str(caught.value), (request, str(caught.value))
    Text2ImageRequest(prompt="🦊" * 10_000, negative_prompt=CONTROL).validate()  # at the limit: fine


def test_editor_images_sent_as_bytes_are_checked_too():
    """The browser may send a large editor image in pieces (bytes, no file): same checks."""
    import gradio as gr

    from kandinsky_ui import guards

    editor = guards.guard_image(gr.ImageEditor(type="pil", image_mode="RGBA"), "editor")
    with pytest.raises(gr.Error, match="editor: the image has more than"):
        editor.convert_and_format_image(png_claiming(20000, 20000))
    with pytest.raises(gr.Error, match="editor: the image is 9000x9000"):
        editor.convert_and_format_image(png_claiming(9000, 9000))
    sixteen = io.BytesIO()
    Image.new("I;16", (8, 8), 30000).save(sixteen, format="PNG")
    assert editor.convert_and_format_image(sixteen.getvalue()).getpixel((0, 0)) == (117, 117, 117, 255)


# ------------------------------------------------------------------------------ PNG info: "Use these settings"


def png_with_settings(path: Path, text: str) -> Path:
    """A small PNG whose Kandinsky Studio chunk holds `text` as it is (any JSON: NaN, Infinity, wrong types)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("kandinsky_studio", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


BAD_SETTINGS = {
    # before: each of these raised a bare Python error (IndexError, OverflowError, ValueError) at the user
    "weights shorter than inputs": ('{"task": "interpolate", "inputs": ["a", "b"], "weights": [1], "seed": 3}',
                                    "weights must be a list with one weight per input (2)"),
    "width Infinity": ('{"width": Infinity, "seed": 3}', "width must be an integer between 64 and 2048; got inf"),
    "height 1e999": ('{"height": 1e999, "seed": 3}', "height must be an integer between 64 and 2048; got inf"),
    "seed NaN": ('{"seed": NaN, "prompt": "p"}', "seed must be an integer between -1 and 4294967295; got nan"),
    "width text": ('{"width": "wide", "seed": 3}', "width must be an integer between 64 and 2048; got 'wide'"),
    # before: passed into the controls as they were
    "mask_grow text": ('{"task": "inpaint", "mask_grow": "abc", "seed": 3}', "mask_grow must be an integer between 0"),
    "guidance 1e30": ('{"guidance_scale": 1e30, "seed": 3}', "guidance_scale must be between 0.0 and 20.0"),
    "inputs a string": ('{"task": "interpolate", "inputs": "abc", "seed": 3}', "inputs must be a list of 2 to 6"),
    "weight text": ('{"task": "interpolate", "inputs": ["a", "b"], "weights": [1, "x"], "seed": 3}',
                    "weights[1] must be a number between 0.0 and 1.0; got 'x'"),
    "unknown sampler": ('{"scheduler": "LMS", "seed": 3}', "scheduler must be one of"),
    "unknown controlnet mode": ('{"task": "controlnet", "mode": "sideways", "seed": 3}', "mode must be one of"),
    "unknown task": ('{"task": "video", "seed": 3}', "task must be one of"),
    "unknown model": ('{"model": "stable-diffusion", "seed": 3}', "model must be one of ['kandinsky-2-2-demo']"),
    "prompt a list": ('{"prompt": ["x"], "seed": 3}', "prompt must be text; got list"),
    "input_images a list": ('{"task": "img2img", "input_images": [1], "strength": 0.4, "seed": 3}', None),
    "input image reference a number": ('{"task": "img2img", "input_images": {"image": 5}, "seed": 3}', None),
}


@pytest.fixture
def page(tmp_path):
    from backend.metadata import OutputStore
    from kandinsky_ui.config import UIConfig
    from kandinsky_ui.gallery import Gallery
    from kandinsky_ui.page import Page

    config = UIConfig(models={"kandinsky-2-2-demo": None}, defaults={}, size_presets=[])
    return Page(config, Gallery(OutputStore(tmp_path / "outputs"), 10))


@pytest.mark.parametrize("name", list(BAD_SETTINGS))
def test_png_settings_that_are_not_allowed_are_named_and_the_rest_applied(name, page, tmp_path):
    """'Use these settings' on a PNG whose settings are not allowed: each such field is left out with a
    warning naming it and what is allowed (the request's own check), the other settings are applied."""
    text, message = BAD_SETTINGS[name]
    path = png_with_settings(tmp_path / "bad.png", text)
    with warnings.catch_warnings(record=True) as caught:  # gr.Warning outside a request: warnings.warn
        warnings.simplefilter("always")
        values, task = page.settings_from_png(OWNER, str(path))
    shown = [str(w.message) for w in caught]
    assert values.get("seed") == 3 or values.get("prompt") == "p", values  # the rest is applied
    if message is None:
        assert not [m for m in shown if "Not applied" in m], shown
    else:
        assert any(m.startswith("Not applied from this PNG: ") and message in m for m in shown), shown


def test_png_settings_none_usable(page, tmp_path):
    import gradio as gr

    path = png_with_settings(tmp_path / "bad.png", '{"width": "wide", "height": NaN}')
    with pytest.raises(gr.Error, match="None of this PNG's settings can be used: width must be an integer .* "
                                       "height must be an integer between 64 and 2048; got nan"):
        page.settings_from_png(OWNER, str(path))


def test_png_settings_still_round_trip():
    """Good settings come back as the controls show them (a sampler in the menu's spelling, labels)."""
    from kandinsky_ui.controls import controls_from_settings

    values, task, skipped = controls_from_settings(
        {"task": "controlnet", "scheduler": "ddpm", "seed": -7, "width": 128, "mode": "img2img", "strength": 0.4,
         "guidance_scale": 4, "prompt": "p"}, {})
    assert skipped == [] and task == "controlnet"
    assert values == {"scheduler": "DDPM", "seed": -1, "width": 128, "controlnet_mode": "Image to image",
                      "controlnet_strength": 0.4, "guidance_scale": 4.0, "prompt": "p",
                      "hint_source": "Use my depth map"}
    values, task, skipped = controls_from_settings(
        {"task": "interpolate", "inputs": ["a cat", None], "weights": [0.3, 0.7], "walk_steps": 3}, {})
    assert skipped == [] and values == {"input_count": 2, "kind_1": "Text", "text_1": "a cat", "weight_1": 0.3,
                                        "kind_2": "Image", "weight_2": 0.7, "walk_steps": 3}


# ------------------------------------------------------------------------------ start-up flags


def test_bad_outputs_dir_and_memory_budget_stop_with_one_line(tmp_path):
    import app

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [(["--outputs-dir", str(a_file)], f"--outputs-dir: {a_file} is a file, not a folder"),
             (["--outputs-dir", str(a_file / "sub")], f"--outputs-dir: cannot write images to {a_file / 'sub'}"),
             (["--memory-budget", "infGB"], "--memory-budget: memory budget must be a finite size like 12GB"),
             (["--memory-budget", "nanGB"], "--memory-budget: memory budget must be a finite size"),
             (["--memory-budget", "lots"], "--memory-budget: memory budget must look like 12GB")]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((["--outputs-dir", str(locked)], f"--outputs-dir: cannot write images to {locked}"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as caught:
            app.engine_config(app.parse_args(["--demo", "--outputs-dir", str(tmp_path / "out"), *argv]))
        assert str(caught.value).startswith(message), str(caught.value)
    assert app.engine_config(app.parse_args(["--demo", "--outputs-dir", str(tmp_path / "new" / "out")])).outputs_dir \
        == str(tmp_path / "new" / "out")


def test_bad_outputs_dir_at_start_is_one_line_without_a_traceback(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--demo", "--outputs-dir", str(a_file)],
                            cwd=ROOT, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "KANDINSKY_STUDIO_ARGS": ""})
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (f"--outputs-dir: {a_file} is a file, not a folder; give a folder "
                                                      f"this user can write (it is made if missing)")
