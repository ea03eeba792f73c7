"""Login throttling (kandinsky_ui/login_guard.py): the throttle's rules on an injected clock, the ASGI
middleware on a stand-in login route, and `python app.py --demo --auth ...` refusing a password
guesser with 429 and Retry-After while other users and addresses still log in.

On loopback the live test gives each "client" its own address with X-Forwarded-For, which uvicorn
(Gradio's server) takes from a connection from 127.0.0.1 only.
"""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from gradio_client import Client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from kandinsky_ui import login_guard
from kandinsky_ui.login_guard import (FREE_FAILURES, LOCKOUT_AFTER, LoginGuard, LoginThrottle, attempt_delay)

DELAYS = [0.25, 0.5, 1.0, 2.0, 4.0]     # the holds of attempts 6 to 10


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def fail(throttle, keys, clock, times=1):
    """`times` failed attempts, each made when it is due; the waits they were held."""
    waits = []
    for _ in range(times):
        admission = throttle.admit(keys)
        assert not admission.refused, admission
        waits.append(admission.wait)
        clock.now += admission.wait
        throttle.failed(keys)
    return waits


# ------------------------------------------------------------------------------ the rules


def test_the_holds_grow_after_the_free_failures():
    assert [attempt_delay(n) for n in range(FREE_FAILURES)] == [0.0] * FREE_FAILURES
    assert [attempt_delay(n) for n in range(FREE_FAILURES, LOCKOUT_AFTER)] == DELAYS
    assert attempt_delay(100) == login_guard.MAX_DELAY_S


def test_ten_failures_lock_the_name_everywhere_and_the_address_for_every_name():
    clock = Clock()
    throttle = LoginThrottle(lockout_s=300, clock=clock)
    alice_a = throttle.keys("alice", "203.0.113.7")
    assert fail(throttle, alice_a, clock, LOCKOUT_AFTER) == [0.0] * FREE_FAILURES + DELAYS
    refused = throttle.admit(alice_a)
    assert refused.refused and refused.retry_after == pytest.approx(300)
    assert throttle.admit(throttle.keys(" alice ", "198.51.100.2")).refused      # the name, from elsewhere
    assert throttle.admit(throttle.keys("bob", "203.0.113.7")).refused           # the address, another name
    bob_b = throttle.keys("bob", "198.51.100.3")
    assert throttle.admit(bob_b) == login_guard.Admission(wait=0.0)               # neither: not held at all
    throttle.succeeded(bob_b)
    clock.now += 299
    assert throttle.admit(alice_a).retry_after == pytest.approx(1)
    clock.now += 1                                                                 # the lockout is over
    assert throttle.admit(alice_a) == login_guard.Admission(wait=0.0)
    throttle.succeeded(alice_a)
    assert throttle.failures(("user", "alice")) == 0 and throttle.failures(("address", "203.0.113.7")) == 0


def test_a_success_resets_the_count():
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    keys = throttle.keys("alice", "203.0.113.7")
    fail(throttle, keys, clock, LOCKOUT_AFTER - 1)
    assert throttle.admit(keys).wait == DELAYS[-1]     # the 10th attempt: held 4 s, then the right password
    clock.now += DELAYS[-1]
    throttle.succeeded(keys)
    assert fail(throttle, keys, clock, FREE_FAILURES + 1) == [0.0] * FREE_FAILURES + DELAYS[:1]


def test_failures_are_forgotten_after_a_quiet_lockout_time():
    clock = Clock()
    throttle = LoginThrottle(lockout_s=60, clock=clock)
    keys = throttle.keys("alice", "203.0.113.7")
    fail(throttle, keys, clock, FREE_FAILURES + 2)
    clock.now += 59
    assert throttle.failures(("user", "alice")) == FREE_FAILURES + 2
    clock.now += 1
    assert throttle.failures(("user", "alice")) == 0 and throttle.admit(keys).wait == 0.0


def test_attempts_sent_together_are_not_all_checked():
    """Fifty attempts at one instant, none answered yet: the five free ones and one held, the rest refused
    until the held one is due; and never more than LOCKOUT_AFTER before the lockout ends."""
    clock = Clock()
    throttle = LoginThrottle(lockout_s=300, clock=clock)
    keys = throttle.keys("alice", "203.0.113.7")
    admissions = [throttle.admit(keys) for _ in range(50)]
    assert [a.wait for a in admissions if not a.refused] == [0.0] * FREE_FAILURES + DELAYS[:1]
    assert all(a.retry_after == pytest.approx(DELAYS[0]) for a in admissions if a.refused)
    checked = sum(not a.refused for a in admissions)
    while clock.now < 1000 + 300:
        clock.now += 0.05
        checked += sum(not throttle.admit(keys).refused for _ in range(5))
    assert checked == LOCKOUT_AFTER


def test_memory_is_bounded():
    clock = Clock()
    throttle = LoginThrottle(clock=clock, max_tracked=100)
    for i in range(1000):
        throttle.admit(throttle.keys(f"user{i}", f"10.0.{i // 250}.{i % 250}"))
    assert len(throttle._records) <= 100
    long = throttle.keys("x" * 100_000, "10.9.9.9")
    assert len(long[0][1]) == login_guard.MAX_NAME_CHARS


# ------------------------------------------------------------------------------ the middleware


async def stand_in_login(request: Request):
    """Gradio's /login in miniature: reads the same form the guard read."""
    form = await request.form()
    if (form.get("username"), form.get("password")) in {("alice", "wonderland"), ("bob", "builder")}:
        return JSONResponse({"success": True})
    return JSONResponse({"detail": "Incorrect credentials."}, status_code=400)


async def ping(request: Request):
    return JSONResponse({"pong": True})


