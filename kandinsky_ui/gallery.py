"""A browser's gallery: its own images in the outputs folder, newest first, and sending one of them
to another tab. Paths that come back from the browser are checked to be the owner's own."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import Image

from backend.metadata import OutputStore
from kandinsky_ui import render


class Gallery:
    def __init__(self, store: OutputStore, limit: int):
        self.store, self.limit = store, limit

    def items(self, owner: str) -> list:
        return render.gallery_items(self.store.list(owner, self.limit))

    def select(self, owner: str, index) -> tuple[str | None, str]:
        """(path, caption line) of the image at `index` of the owner's gallery."""
        paths = self.store.list(owner, self.limit)
        if not isinstance(index, int) or not 0 <= index < len(paths):
            return None, "Select an image in the gallery."
        path = paths[index]
        return str(path), f"Selected: `{path.name}` ({render.caption(path)})"

    def selected_image(self, owner: str, selected) -> Image.Image:
        if not selected or not self.store.owns(owner, selected) or not Path(selected).is_file():
            raise gr.Error("Select one of your images in the gallery first.")
        with Image.open(selected) as image:
            return image.convert("RGB")

    def input_images(self, owner: str, references: dict) -> dict:
        """The owner's stored input images named by a PNG's settings (field -> image); others are skipped."""
        images = {}
        for name, reference in (references or {}).items():
            try:
                path = self.store.input_path(owner, reference)
            except ValueError:
                continue
            if path.is_file():
                with Image.open(path) as image:
                    images[name] = image.convert("RGB")
        return images
