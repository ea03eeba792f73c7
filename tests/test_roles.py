"""Roles (issue 16): with logins, each user is their own owner (one gallery on every device; another
user's id is refused) and only an --admin may unload models or set the memory budget; without logins
only a client on the server's own machine may, and only while the app serves this machine alone.
`python app.py --demo --auth alice:... --auth bob:... --admin alice` through gradio_client, and the
start-up checks of --admin."""
from __future__ import annotations

import argparse
import re
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

import app
from kandinsky_ui.sessions import Access, Followers, StopBook, is_loopback

ALICE, BOB = ("alice", "wonderland-42"), ("bob", "builder-42")
SMALL = dict(width=64, height=64, num_inference_steps=3, prior_num_inference_steps=2)


@pytest.fixture(scope="module")
def app_options():
    return {"extra_args": ["--auth", ":".join(ALICE), "--auth", ":".join(BOB), "--admin", "alice"]}


@pytest.fixture(scope="module")
def login():
    return ALICE


@pytest.fixture(scope="module")
def bob(server):
    return Client(server.url, auth=BOB, verbose=False)


def test_each_user_is_one_owner_and_another_users_id_is_refused(client, bob, server):
    alice_owner, progress, *_ = client.predict(prompt="alice's", seed=1, **SMALL, api_name="/text2img")
    assert 'data-state="done"' in progress
    bob_owner, progress, *_ = bob.predict(owner="", prompt="bob's", seed=2, **SMALL, api_name="/text2img")
    assert 'data-state="done"' in progress and bob_owner != alice_owner
    # a second device of bob's (another client, any id it kept from before) is the same owner
    again, *_ = Client(server.url, auth=BOB, verbose=False).predict(owner="", prompt="bob's too", seed=3, **SMALL,
                                                                    api_name="/text2img")
    assert again == bob_owner
    with pytest.raises(AppError, match="owner: that id is not bob's"):
        bob.predict(owner=alice_owner, prompt="steal", **SMALL, api_name="/text2img")
    with pytest.raises(AppError, match="owner: that id is not bob's"):
        bob.predict(owner=alice_owner, api_name="/stop")
    assert len(server.owner_images()[alice_owner]) == 1
    assert len(server.owner_images()[bob_owner]) == 2


def test_only_an_admin_acts_on_the_whole_server(client, bob):
    with pytest.raises(AppError, match="Unloading models changes the server for every user: only an admin"):
        bob.predict(api_name="/unload")
    with pytest.raises(AppError, match="The memory budget changes the server for every user: only an admin"):
        bob.predict(text="1B", api_name="/set_memory_budget")
    assert "Budget set to" in client.predict(text="20GB", api_name="/set_memory_budget")
    assert "Unloaded" in client.predict(api_name="/unload") or "Nothing to unload" in client.predict(api_name="/unload")


def test_the_models_panel_names_only_the_readers_jobs(bob, client):
    job = client.submit(prompt="long", seed=4, **dict(SMALL, num_inference_steps=200), api_name="/text2img")
    while not any("Denoising: step" in update[1] for update in job.outputs()):
        assert not job.done()
        time.sleep(0.05)
    alice_owner = job.outputs()[-1][0]
    assert "running: yours (text2img)" in client.predict(owner=alice_owner, api_name="/models_status")
    assert "running: another user's job" in bob.predict(owner="", api_name="/models_status")
    assert client.predict(owner=alice_owner, api_name="/stop") == "Stopping after the current step…"
    job.result(timeout=60)


# ------------------------------------------------------------------ in process: the rules themselves

class FakeRequest:
    def __init__(self, username=None, host="127.0.0.1", session_hash="s1"):
        self.username, self.session_hash = username, session_hash
        self.client = argparse.Namespace(host=host)


def test_access_without_logins():
    local = Access(logins=False, local_admin=True)
    assert local.may_act_on_server(FakeRequest(host="127.0.0.1")) and local.may_act_on_server(FakeRequest(host="::1"))
    assert not local.may_act_on_server(FakeRequest(host="10.1.2.3"))
    exposed = Access(logins=False, local_admin=False)  # --host 0.0.0.0 --allow-unauthenticated, or --share
    assert not exposed.may_act_on_server(FakeRequest(host="127.0.0.1"))
    with pytest.raises(Exception, match="without logins only a browser on the server's own machine"):
        exposed.check_server_action(FakeRequest(), "Unloading models")
    assert local.owner("a" * 32, FakeRequest()) == "a" * 32
    assert len(local.owner("not an id", FakeRequest())) == 32


