"""What the generation events do: typed requests to the Engine, and its jobs' events to the page.

Generation handlers are async generators: each event of the job becomes one update of (owner,
progress, preview, gallery, seeds), and a handler waiting for the next event holds no thread (Gradio
runs sync generators on a 40-thread pool that Stop and every other click also need). A browser is
identified by a random "owner" id kept in its localStorage (with logins: one per user,
kandinsky_ui/sessions.py); its images live in their own outputs folder, so sessions never see each
other's previews (each job streams to the handlers that follow it) or images. The page talks to the
Engine only (backend/engine.py): `submit`, `jobs_of`, `cancel`, `status`, `unload`, `set_memory_budget`.
"""
from __future__ import annotations

import asyncio
import logging

import anyio
import gradio as gr
from PIL import Image

from backend.events import Cancelled, Failed, Result, Step
from backend.limits import MAX_MIX_INPUTS
from backend.memory import format_bytes
from backend.progress import StepTimes
from backend.requests import depth_map_warning
from kandinsky_ui import masks, render
from kandinsky_ui.config import UIConfig
from kandinsky_ui.controls import HINT_LABELS, MODE_LABELS, mix_from_rows, request_from_controls, row_names
from kandinsky_ui.gallery import Gallery
from kandinsky_ui.sessions import CANCELLED, Access, Followers, StopBook, received_at

logger = logging.getLogger(__name__)

# task -> request field -> where the page takes that image (a request's "<field> is required: an image" names
# the field only)
IMAGE_PLACES = {"img2img": {"image": "upload the Start image on the Image to image tab"},
                "controlnet": {"hint": "upload a photo or depth map on the ControlNet depth tab",
                               "image": "upload the Start image on the ControlNet depth tab (Image to image mode)"}}


def where_on_the_page(task: str, message: str) -> str:
    """A request's message, with where on the page to give a missing image."""
    field, _, rest = message.partition(" is required: an image")
    place = IMAGE_PLACES.get(task, {}).get(field)
    return f"{field} is required: {place}{rest}" if place and _ else message


