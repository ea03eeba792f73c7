"""Draw the sample images in assets/samples/ (all made here, no outside material).

They serve two purposes: the MoVQ encodes them to fit the latent -> RGB preview factors
(backend/previews.py), so together they cover the colour cube (saturated hues, greys, skin and
earth tones, dark and light); and the app offers them as example inputs (landscape for
image-to-image and inpainting, depth.png for ControlNet depth).

Run: python assets/make_samples.py   (deterministic: same bytes every time)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 256
OUT = Path(__file__).resolve().parent / "samples"


def grid(size=SIZE):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    return x, y


def landscape() -> Image.Image:
    """Sky gradient, sun, two rows of hills, a lake: smooth regions and a few edges."""
    x, y = grid()
    sky = np.stack([0.35 + 0.4 * y, 0.55 + 0.3 * y, 0.95 - 0.1 * y], -1)
    image = Image.fromarray((np.clip(sky, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((170, 30, 220, 80), fill=(255, 214, 90))
    far = [(0, 150)] + [(i, 140 - 25 * np.sin(i / 40.0)) for i in range(0, SIZE + 1, 8)] + [(SIZE, 256), (0, 256)]
    draw.polygon(far, fill=(70, 110, 150))
    near = [(0, 190)] + [(i, 180 - 18 * np.sin(i / 23.0 + 1)) for i in range(0, SIZE + 1, 8)] + [(SIZE, 256), (0, 256)]
    draw.polygon(near, fill=(60, 140, 60))
    draw.ellipse((40, 210, 160, 245), fill=(40, 90, 170))
    return image.filter(ImageFilter.GaussianBlur(1.2))


def hue_wheel() -> Image.Image:
    """All hues at full saturation around the centre, fading to white and to black."""
    x, y = grid()
    angle = np.arctan2(y - 0.5, x - 0.5) / (2 * np.pi) + 0.5
    radius = np.clip(np.hypot(x - 0.5, y - 0.5) * 2, 0, 1)
    rgb = np.clip(np.abs(((angle[..., None] * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)
    rgb = rgb * radius[..., None] + (1 - radius[..., None])   # white centre
    rgb = rgb * (1 - 0.7 * y[..., None])                     # darker towards the bottom
    return Image.fromarray((rgb * 255).astype(np.uint8))


def blocks() -> Image.Image:
    """Flat patches: primaries, secondaries, greys, skin and earth tones."""
    colours = [(230, 30, 30), (30, 180, 40), (30, 60, 220), (240, 220, 40), (30, 200, 210), (200, 40, 190),
               (255, 255, 255), (128, 128, 128), (20, 20, 20), (235, 190, 160), (160, 110, 80), (90, 60, 30),
               (250, 150, 40), (120, 80, 200), (170, 210, 120), (60, 60, 90)]
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    cell = SIZE // 4
    for index, colour in enumerate(colours):
        r, c = divmod(index, 4)
        draw.rectangle((c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1), fill=colour)
    return image


def texture() -> Image.Image:
    """Smoothed colour noise (seeded): mid-frequency detail in every channel."""
    rng = np.random.default_rng(2024)
    noise = rng.random((SIZE // 8, SIZE // 8, 3)).astype(np.float32)
    image = Image.fromarray((noise * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC)
    return image.filter(ImageFilter.GaussianBlur(2))


def portrait() -> Image.Image:
    """A simple face-like figure on a warm background: skin tones, hair, clothes."""
    image = Image.new("RGB", (SIZE, SIZE), (200, 170, 140))
    draw = ImageDraw.Draw(image)
    draw.rectangle((60, 190, 196, 256), fill=(40, 70, 120))
    draw.ellipse((78, 40, 178, 170), fill=(80, 50, 30))
    draw.ellipse((88, 60, 168, 170), fill=(232, 188, 160))
    draw.ellipse((108, 100, 120, 110), fill=(40, 30, 30))
    draw.ellipse((136, 100, 148, 110), fill=(40, 30, 30))
    draw.arc((112, 120, 144, 150), 20, 160, fill=(170, 60, 60), width=3)
    return image.filter(ImageFilter.GaussianBlur(1))


def depth() -> Image.Image:
    """A depth map (white = near): a floor ramp, a sphere and a box, for the ControlNet tab."""
    x, y = grid()
    floor = 0.15 + 0.6 * y
    sphere = np.clip(1 - ((x - 0.35) ** 2 + (y - 0.5) ** 2) / 0.04, 0, 1)
    value = np.maximum(floor, 0.55 + 0.45 * np.sqrt(sphere) * (sphere > 0))
    box = (x > 0.6) & (x < 0.85) & (y > 0.35) & (y < 0.75)
    value = np.where(box, 0.8, value)
    return Image.fromarray((np.clip(value, 0, 1) * 255).astype(np.uint8), mode="L").convert("RGB")


SAMPLES = {"landscape": landscape, "hue_wheel": hue_wheel, "blocks": blocks, "texture": texture,
           "portrait": portrait, "depth": depth}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, draw in SAMPLES.items():
        draw().save(OUT / f"{name}.png", optimize=True)
        print("wrote", OUT / f"{name}.png")


if __name__ == "__main__":
    main()