def test_access_with_logins():
    access = Access(logins=True, admins=("alice",), secret="s")
    alice, bob = FakeRequest("alice"), FakeRequest("bob")
    assert access.owner("", alice) == access.user_owner("alice") != access.user_owner("bob")
    assert Access(logins=True, secret="other").user_owner("alice") != access.user_owner("alice")
    assert access.page_owner("b" * 32, alice) == access.user_owner("alice")  # what the browser kept is replaced
    with pytest.raises(Exception, match="that id is not bob's"):
        access.owner(access.user_owner("alice"), bob)
    assert access.may_act_on_server(alice) and not access.may_act_on_server(bob)
    assert not access.may_act_on_server(FakeRequest("bob", host="127.0.0.1"))  # logins: loopback is no admin


def test_stop_book_stops_only_what_was_received_before():
    book = StopBook()
    before = time.monotonic()
    book.stop("o")
    after = time.monotonic()
    assert book.stopped("o", before) and not book.stopped("o", after + 0.01) and not book.stopped("p", before)
    assert not book.stopped("o", None)


def test_followers_cancel_a_job_nobody_follows():
    class Job:
        def __init__(self, id, started=True):
            self.id, self.done, self.cancelled = id, False, False
            self.started_at = 1.0 if started else None

        def cancel(self):
            self.cancelled = True

    followers = Followers(grace_s=0.2)
    shared, alone, waiting, running = Job("1"), Job("2"), Job("3", started=False), Job("4")
    followers.follow(shared, "tab")
    followers.follow(shared, "reloaded tab")
    followers.leave(shared, "tab", cancelled=True)
    assert not shared.cancelled  # another page still follows it
    followers.leave(shared, "reloaded tab", cancelled=True)
    assert shared.cancelled  # the last follower cancelled its request: at once
    # a page that went away (heartbeat ended) and came back within the grace period keeps its job
    followers.follow(alone, "tab")
    followers.page_closed("tab")
    followers.follow(alone, "tab after reload")
    time.sleep(0.4)
    assert not alone.cancelled
    followers.page_closed("tab after reload")
    time.sleep(0.4)
    assert alone.cancelled
    # a handler closed by Gradio (lost client, reload): a waiting job goes at once, a running one after the grace
    followers.follow(waiting, "t")
    followers.leave(waiting, "t")
    assert waiting.cancelled
    followers.follow(running, "t")
    followers.leave(running, "t")
    assert not running.cancelled
    time.sleep(0.4)
    assert running.cancelled


@pytest.mark.parametrize("argv, message", [
    (["--admin", "alice"], "--admin: admins are --auth users"),
    (["--auth", "bob:pw", "--admin", "alice"], "--admin: 'alice' is not a --auth/--auth-file user (users: bob)"),
    (["--max-jobs-per-user", "0"], "--max-jobs-per-user: must be 1 or more; got 0"),
])
def test_admin_and_job_limit_flags_are_checked_at_start(argv, message, monkeypatch):
    monkeypatch.delenv("KANDINSKY_STUDIO_ARGS", raising=False)
    args = app.parse_args(argv)
    with pytest.raises(SystemExit, match=re.escape(message)):
        app.check_admins(args, app.read_auth(args))


def test_loopback_names():
    assert is_loopback("localhost") and is_loopback("127.0.0.5") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com") and not is_loopback(None)


def test_a_request_received_before_a_stop_never_reaches_the_engine(engine):
    """The handler of a Generate the server received before a Stop (still in Gradio's queue, or reading its
    inputs when the Stop came) gives the engine nothing."""
    import asyncio

    from kandinsky_ui import page_config
    from kandinsky_ui.handlers import Studio
    from kandinsky_ui.sessions import RECEIVED_AT

    studio = Studio(engine, page_config(engine.models))
    owner = "c" * 32
    request = FakeRequest()
    request.state = argparse.Namespace(**{RECEIVED_AT: time.monotonic()})
    assert asyncio.run(studio.stop(owner, request=FakeRequest())) == "Nothing of yours is running."

    async def generate():
        return [update async for update in studio.text2img(owner, request=request, prompt="late", width=64,
                                                             height=64, num_inference_steps=2)]
    (update,) = asyncio.run(generate())
    assert update[0] == owner and "Stopped before it started." in update[1] and engine.jobs_of(owner) == []
    request.state = argparse.Namespace(**{RECEIVED_AT: time.monotonic()})  # sent after the Stop: it runs
    assert 'data-state="done"' in asyncio.run(generate())[-1][1]


def test_the_models_tab_turns_server_actions_off_for_who_may_not(engine):
    from kandinsky_ui import page_config
    from kandinsky_ui.handlers import Studio

    studio = Studio(engine, page_config(engine.models, logins=True, admins=("alice",)))
    unload, apply, budget, note = studio.server_actions_view(FakeRequest("bob"))
    assert unload["interactive"] is False and apply["interactive"] is False and budget["interactive"] is False
    assert note["visible"] is True and "only an admin may change them" in note["value"]
    unload, apply, budget, note = studio.server_actions_view(FakeRequest("alice"))
    assert unload["interactive"] is True and note["visible"] is False