def guarded(throttle):
    app = Starlette(routes=[Route("/login", stand_in_login, methods=["POST"]),
                            Route("/login/", stand_in_login, methods=["POST"]), Route("/ping", ping)])
    return LoginGuard(app, throttle=throttle)


def client_at(app, address):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 40000)),
                             base_url="http://studio")


def test_middleware_reads_both_forms_and_answers_429_with_retry_after():
    clock = Clock()
    throttle = LoginThrottle(lockout_s=120, clock=clock)
    app = guarded(throttle)

    async def run():
        async with client_at(app, "203.0.113.7") as http:
            # the browser's login page sends multipart, gradio_client url-encoded: both reach Gradio intact
            assert (await http.post("/login", files={"username": (None, "alice"),
                                                     "password": (None, "wonderland")})).status_code == 200
            assert (await http.post("/login/", data={"username": "bob", "password": "builder"})).status_code == 200
            for _ in range(FREE_FAILURES):
                assert (await http.post("/login", files={"username": (None, "alice"),
                                                         "password": (None, "x")})).status_code == 400
            assert throttle.failures(("user", "alice")) == FREE_FAILURES
            assert throttle.failures(("address", "203.0.113.7")) == FREE_FAILURES
            # as if all ten had failed: the next is refused without reaching the route
            for key in throttle.keys("alice", "203.0.113.7"):
                throttle._records[key].failures = LOCKOUT_AFTER
                throttle._records[key].locked_until = clock.now + 119.2
            response = await http.post("/login", data={"username": "alice", "password": "wonderland"})
            assert response.status_code == 429 and response.headers["retry-after"] == "120"
            assert "try again in 120 s" in response.json()["detail"]
            assert (await http.get("/ping")).status_code == 200                    # other routes pass
            big = await http.post("/login", data={"username": "bob", "password": "x" * 20_000})
            assert big.status_code == 413

    asyncio.run(run())


def test_a_held_attempt_does_not_hold_anyone_else(monkeypatch):
    monkeypatch.setattr(login_guard, "FIRST_DELAY_S", 1.0)
    throttle = LoginThrottle()
    app = guarded(throttle)
    for key in throttle.keys("alice", "203.0.113.7"):
        throttle._records[key] = login_guard._Record(failures=FREE_FAILURES, last_seen=time.monotonic())

    async def timed(http, data):
        start = time.perf_counter()
        response = await http.post("/login", data=data)
        return response.status_code, time.perf_counter() - start

    async def run():
        async with client_at(app, "203.0.113.7") as attacker, client_at(app, "198.51.100.3") as other:
            held = asyncio.create_task(timed(attacker, {"username": "alice", "password": "guess"}))
            await asyncio.sleep(0.1)
            bob = await timed(other, {"username": "bob", "password": "builder"})
            again = await timed(attacker, {"username": "alice", "password": "guess2"})    # while one is held
            return await held, bob, again

    (held_status, held_s), (bob_status, bob_s), (again_status, again_s) = asyncio.run(run())
    assert held_status == 400 and held_s >= 1.0
    assert bob_status == 200 and bob_s < 0.5
    assert again_status == 429 and again_s < 0.5


# ------------------------------------------------------------------------------ the running app

LOCKOUT_S = 6


@pytest.fixture(scope="module")
def app_options():
    return {"extra_args": ["--auth", "alice:wonderland", "--auth", "bob:builder", "--login-lockout", str(LOCKOUT_S)]}


def attempt(http, user, password, address):
    return http.post("login", data={"username": user, "password": password}, headers={"X-Forwarded-For": address})


def test_fifty_wrong_passwords_are_bounded_and_lock_only_that_name_and_address(server):
    http = httpx.Client(base_url=server.url, timeout=60)
    start = time.perf_counter()
    answers = [attempt(http, "alice", f"guess{i}", "203.0.113.7") for i in range(50)]
    elapsed = time.perf_counter() - start
    statuses = [r.status_code for r in answers]
    print(f"50 wrong passwords: {elapsed:.2f} s, {statuses.count(400)} checked (400), "
          f"{statuses.count(429)} refused (429)")
    # the first LOCKOUT_AFTER were checked, the later ones held longer and longer; the rest refused unchecked
    assert statuses == [400] * LOCKOUT_AFTER + [429] * (50 - LOCKOUT_AFTER)
    assert elapsed >= sum(DELAYS)
    retry_after = [int(r.headers["retry-after"]) for r in answers[LOCKOUT_AFTER:]]
    assert all(1 <= seconds <= LOCKOUT_S for seconds in retry_after), retry_after
    locked_at = time.monotonic()

    # the name is locked from any address, the address for any name; bob elsewhere is not
    assert attempt(http, "alice", "wonderland", "198.51.100.2").status_code == 429
    assert attempt(http, "bob", "builder", "203.0.113.7").status_code == 429
    bob = httpx.Client(base_url=server.url, timeout=60, headers={"X-Forwarded-For": "198.51.100.3"})
    assert bob.post("login", data={"username": "bob", "password": "builder"}).status_code == 200
    assert bob.get("config").status_code == 200

    # once Retry-After has passed, the right password works again, from the guesser's address too
    time.sleep(max(0.0, locked_at + retry_after[-1] - time.monotonic()) + 0.2)
    assert attempt(http, "alice", "wonderland", "203.0.113.7").status_code == 200
    assert http.get("config").status_code == 200
    Client(server.url, auth=("alice", "wonderland"), verbose=False)     # gradio_client's login too
    # and the success reset alice's count: a typo costs nothing again
    assert attempt(http, "alice", "typo", "203.0.113.7").status_code == 400
    assert attempt(http, "alice", "wonderland", "203.0.113.7").status_code == 200
