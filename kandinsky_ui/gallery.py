"""A browser's gallery: its own images in the outputs folder, newest first, and sending one of them
to another tab. Paths that come back from the browser are checked to be the owner's own.

Images the outputs folder could not take (a full or read-only disk: GeneratedImage.save_error) are
kept in memory, the last UNSAVED_KEPT per browser, and shown first, captioned "not saved", so they
can still be downloaded (a PNG with their settings) or sent to a tab; they are gone when the app
restarts."""
from __future__ import annotations

import dataclasses
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

import gradio as gr
from PIL import Image

from backend.metadata import OutputStore, read_settings, settings_texts
from kandinsky_ui import render


UNSAVED_KEPT = 8          # unsaved images kept in memory per browser
UNSAVED_OWNERS = 64       # browsers with unsaved images kept (the least recent one's are dropped)
UNSAVED = "unsaved:"      # the selection of an unsaved image: UNSAVED + its token


class Gallery:
    def __init__(self, store: OutputStore, limit: int):
        self.store, self.limit = store, limit
        # owner -> [(token, the job's GeneratedImage, the one shown)], newest first
        self._unsaved: OrderedDict[str, list] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, owner: str, images) -> None:
        """Keep the images of a job that could not be saved (those without a path), for the gallery."""
        with self._lock:
            kept = self._unsaved.pop(owner, [])
            known = {id(g) for _, g, _ in kept}  # a job followed twice (a reload re-attached) is kept once
            fresh = [(secrets.token_hex(8), g, _shown(g)) for g in images if g.path is None and id(g) not in known]
            if fresh or kept:
                self._unsaved[owner] = (fresh[::-1] + kept)[:UNSAVED_KEPT]
            while len(self._unsaved) > UNSAVED_OWNERS:
                self._unsaved.popitem(last=False)

    def _unsaved_of(self, owner: str) -> list:
        with self._lock:
            return list(self._unsaved.get(owner, ()))

    def items(self, owner: str) -> list:
        unsaved = [shown for _, _, shown in self._unsaved_of(owner)]
        return render.gallery_items(self.store.list(owner, self.limit), unsaved)

    def select(self, owner: str, index) -> tuple[str | None, str]:
        """(path, caption line) of the image at `index` of the owner's gallery; for an unsaved image,
        UNSAVED + its token instead of a path."""
        unsaved = self._unsaved_of(owner)
        if isinstance(index, int) and 0 <= index < len(unsaved):
            token, generated, _ = unsaved[index]
            return UNSAVED + token, (f"Selected: an image that was not saved ({render.unsaved_caption(generated)}): "
                                     f"{generated.save_error}")
        paths = self.store.list(owner, self.limit)
        index = index - len(unsaved) if isinstance(index, int) else index
        if not isinstance(index, int) or not 0 <= index < len(paths):
            return None, "Select an image in the gallery."
        path = paths[index]
        return str(path), f"Selected: `{path.name}` ({render.caption(path)})"

    @staticmethod
    def is_unsaved(selected) -> bool:
        return isinstance(selected, str) and selected.startswith(UNSAVED)

    def selected_image(self, owner: str, selected) -> Image.Image:
        if self.is_unsaved(selected):
            token = selected[len(UNSAVED):]
            for kept, generated, _ in self._unsaved_of(owner):
                if kept == token:
                    return generated.image.convert("RGB")
            raise gr.Error(f"That unsaved image is no longer kept (the last {UNSAVED_KEPT} are, until the app "
                           f"restarts). Select another image.")
        if not selected or not self.store.owns(owner, selected) or not Path(selected).is_file():
            raise gr.Error("Select one of your images in the gallery first.")
        with Image.open(selected) as image:
            return image.convert("RGB")

    def selected_settings(self, owner: str, selected) -> dict | None:
        """The settings of the owner's selected image (its PNG's, or an unsaved image's), None if not theirs."""
        if self.is_unsaved(selected):
            token = selected[len(UNSAVED):]
            return next((g.settings for kept, g, _ in self._unsaved_of(owner) if kept == token), None)
        if not selected or not self.store.owns(owner, selected) or not Path(selected).is_file():
            return None
        try:
            return read_settings(selected)
        except (OSError, ValueError):
            return None

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


def _shown(generated):
    """The unsaved image as the gallery gets it: a copy carrying its settings as PNG text, which Gradio
    writes into the PNG a download gives (processing_utils.get_pil_metadata), so PNG info reads it back."""
    image = generated.image.copy()
    image.info.update(settings_texts(generated.settings))
    return dataclasses.replace(generated, image=image)
