"""Events and status -> what the page shows (HTML, Markdown, gallery items). No Gradio here."""
from __future__ import annotations

import functools
import html
import re
from pathlib import Path

from backend.events import Cancelled, Failed, Loading, Queued, Result, Step
from backend.memory import format_bytes
from backend.metadata import read_settings

# backend/events.py PHASES
PHASE_NAMES = {"prior": "Prior (text → image embedding)", "encode": "Encoding the prompt (T5)",
               "denoise": "Denoising", "decode": "Decoding the image", "hires": "Hi-res pass"}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "estimating…"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def steps_eta(steps: int, docs_steps: int, estimate: float | None, docs_estimate: float | None) -> str:
    """The steps slider's note: the time these settings take and what the docs' step count would (every sampler
    costs one UNet evaluation per step), or, before any job of the model has finished, the share of steps."""
    if estimate is None or docs_estimate is None:
        if steps == docs_steps:
            return f"The docs' {docs_steps} steps. A time estimate appears after a first image with this model."
        change = "fewer" if steps < docs_steps else "more"
        share = abs(docs_steps - steps) / docs_steps
        return (f"{steps} steps: {share:.0%} {change} UNet evaluations than the docs' {docs_steps}. A time estimate "
                f"appears after a first image with this model.")
    if steps == docs_steps:
        return f"≈ {_duration(estimate)} (the docs' {docs_steps} steps), once the models are loaded."
    saved = docs_estimate - estimate
    verdict = f"saves {_duration(saved)}" if saved > 0 else f"{_duration(-saved)} more"
    return (f"≈ {_duration(estimate)} with {steps} steps; the docs' {docs_steps} steps: {_duration(docs_estimate)} "
            f"({verdict}), once the models are loaded.")


def progress_html(text: str, fraction: float | None = None, state: str = "running") -> str:
    """A status line with an optional bar; `state` (idle|queued|loading|running|done|failed|stopped)
    is exposed as data-state for styling and for the browser tests."""
    bar = ""
    if fraction is not None:
        percent = max(0.0, min(1.0, fraction)) * 100
        bar = f'<div class="ks-bar"><span style="width:{percent:.1f}%"></span></div>'
    return f'<div class="ks-progress" data-state="{state}">{bar}<div class="ks-text">{html.escape(text)}</div></div>'


def event_html(event) -> str:
    if isinstance(event, Queued):
        if event.position == 0:
            return progress_html("Starting…", None, "queued")
        jobs = "job" if event.position == 1 else "jobs"
        return progress_html(f"Waiting in line: {event.position} {jobs} ahead of yours", None, "queued")
    if isinstance(event, Loading):
        if event.total > 0:
            return progress_html(f"Loading {event.component}: {format_bytes(event.done)} of "
                                 f"{format_bytes(event.total)}", event.done / event.total, "loading")
        return progress_html(f"Loading {event.component}…", None, "loading")
    if isinstance(event, Step):
        run = f" · run {event.batch}/{event.batch_count}" if event.batch_count > 1 else ""
        # one bar for the whole job: the runs of a batch fill it one after another (it never restarts)
        runs = max(1, event.batch_count)
        done_runs = min(max(0, event.batch - 1), runs - 1)
        if event.phase == "decode":
            text = f"{PHASE_NAMES['decode']}{run} · ETA {_duration(event.eta_s)}"
            return progress_html(text, (done_runs + 1) / runs, "running")
        text = (f"{PHASE_NAMES.get(event.phase, event.phase)}: step {event.step}/{event.total}{run}"
                f" · ETA {_duration(event.eta_s)}")
        return progress_html(text, (done_runs + event.step / max(1, event.total)) / runs, "running")
    if isinstance(event, Result):
        count = len(event.images)
        share = 100 * event.preview_s / event.elapsed_s if event.elapsed_s else 0.0
        text = (f"Done: {count} image{'s' if count != 1 else ''} in {event.elapsed_s:.1f} s "
                f"(previews {event.preview_s:.2f} s, {share:.1f}%)")
        for note in event.notes:
            text += f" · {note}"
        return progress_html(text, 1.0, "done")
    if isinstance(event, Failed):
        return progress_html(f"Failed: {event.message}", None, "failed")
    if isinstance(event, Cancelled):
        latency = f" {event.latency_s:.2f} s after the click" if event.latency_s is not None else ""
        if event.partials:
            step = event.partials[0].settings.get("stopped_at_step")
            total = event.partials[0].settings.get("steps_planned")
            text = (f"Stopped{latency}, at step {step}/{total}. The last preview was kept as a partial image "
                    f"(marked partial).")
        else:
            text = f"Stopped{latency}, before any preview."
        if event.images:
            text += f" {len(event.images)} finished image(s) kept."
        for note in event.notes:
            text += f" · {note}"
        return progress_html(text, None, "stopped")
    raise TypeError(f"not an event: {event!r}")


_NAME_RE = re.compile(r"-(\d+)(-partial)?\.png$")