class Studio:
    def __init__(self, engine, config: UIConfig):
        self.engine, self.config = engine, config
        self.gallery = Gallery(engine.store, config.gallery_limit)
        self.step_times = StepTimes()   # each model's last finished job: the steps slider's estimate
        self.cache = None               # kandinsky_ui/cache.py CacheBound: step previews as small files, retired
        self.access = Access(config.logins, config.admins, config.local_admin, config.browser_secret)
        self.stops = StopBook()         # a Stop also stops requests received before it that have not started
        self.followers = Followers()    # a job whose pages have all gone is cancelled

    def owner(self, owner, request=None) -> str:
        """The owner a request speaks for (kandinsky_ui/sessions.py Access): gr.Error for another user's id."""
        return self.access.owner(owner, request)

    # ------------------------------------------------------------------ page load
    def on_load(self, stored, request: gr.Request):
        owner = self.access.page_owner(stored, request)
        items = self.gallery.items(owner)
        if self.engine.jobs_of(owner):
            text = render.progress_html("Your job from before the reload is still running…", None, "running")
        else:
            text = self._idle_text(items)
        return owner, owner, items, text

    @staticmethod
    def _idle_text(items) -> str:
        if items:
            return render.progress_html(f"{len(items)} earlier image(s) of this browser are in the gallery.",
                                        None, "idle")
        return render.progress_html("Ready.", None, "idle")

    async def resume(self, owner, request: gr.Request):
        """After a reload: follow this browser's running job again, if there is one."""
        owner = self.owner(owner, request)
        jobs = self.engine.jobs_of(owner)
        if jobs:
            async for update in self._follow(owner, jobs[0], request):
                yield update
        else:  # (a generator that yields nothing would blank every output) the page may have shown "running"
            yield gr.skip(), self._idle_text(self.gallery.items(owner)), gr.skip(), gr.skip(), gr.skip()

    def session_closed(self, request: gr.Request):
        """Gradio's unload: the page's heartbeat ended (a closed tab, a killed client, or a reload)."""
        self.followers.page_closed(getattr(request, "session_hash", None))

    # ------------------------------------------------------------------ generation
    async def text2img(self, owner="", request=None, **values):
        async for update in self._generate(request, owner, lambda: self._request("text2img", values), "text2img"):
            yield update

    async def img2img(self, owner="", request=None, **values):
        async for update in self._generate(request, owner, lambda: self._request("img2img", values), "img2img"):
            yield update

    async def inpaint(self, owner="", request=None, **values):
        def build():
            image = masks.editor_background(values.get("editor"))
            if image is None:
                raise ValueError("image is required: upload an image in the Inpaint tab")
            upload = values.get("mask_upload")
            mask = masks.uploaded_mask(upload, image.size) if upload is not None else masks.painted_mask(values["editor"])
            outpainting = any(values.get(f"outpaint_{side}") for side in ("left", "right", "top", "bottom"))
            if mask.getextrema()[1] == 0 and not values.get("mask_invert") and not outpainting:
                raise ValueError("mask is empty: paint over the part of the image to repaint, or outpaint")
            return self._request("inpaint", dict(values, mask_upload=mask))
        async for update in self._generate(request, owner, build, "inpaint"):
            yield update

    async def interpolate(self, owner="", request=None, input_count=2, **values):
        """Inputs 1..input_count, each a row of controls (kind_i, text_i, image_i, weight_i): a text or
        an image by its kind, and its weight."""
        rows = [tuple(values.pop(name, None) for name in row_names(i)) for i in range(1, MAX_MIX_INPUTS + 1)]

        def build():
            inputs, weights = mix_from_rows(input_count, rows)
            return self._request("interpolate", dict(values, inputs=inputs, weights=weights))
        async for update in self._generate(request, owner, build, "interpolate"):
            yield update

    async def controlnet(self, owner="", request=None, **values):
        async for update in self._generate(request, owner, lambda: self._request("controlnet", values), "controlnet"):
            yield update

    # ------------------------------------------------------------------ ControlNet hint
    def hint_view(self, model, depth, source, mode, start_image, width, height):
        """The hint the model will get, before generating: the estimated depth of the photo (or, in image to
        image without one, of the start image), or the depth map as grey; with a note when a colour image is
        given as the depth map. -> (hint image, note)."""
        size = (int(width), int(height))
        if HINT_LABELS.get(source, source) == "depth map":
            if depth is None:
                return None, ""
            warning = depth_map_warning("depth", depth)  # shown beside the hint while it stays
            return depth.convert("L").resize(size, Image.BICUBIC).convert("RGB"), \
                f"⚠ {warning}" if warning else ""
        name, photo = ("depth", depth) if depth is not None or MODE_LABELS.get(mode) != "img2img" else \
            ("controlnet_image", start_image)
        spec = self.config.models.get(model)
        if photo is None or (spec is not None and not spec.supports("controlnet")):  # the tab says why
            return None, ""
        depth_image = self._estimate(photo, model, name)
        note = "Estimated depth of the start image." if name == "controlnet_image" else "Estimated depth of the photo."
        return depth_image.resize(size, Image.BICUBIC).convert("RGB"), note

    def estimate_depth(self, image, model=None):
        """The /estimate_depth endpoint: the depth image (white = near) of a photo by the model's depth
        estimator (the default model's when left out)."""
        return self._estimate(image, model, "image")

    def _estimate(self, image, model, name: str):
        if image is None:
            raise gr.Error(f"{name} is required: an image")
        try:
            return self.engine.estimate_depth(model or self.config.defaults["model"], image, name)
        except (ValueError, TypeError, RuntimeError, OSError) as error:
            raise gr.Error(str(error)) from None

    def _request(self, task: str, values: dict):
        return request_from_controls(task, values, self.config.defaults)

    async def _generate(self, request, owner, build, task: str):
        owner = self.owner(owner, request)
        if self.stops.stopped(owner, received_at(request)):  # Stop was pressed after this was sent
            yield owner, render.progress_html("Stopped before it started.", None, "stopped"), *(gr.skip(),) * 3
            return
        try:
            # decoding and checking the inputs (images, masks) off the event loop
            job = self.engine.submit(await anyio.to_thread.run_sync(build), owner)
        except (ValueError, TypeError, RuntimeError) as error:
            raise gr.Error(where_on_the_page(task, str(error))) from None
        if self.stops.stopped(owner, received_at(request)):  # a Stop came while the inputs were read
            job.cancel()
        async for update in self._follow(owner, job, request):
            yield update

    async def _follow(self, owner: str, job, request):
        skip = gr.skip()
        session = getattr(request, "session_hash", None)
        self.followers.follow(job, session)
        events = job.aevents()
        previews = self.cache.follow_previews() if self.cache is not None else None
        cancelled = False
        try:
            async for event in events:
                text = render.event_html(event)
                if isinstance(event, Step):
                    preview = event.preview
                    if preview is not None and previews is not None:
                        preview = previews.add(preview)  # a small WebP; the one before is deleted soon after
                    yield owner, text, preview if preview is not None else skip, skip, skip
                elif isinstance(event, Result):
                    self.step_times.record(job.request, event.step_seconds)
                    self.gallery.remember(owner, event.images)  # those the disk refused (no path)
                    first = event.images[0].image if event.images else skip
                    yield owner, text, first, self.gallery.items(owner), render.seeds_text(event.seeds)
                elif isinstance(event, Cancelled):
                    self.gallery.remember(owner, [*event.images, *event.partials])
                    partial = event.partials[0].image if event.partials else skip
                    yield owner, text, partial, self.gallery.items(owner), render.seeds_text(event.seeds)
                elif isinstance(event, Failed):
                    yield owner, text, skip, skip, skip
                    raise gr.Error(event.message)
                else:
                    yield owner, text, skip, skip, skip
        except asyncio.CancelledError:
            # the client cancelled its request (Gradio cancels the task awaiting the next event)
            cancelled = True
            raise
        finally:
            # (a cancel that finds this handler at a yield closes it like a lost page's: the
            # middleware's note of the cancel tells them apart)
            cancelled = cancelled or CANCELLED.recent(session)
            await events.aclose()
            if previews is not None:
                previews.close()
            # This page no longer follows the job: a job nobody follows any more is stopped, its
            # partial image kept (kandinsky_ui/sessions.py Followers)
            self.followers.leave(job, session, cancelled)

    async def stop(self, owner="", request: gr.Request = None):
        owner = self.owner(owner, request)
        self.stops.stop(owner)
        count = self.engine.cancel(owner)
        # Not written to the progress line: this answer may reach the page after the job's own
        # "stopped" update and would overwrite it.
        if count:
            return "Stopping after the current step…"
        return "Nothing of yours is running."

    # ------------------------------------------------------------------ gallery
    def select(self, owner, evt: gr.SelectData, request: gr.Request):
        return self.gallery.select(self.owner(owner, request), evt.index)

    # A send with nothing (usable) selected changes nothing and says why in a warning toast: an error
    # raised here would mark every output red, and an unqueued event's message never reaches the page.
    def send_to_img2img(self, owner, selected, request: gr.Request):
        image = self._selected(owner, selected, request)
        if image is None:
            return gr.skip(), gr.skip()
        return image, gr.Tabs(selected="img2img")

    def send_to_inpaint(self, owner, selected, request: gr.Request):
        image = self._selected(owner, selected, request)
        if image is None:
            return gr.skip(), gr.skip(), gr.skip()
        # the overlay is set with the image (no red yet) rather than waiting for the editor's change event
        return {"background": image, "layers": [], "composite": image}, image, gr.Tabs(selected="inpaint")

    def send_to_controlnet(self, owner, selected, request: gr.Request):
        image = self._selected(owner, selected, request)
        if image is None:
            return gr.skip(), gr.skip(), gr.skip()
        return image, "Image to image", gr.Tabs(selected="controlnet")

    def send_to_png_info(self, owner, selected, request: gr.Request):
        if self.gallery.is_unsaved(selected):
            gr.Warning("This image was not saved (see the note of its job), so there is no PNG file here to "
                       "read. Download it from the gallery (that PNG carries its settings) and drop it on PNG info.")
            return gr.skip(), gr.skip()
        if self._selected(owner, selected, request) is None:
            return gr.skip(), gr.skip()
        return selected, gr.Tabs(selected="pnginfo")

    def _selected(self, owner, selected, request):
        """The selected image, or None after a warning saying what to do."""
        try:
            return self.gallery.selected_image(self.owner(owner, request), selected)
        except gr.Error as error:
            gr.Warning(str(error.message))
            return None

    # ------------------------------------------------------------------ models panel
    def models_status(self, owner=None, request: gr.Request = None) -> str:
        """The models panel: the server's loaded models and queue; of the jobs, only the caller's are named."""
        mine = self.engine.jobs_of(self.owner(owner, request)) if owner else []
        return render.status_markdown(self.engine.status(), mine)

    def server_actions_view(self, request: gr.Request):
        """The Models tab's unload and budget controls: usable only by who may act on the whole server."""
        allowed = self.access.may_act_on_server(request)
        note = "" if allowed else ("Unloading models and the memory budget affect every user of this server: " +
                                   ("only an admin may change them." if self.access.logins else
                                    "only a browser on the server's machine may change them."))
        return (gr.update(interactive=allowed), gr.update(interactive=allowed), gr.update(interactive=allowed),
                gr.update(value=note, visible=not allowed))

    def unload_all(self, request: gr.Request = None):
        self.access.check_server_action(request, "Unloading models")
        freed = self.engine.unload()
        if freed is None:
            note = "A job is running: the models will be unloaded when it ends."
        else:
            note = f"Unloaded {len(freed)} model unit(s)." if freed else "Nothing to unload."
        return note + "\n\n" + self.models_status()

    def set_budget(self, text, request: gr.Request = None):
        self.access.check_server_action(request, "The memory budget")
        try:
            budget, evicted = self.engine.set_memory_budget(text)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        size = format_bytes(budget)
        if evicted is None:
            note = f"Budget {size} applies when the running job ends."
        else:
            note = f"Budget set to {size}." + (f" Evicted: {', '.join(evicted)}." if evicted else "")
        return note + "\n\n" + self.models_status()
