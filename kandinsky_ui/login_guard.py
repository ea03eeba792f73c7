"""Login throttling in front of Gradio's own login (POST /login), which otherwise checks as many
passwords as a client can send (about 300 a second on loopback).

`LoginThrottle` is the bookkeeping, with an injectable clock: failures are counted per user name
and per client address; after FREE_FAILURES in a row each further attempt is held a little longer
before Gradio checks it, and the LOCKOUT_AFTER-th locks that name (from every address) and that
address (for every name) for the lockout time, during which attempts are answered 429 with a
Retry-After header without being checked. A successful login resets its name's and address's count.

`LoginGuard` is the ASGI middleware that applies it. It goes in through an option Gradio supports:
`launch(app_kwargs={"middleware": [login_guard_middleware()]})` hands the list to FastAPI's
constructor, so it wraps Gradio's routes; it reads the login form (a copy; Gradio reads the same
bytes) for the user name, and sees Gradio's answer (200 = logged in). Holding an attempt is an
`asyncio.sleep` of that request only: other users' requests go on meanwhile.

The client address is the ASGI scope's: uvicorn (Gradio's server) replaces it with the
X-Forwarded-For address only when the connection comes from 127.0.0.1 or ::1 (a local reverse
proxy; FORWARDED_ALLOW_IPS changes that list), so a remote client cannot choose its address.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)

# A person mistyping a password a few times is not slowed at all.
FREE_FAILURES = 5
# Then each further attempt is held before it is checked, doubling: 0.25, 0.5, 1, 2, 4 s (15 s at most,
# never reached before the lockout). Short enough that a person barely notices, and a script that
# waits for its answers gets five more guesses in about 8 s instead of ~1500.
FIRST_DELAY_S = 0.25
MAX_DELAY_S = 15.0
# The 10th failure in a row locks the name and the address ...
LOCKOUT_AFTER = 10
# ... for 5 minutes: at most 10 guesses per user name (from any number of addresses) and per address
# (over any number of names) per ~5 minutes, about 120 an hour instead of ~1 million. It is also how
# long anyone else can keep a name locked by failing on purpose, so it is kept short. `--login-lockout`.
LOCKOUT_S = 300.0
# Names and addresses remembered at once (a bound on memory); the least recently admitted go first.
MAX_TRACKED = 10_000
# A login form is a user name and a password; anything bigger is not read into memory.
MAX_BODY_BYTES = 16_384
MAX_NAME_CHARS = 256
LOGIN_PATHS = ("/login", "/login/")


@dataclass
class _Record:
    failures: int = 0          # attempts since the last success, counted when admitted (see admit)
    last_seen: float = 0.0
    busy_until: float = 0.0    # an admitted attempt is held until then
    locked_until: float = 0.0


@dataclass(frozen=True)
class Admission:
    """What to do with one login attempt: refuse it (retry_after > 0: answer 429 with that many
    seconds, rounded up) or let Gradio check it after holding it `wait` seconds."""
    wait: float = 0.0
    retry_after: float = 0.0

    @property
    def refused(self) -> bool:
        return self.retry_after > 0


def attempt_delay(failures: int) -> float:
    """Seconds an attempt is held after `failures` failed attempts in a row."""
    if failures < FREE_FAILURES:
        return 0.0
    return min(FIRST_DELAY_S * 2.0 ** (failures - FREE_FAILURES), MAX_DELAY_S)


class LoginThrottle:
    """Failure counts per key ("user", name) and ("address", host). Not thread-safe: the ASGI
    middleware calls it from the event loop only, with no await between a check and its update.

    An admitted attempt counts as a failure at once and is forgotten if it succeeds, so attempts sent
    all together cannot pass the limit before their answers are known; and a key with an attempt
    being held refuses another until that one is due, so parallel attempts are not held side by side.
    """

    def __init__(self, lockout_s: float = LOCKOUT_S, clock: Callable[[], float] = time.monotonic,
                 max_tracked: int = MAX_TRACKED):
        self.lockout_s = float(lockout_s)
        self.clock = clock
        self.max_tracked = max_tracked
        self._records: OrderedDict[tuple[str, str], _Record] = OrderedDict()

    @staticmethod
    def keys(user: str | None, address: str | None) -> list[tuple[str, str]]:
        keys = []
        if user is not None:
            keys.append(("user", user.strip()[:MAX_NAME_CHARS]))   # Gradio strips the name too
        if address:
            keys.append(("address", address))
        return keys

    def _stale(self, record: _Record, now: float) -> bool:
        """Forgotten: the lockout is over, or no attempt for a lockout's time."""
        return now >= max(record.locked_until, record.busy_until, record.last_seen + self.lockout_s)

    def _live(self, key: tuple[str, str], now: float) -> _Record | None:
        record = self._records.get(key)
        return None if record is None or self._stale(record, now) else record

    def admit(self, keys: Iterable[tuple[str, str]]) -> Admission:
        now = self.clock()
        keys = list(keys)
        records = [self._live(key, now) or _Record() for key in keys]
        blocked_until = max([0.0] + [max(r.locked_until, r.busy_until) for r in records])
        if blocked_until > now:     # refused: nothing recorded, so refusals cannot crowd the table
            return Admission(retry_after=blocked_until - now)
        wait = max([0.0] + [attempt_delay(r.failures) for r in records])
        for key, record in zip(keys, records):
            record.failures += 1
            record.last_seen = now
            record.busy_until = now + wait
            if record.failures >= LOCKOUT_AFTER:
                record.locked_until = now + wait + self.lockout_s
            self._records[key] = record
            self._records.move_to_end(key)
        while len(self._records) > self.max_tracked:    # the least recently admitted first
            self._records.popitem(last=False)
        return Admission(wait=wait)

    def succeeded(self, keys: Iterable[tuple[str, str]]) -> None:
        for key in keys:
            self._records.pop(key, None)

    def failed(self, keys: Iterable[tuple[str, str]]) -> None:
        """Already counted when admitted; says so in the log when this failure locked a key."""
        for key in keys:
            record = self._records.get(key)
            if record is not None and record.failures == LOCKOUT_AFTER:
                logger.warning("login: %s %r locked for %.0f s after %d failed attempts in a row",
                               key[0], key[1], self.lockout_s, record.failures)

    def failures(self, key: tuple[str, str]) -> int:
        record = self._live(key, self.clock())
        return 0 if record is None else record.failures


