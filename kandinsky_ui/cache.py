"""Gradio's cache folder (GRADIO_TEMP_DIR, default <tmp>/gradio), bounded by age and by size.

Gradio writes there every upload (any client may POST files to /gradio_api/upload, tied to no job),
every image an output shows (a PIL image becomes a file) and a copy of every gallery file; by
itself it never deletes any of it while the server runs. Here:
- by age: `gr.Blocks(delete_cache=DELETE_CACHE)`: every 5 minutes Gradio deletes this app's files
  older than an hour (and all of them when the server stops);
- by size: `CacheBound` sweeps every SWEEP_EVERY_S seconds: this app's files beyond the limit
  (KANDINSKY_CACHE_LIMIT, default 256MB) go oldest first; an upload that is not an image by its
  content (PIL reads its header) is deleted at the first sweep after it arrived, since every file
  input of the app takes an image;
- previews: `CacheBound.follow_previews()` writes each step's preview as a small WebP under a random folder name and
  deletes a job's earlier previews PREVIEW_GRACE_S seconds after the next one (time for the browser
  to fetch the file it was sent), and the last one that long after the job ends.
Only files inside the cache folder that this app's Blocks created (Gradio's temp_file_sets) are
ever deleted; files a component keeps (default values, examples) never are.
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path

from gradio.utils import get_upload_folder
from PIL import Image

from backend.memory import format_bytes, parse_memory

logger = logging.getLogger(__name__)

DELETE_CACHE = (300, 3600)          # gr.Blocks(delete_cache=(every s, older than s))
DEFAULT_LIMIT = 256 * 2**20
LIMIT_ENV = "KANDINSKY_CACHE_LIMIT"
SWEEP_EVERY_S = 5.0
PREVIEW_GRACE_S = 10.0
PREVIEW_QUALITY = 80


def cache_limit() -> int:
    """The size limit of the cache folder: KANDINSKY_CACHE_LIMIT ("256MB", "1GB", bytes) or 256 MB."""
    text = os.environ.get(LIMIT_ENV, "").strip()
    if not text:
        return DEFAULT_LIMIT
    try:
        limit = parse_memory(text)
    except ValueError as error:
        raise SystemExit(f"{LIMIT_ENV}: {str(error).replace('memory budget', 'cache limit')}") from None
    return limit if limit is not None else DEFAULT_LIMIT


def cache_folder() -> Path:
    return Path(get_upload_folder()).resolve()


def is_image_file(path) -> bool:
    """Whether PIL recognises the file's content as an image (the header only is read)."""
    try:
        with Image.open(path):
            return True
    except Exception:  # noqa: BLE001 - unreadable, not an image, gone
        return False


def in_folder(path, folder: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(folder)
    except (OSError, ValueError):
        return False


def remove_file(path, folder: Path) -> int | None:
    """Delete one file inside `folder` and its folder when that is left empty (Gradio keeps each
    file in a folder of its own); -> bytes freed, None when nothing was deleted."""
    file = Path(path)
    if not in_folder(file, folder):
        return None
    try:
        size = file.stat().st_size
        file.unlink()
    except OSError:
        return None
    try:
        if file.parent.resolve() != folder:
            file.parent.rmdir()  # only when empty
    except OSError:
        pass
    return size


class CacheBound:
    """Keeps this app's files in Gradio's cache folder under `limit` bytes (see the module docstring)."""

    def __init__(self, blocks, limit: int | None = None, folder: Path | None = None):
        self.blocks = blocks
        self.limit = cache_limit() if limit is None else limit
        self.folder = folder or cache_folder()
        self._retired: list[tuple[float, str]] = []     # (delete after, path)
        self._checked: set[str] = set()                 # uploads already sniffed
        self._lock = threading.Lock()
        self._thread = None

    # ------------------------------------------------------------------ bookkeeping
    def own_files(self) -> set[str]:
        files: set[str] = set()
        for file_set in list(getattr(self.blocks, "temp_file_sets", [])):
            files |= file_set.copy()    # set.copy() is atomic under the GIL
        return files

    def _kept(self) -> set[str]:
        kept: set[str] = set()
        for block in list(getattr(self.blocks, "blocks", {}).values()):
            kept |= set(getattr(block, "keep_in_cache", ()))
        return kept

    def _forget(self, paths) -> None:
        for file_set in list(getattr(self.blocks, "temp_file_sets", [])):
            for path in paths:
                file_set.discard(path)

    def retire(self, paths, after: float = PREVIEW_GRACE_S) -> None:
        """Delete these files `after` seconds from now (at the first sweep past it)."""
        deadline = time.monotonic() + after
        with self._lock:
            self._retired.extend((deadline, str(path)) for path in paths)

    # ------------------------------------------------------------------ the sweep
    def sweep(self) -> tuple[int, int]:
        """One pass: retired previews due, non-image uploads, then the oldest files beyond the limit.
        -> (files deleted, bytes freed)."""
        removed: set[str] = set()   # forgotten by Gradio's file sets
        deleted, freed = 0, 0

        def delete(path: str) -> int:
            nonlocal deleted, freed
            removed.add(path)
            size = remove_file(path, self.folder)
            if size is not None:
                deleted, freed = deleted + 1, freed + size
            return size or 0
        now = time.monotonic()
        with self._lock:
            due = [path for deadline, path in self._retired if deadline <= now]
            self._retired = [(deadline, path) for deadline, path in self._retired if deadline > now]
        for path in due:
            delete(path)

        kept = self._kept()
        uploads = getattr(self.blocks, "upload_file_set", set()).copy()
        for path in uploads - self._checked:
            try:
                if os.stat(path).st_size == 0:
                    continue    # still being moved into place (Gradio copies across file systems): next sweep
            except OSError:
                continue
            self._checked.add(path)
            if path not in kept and not is_image_file(path):
                logger.info("deleted an upload that is not an image: %s", path)
                delete(path)
        self._checked &= uploads

        files = []
        for path in self.own_files() - kept - removed:
            if not in_folder(path, self.folder):
                continue
            try:
                stat = os.stat(path)
            except OSError:
                removed.add(path)  # gone already: forget it
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        if total > self.limit:
            for _, size, path in sorted(files):
                if total <= self.limit:
                    break
                delete(path)
                total -= size
            logger.info("Gradio's cache over %s: deleted its oldest files, %s left", format_bytes(self.limit),
                        format_bytes(total))
        self._forget(removed)
        return deleted, freed

    # ------------------------------------------------------------------ step previews
    def write_preview(self, image: Image.Image) -> str:
        """A step preview as a small WebP in a folder of its own (a random name) in the cache folder."""
        folder = self.folder / f"preview-{secrets.token_hex(16)}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "preview.webp"
        image.save(path, format="WEBP", quality=PREVIEW_QUALITY, method=0)
        return str(path)

    def follow_previews(self) -> "JobPreviews":
        return JobPreviews(self)

    def start(self) -> "CacheBound":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cache-bound", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            time.sleep(SWEEP_EVERY_S)
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the sweep must go on
                logger.exception("sweeping Gradio's cache failed")


class JobPreviews:
    """The previews one handler streams: `add(image)` -> the file to show; `close()` at the end."""

    def __init__(self, bound: CacheBound):
        self.bound, self.shown = bound, []

    def add(self, image: Image.Image) -> str:
        path = self.bound.write_preview(image)
        self.bound.retire(self.shown)   # the browser has PREVIEW_GRACE_S to fetch the last one
        self.shown = [path]
        return path

    def close(self) -> None:
        self.bound.retire(self.shown)
        self.shown = []
