"""Who a request speaks for, who may act on the whole server, and which jobs a page still follows.

- Access: the owner id of a request. Without logins it is the browser's own random id; with logins
  (--auth) it is made from the user name, so a user has one gallery on every device and another
  user's id is refused. Server-wide actions (unload, memory budget) need an admin (--admin USER);
  without logins only a client on this machine may run them, and only while the app serves this
  machine alone.
- StopBook: a Stop counts for every generation request the server received before it, also those
  Gradio has not handed to a handler yet (request_stamps_middleware stamps each request's arrival).
  A request that arrives after the Stop runs: the server cannot tell one sent before the Stop that
  crossed it on the way from one sent after it.
- Followers: the pages (Gradio sessions) that follow each job. A page that cancels its request
  (gradio_client's job.cancel(): the middleware notes it in CANCELLED) cancels the job at once if
  nobody else follows it; a page that
  goes away (a closed tab, a killed client, a reload: Gradio closes its handler, and its heartbeat
  ends) cancels it after a grace period, in which a reloaded page re-attaches and keeps it.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import threading
import time

import gradio as gr

from backend.fields import is_owner, new_owner

RECEIVED_AT = "kandinsky_received_at"   # the request's arrival (time.monotonic()) in its ASGI scope state
# A page that went away keeps its jobs this long: a reloading page re-attaches in 1-3 s.
RECONNECT_GRACE_S = float(os.environ.get("KANDINSKY_RECONNECT_GRACE", "10"))


def request_stamps_middleware():
    """ASGI middleware stamping every HTTP request with its arrival time (for StopBook), and noting the
    session of each request cancel (Gradio's POST .../cancel, what gradio_client's job.cancel() sends)
    before Gradio acts on it (for Followers)."""
    from starlette.middleware import Middleware

    class RequestStamps:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                scope.setdefault("state", {})[RECEIVED_AT] = time.monotonic()
                if scope["method"] == "POST" and scope["path"].endswith("/cancel"):
                    receive = await _note_cancel(receive)
            await self.app(scope, receive, send)

    return Middleware(RequestStamps)


async def _note_cancel(receive):
    """Read a cancel's JSON body ({"session_hash": ..., "event_id": ..., "fn_index": ...}), note its session,
    and return a `receive` that hands the body on unchanged."""
    messages, body = [], b""
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        body += message.get("body", b"") if len(body) < 65536 else b""
        if not message.get("more_body"):
            break
    try:
        CANCELLED.note(json.loads(body)["session_hash"])
    except (ValueError, KeyError, TypeError):
        pass  # not ours to judge: Gradio answers it

    async def replay():
        return messages.pop(0) if messages else await receive()
    return replay


class CancelledSessions:
    """Sessions whose client cancelled a request in the last KEEP_S seconds."""

    KEEP_S = 10.0

    def __init__(self):
        self._lock = threading.Lock()
        self._at: dict[str, float] = {}

    def note(self, session) -> None:
        now = time.monotonic()
        with self._lock:
            self._at = {s: t for s, t in self._at.items() if now - t < self.KEEP_S}
            self._at[str(session)] = now

    def recent(self, session) -> bool:
        with self._lock:
            at = self._at.get(str(session))
        return at is not None and time.monotonic() - at < self.KEEP_S


CANCELLED = CancelledSessions()   # one app per process: filled by the middleware, read by the handlers


def received_at(request) -> float | None:
    """When the server received the HTTP request behind a Gradio event (None: not stamped). gr.Request
    forwards `state` to Starlette's request (whose state is the ASGI scope's), or keeps a copy of it
    when Gradio has copied the request for its queue."""
    try:
        return getattr(request.state, RECEIVED_AT, None)
    except AttributeError:
        return None


def is_loopback(host) -> bool:
    """A host name or address of this machine only (app.py: serving only here; Access: a local client)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host)).is_loopback
    except ValueError:
        return False