class LoginGuard:
    """ASGI middleware: POST /login goes through a LoginThrottle; every other request passes as is."""

    def __init__(self, app, lockout_s: float | None = None, throttle: LoginThrottle | None = None):
        self.app = app
        self.throttle = throttle or LoginThrottle(LOCKOUT_S if lockout_s is None else lockout_s)

    @staticmethod
    def is_login(scope) -> bool:
        if scope["type"] != "http" or scope["method"] != "POST":
            return False
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        return path in LOGIN_PATHS

    async def __call__(self, scope, receive, send) -> None:
        if not self.is_login(scope):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:        # the client left, or sent more than a login form
            await JSONResponse({"detail": "Login form too large."}, status_code=413)(scope, receive, send)
            return
        client = scope.get("client")
        keys = self.throttle.keys(await login_name(scope, body), client[0] if client else None)
        admission = self.throttle.admit(keys)
        if admission.refused:
            seconds = max(1, math.ceil(admission.retry_after))
            await JSONResponse({"detail": f"Too many login attempts; try again in {seconds} s."}, status_code=429,
                               headers={"Retry-After": str(seconds)})(scope, receive, send)
            return
        if admission.wait:
            await asyncio.sleep(admission.wait)     # this request only; the event loop goes on
        status = 0

        async def send_and_watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, replay(body, receive), send_and_watch)
        if status == 200:
            self.throttle.succeeded(keys)
        else:
            self.throttle.failed(keys)


def login_guard_middleware(lockout_s: float | None = None) -> Middleware:
    """For `demo.launch(app_kwargs={"middleware": [login_guard_middleware()]})`."""
    return Middleware(LoginGuard, lockout_s=lockout_s)


async def read_body(receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """A receive() that gives the body already read, then whatever the client sends next (a disconnect)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


async def login_name(scope, body: bytes) -> str | None:
    """The form's `username` (url-encoded from gradio_client, multipart from the login page), or None."""
    request = Request(scope, replay(body, _no_more))
    try:
        form = await request.form(max_files=0, max_fields=10)
    except Exception:       # malformed: Gradio will refuse it; count it against the address
        return None
    try:
        name = form.get("username")
        return name if isinstance(name, str) else None
    finally:
        await form.close()


async def _no_more():
    return {"type": "http.disconnect"}