def caption(path: Path) -> str:
    """Gallery caption: the seed, the image's place in its job (batch position "2/4" or walk frame
    "frame 3/8", from its PNG settings) and partial."""
    try:
        stat = path.stat()
        return _caption(str(path), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return path.name


@functools.lru_cache(maxsize=4096)
def _caption(path: str, mtime_ns: int, size: int) -> str:  # the file's identity: a rewritten file is read again
    try:
        settings = read_settings(path)
    except (OSError, ValueError):
        settings = {}
    if not settings:
        match = _NAME_RE.search(path)
        if not match:
            return Path(path).name
        settings = {"seed": match.group(1), "partial": bool(match.group(2))}
    return settings_caption(settings)


def settings_caption(settings: dict) -> str:
    parts = [f"seed {settings.get('seed')}"]
    place = _place(settings)
    if place:
        parts.append(place)
    if settings.get("partial"):
        parts.append("partial")
    return " · ".join(parts)


def _place(settings: dict) -> str:
    """ "frame 3/8" for a walk's image, "2/4" for an image of a batch of several, else ""."""
    try:
        if settings.get("walk_index") is not None:
            return f"frame {int(settings['walk_index']) + 1}/{int(settings.get('walk_steps') or 0)}"
        size, count = int(settings.get("batch_size") or 1), int(settings.get("batch_count") or 1)
        if size * count > 1 and settings.get("batch_index") is not None:
            index = int(settings["batch_index"]) * size + int(settings.get("batch_position") or 0) + 1
            return f"{index}/{size * count}"
    except (TypeError, ValueError):
        pass
    return ""


def unsaved_caption(generated) -> str:
    """Gallery caption of an image the outputs folder could not take (a GeneratedImage without a path)."""
    return settings_caption(generated.settings) + " · not saved"


def gallery_items(paths: list[Path], unsaved=()) -> list[tuple]:
    """The gallery: images that could not be saved (GeneratedImage, kept in memory) first, then the files."""
    return [(g.image, unsaved_caption(g)) for g in unsaved] + [(str(path), caption(path)) for path in paths]


def status_markdown(status: dict, mine=()) -> str:
    """The models panel from `Engine.status()`; of the jobs, only the reader's own (`mine`, running
    first) are named: other users' jobs are counted, not shown."""
    lines = [f"**Device** {status['device']} · **dtype** {status['dtype_note']} · "
             f"**memory in use** {format_bytes(status['used'])} of a {format_bytes(status['budget'])} budget"]
    if status["over_budget"]:
        lines.append("\n⚠️ Over budget: one model folder is larger than the whole budget and was loaded alone.")
    lines.append("\n" + jobs_line(status, mine))
    if "workers" in status:  # a Ray cluster (backend/cluster.py): each worker's models, not one engine's
        lines.append(workers_markdown(status["workers"]))
        return "\n".join(lines)
    if not status["units"]:
        lines.append("\nNo model loaded yet: models load on first use.")
        return "\n".join(lines)
    lines.append("\n| Folder | Role | Component | Memory | State |\n|---|---|---|---|---|")
    for unit in status["units"]:
        state = "in use" if unit["in_use"] else f"idle {unit['idle_s']:.0f} s"
        parts = unit["source"].rstrip("/").split("/")
        # a repo id or a folder named like one; the demo's role folders also need their parent's name
        name = "/".join(parts[-2:]) if parts[-1] == unit["role"] else parts[-1]
        role = f"{unit['role']} ({unit['part']})" if unit["part"] else unit["role"]
        for index, (component, size) in enumerate(unit["components"].items()):
            first = index == 0
            if component in unit["shared"]:
                component += " (shared, counted once)"
            lines.append(f"| {name if first else ''} | {role if first else ''} | {component} | "
                         f"{format_bytes(size)} | {state if first else ''} |")
        lines.append(f"| | | **total** | **{format_bytes(unit['bytes'])}** | |")
    return "\n".join(lines)


def jobs_line(status: dict, mine=()) -> str:
    mine = list(mine)
    running_mine = bool(mine) and mine[0].started_at is not None
    if status["running"] is None:
        running = "none"
    else:
        running = f"yours ({mine[0].request.task})" if running_mine else "another user's job"
    waiting_mine = len(mine) - running_mine
    waiting = f"{status['waiting']}" + (f" ({waiting_mine} yours)" if waiting_mine else "")
    return f"**Jobs** running: {running} · waiting: {waiting}"


def seeds_text(seeds: list[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def workers_markdown(workers: list[dict]) -> str:
    """The workers of a Ray cluster (backend/cluster.py ClusterEngine.status()["workers"]), one row each."""
    lines = ["\n| Worker | Node | Device | dtype | Loaded models | Memory | State |", "|---|---|---|---|---|---|---|"]
    for worker in workers:
        loaded = []
        for unit in worker["units"]:
            parts = unit["source"].rstrip("/").split("/")
            # a repo id or a folder named like one; the demo's role folders also need their parent's name
            name = "/".join(parts[-2:]) if parts[-1] == unit["role"] else parts[-1]
            loaded.append(f"{name} ({unit['part']})" if unit["part"] else name)
        lines.append(f"| {worker['name']} | {worker['node']} | {worker['device']} | {worker['dtype']} | "
                     f"{', '.join(loaded) or 'none yet'} | {format_bytes(worker['used'])} of "
                     f"{format_bytes(worker['budget'])} | {worker['state']} |")
    return "\n".join(lines)