class Access:
    def __init__(self, logins: bool = False, admins=(), local_admin: bool = True, secret: str | None = None):
        self.logins = logins                  # --auth given: every request carries a user name
        self.admins = frozenset(admins)       # --admin users
        self.local_admin = local_admin        # without logins: a loopback client may run server-wide actions
        self._key = (secret or secrets.token_hex(16)).encode()

    def user_owner(self, user: str) -> str:
        """The owner id of a logged-in user: 32 hex digits that only this server's secret derives."""
        return hmac.new(self._key, b"owner:" + user.encode(), hashlib.sha256).hexdigest()[:32]

    def owner(self, owner, request) -> str:
        """The owner a request speaks for. With logins: the user's own id (a client that sends none, or
        not an id, gets it); another user's id is refused. Without: the id sent, or a fresh one."""
        if not self.logins:
            return owner if is_owner(owner) else new_owner()
        user = getattr(request, "username", None)
        if not user:
            raise gr.Error("Log in first: this server needs a login for every action.")
        mine = self.user_owner(user)
        if is_owner(owner) and owner != mine:
            raise gr.Error(f"owner: that id is not {user}'s. Leave owner out (or empty) to act as {user}.")
        return mine

    def page_owner(self, stored, request) -> str:
        """The owner a loading page takes: with logins the user's (whatever the browser kept from
        before, e.g. another user's session), else the browser's own id or a fresh one."""
        if self.logins and getattr(request, "username", None):
            return self.user_owner(request.username)
        return stored if is_owner(stored) else new_owner()

    def may_act_on_server(self, request) -> bool:
        if self.logins:
            return getattr(request, "username", None) in self.admins
        client = getattr(request, "client", None)
        return self.local_admin and client is not None and is_loopback(getattr(client, "host", None))

    def check_server_action(self, request, action: str) -> None:
        if self.may_act_on_server(request):
            return
        if self.logins:
            raise gr.Error(f"{action} changes the server for every user: only an admin may do it (this server's "
                           f"admins are started with --admin USER).")
        raise gr.Error(f"{action} changes the server for every user: without logins only a browser on the "
                       f"server's own machine may do it. Start the app with --auth and --admin USER to allow it "
                       f"from elsewhere.")


class StopBook:
    """When each owner last pressed Stop: a request the server received before that never starts."""

    KEEP_S = 600.0

    def __init__(self):
        self._lock = threading.Lock()
        self._stopped_at: dict[str, float] = {}   # owner -> its last Stop

    def stop(self, owner: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._stopped_at = {o: t for o, t in self._stopped_at.items() if now - t < self.KEEP_S}
            self._stopped_at[owner] = now

    def stopped(self, owner: str, received: float | None) -> bool:
        """Did `owner` press Stop after the server received a request at `received`?"""
        with self._lock:
            stopped_at = self._stopped_at.get(owner)
        return received is not None and stopped_at is not None and received <= stopped_at


class Followers:
    """The pages that follow each unfinished job; a job no page follows any more is cancelled."""

    def __init__(self, grace_s: float = RECONNECT_GRACE_S):
        self.grace_s = grace_s
        self._lock = threading.Lock()
        self._pages: dict[str, set] = {}    # job id -> session hashes following it
        self._jobs: dict[str, object] = {}  # job id -> job

    def follow(self, job, session) -> None:
        with self._lock:
            for job_id in [job_id for job_id, known in self._jobs.items() if known.done]:
                self._forget(job_id)  # ended while its pages were gone
            self._pages.setdefault(job.id, set()).add(session)
            self._jobs[job.id] = job

    def leave(self, job, session, cancelled: bool = False) -> None:
        """A page stopped following `job`. `cancelled`: the client cancelled its request (gradio_client's
        job.cancel()): a job nobody else follows stops now. Otherwise the page went away (Gradio closes
        a lost client's handler, a reloading page's too): a job that has not started stops now, a
        running one after the grace period unless a page re-attaches."""
        with self._lock:
            pages = self._pages.get(job.id, set())
            pages.discard(session)
            orphan = not pages
        if not orphan or job.done:
            return
        if cancelled or job.started_at is None:
            self._cancel_if_orphan(job)
        else:
            self._cancel_later(job)

    def page_closed(self, session) -> None:
        """A page went away (Gradio's unload): the jobs only it followed are cancelled after the grace
        period unless a page re-attaches (a reload) in the meantime."""
        with self._lock:
            orphans = []
            for job_id, pages in self._pages.items():
                if session in pages:
                    pages.discard(session)
                    if not pages:
                        orphans.append(self._jobs[job_id])
        for job in orphans:
            self._cancel_later(job)

    def _cancel_later(self, job) -> None:
        timer = threading.Timer(self.grace_s, self._cancel_if_orphan, args=(job,))
        timer.daemon = True
        timer.start()

    def _cancel_if_orphan(self, job) -> None:
        with self._lock:
            orphan = not self._pages.get(job.id)
            if orphan:
                self._forget(job.id)
        if orphan and not job.done:
            job.cancel()

    def _forget(self, job_id: str) -> None:
        self._pages.pop(job_id, None)
        self._jobs.pop(job_id, None)
