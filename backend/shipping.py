"""A job's events across the Ray boundary: what a worker sends (backend/ray_worker.py), and how the
front end (backend/cluster.py) saves the images of the last one.

The worker's Engine saves into a scratch folder; the front end saves every image again, from the image
and its settings, in its own OutputStore under the owner: the same PNG (pixels and text chunks) the
in-process Engine writes. The input images the settings reference ("inputs/<hash>.png") travel as PNG
bytes and are written under the same names, so PNG info finds them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from backend.events import Cancelled, Event, GeneratedImage, Result
from backend.metadata import OutputStore, write_file


@dataclass
class Shipped:
    """One event of a job on its way from a worker to the front end."""

    event: Event
    sent_at: float                          # time.time() when it left the worker (per-event overhead)
    # the job's last event only:
    input_files: dict = field(default_factory=dict)   # "inputs/<hash>.png" -> the PNG bytes the settings name
    loaded: tuple = ()                      # the folders the worker holds after the job (dispatch affinity)
    engine_s: float | None = None           # the job on the worker's Engine: submitted -> its last event


def save_last_event(store: OutputStore, event: Event, owner: str, input_files: dict, notes: list) -> Event:
    """The job's last event with its images (and partials) saved in `store` under `owner`; a file the disk
    refuses leaves its image in memory with the reason, and a note, as in process. `notes`: the front
    end's own, added to the event's (the worker's notes about its scratch folder are dropped)."""
    if not isinstance(event, (Result, Cancelled)):
        return event
    missing = set()
    for reference, data in input_files.items():
        try:
            path = store.input_path(owner, reference)
            if not path.exists():
                path.parent.mkdir(exist_ok=True)
                write_file(path, data)
        except (OSError, ValueError) as error:  # SaveError names the problem and the folder
            missing.add(reference)
            notes.append(f"the input image {reference} could not be stored: {error}; the saved settings lack "
                         f"that reference")
    worker_errors = {g.save_error for g in [*event.images, *getattr(event, "partials", [])] if g.save_error}
    kept = [n for n in event.notes if not any(e in n for e in worker_errors)]  # the worker's scratch, not ours

    def save(generated: GeneratedImage) -> GeneratedImage:
        settings = dict(generated.settings)
        if missing:
            settings["input_images"] = {k: v for k, v in settings.get("input_images", {}).items()
                                        if v not in missing}
        try:
            path = store.save(generated.image, settings, owner)
        except OSError as error:  # SaveError: names the problem and the folder; the image stays in memory
            notes.append(f"the image of seed {settings.get('seed')}{' (partial)' if generated.partial else ''} "
                         f"could not be saved: {error}. It is shown here and kept in the gallery only until the "
                         f"app restarts: download it from there")
            return dataclasses.replace(generated, settings=settings, path=None, save_error=str(error))
        return dataclasses.replace(generated, settings=settings, path=path, save_error=None)

    changes = {"images": [save(g) for g in event.images]}
    if isinstance(event, Cancelled):
        changes["partials"] = [save(g) for g in event.partials]
    return dataclasses.replace(event, **changes, notes=tuple(kept + notes))
