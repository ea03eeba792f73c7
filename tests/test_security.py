"""Security: a login whenever the app is reachable beyond loopback; no file outside the app's own
folders through Gradio's routes (path traversal, symlinks, server paths in inputs); outputs only
under the outputs folder with names the app makes; the PNG-info reader bounded.

The live checks run `python app.py --demo --auth alice:wonderland` on loopback: every data route
must refuse a client without the login, and a logged-in client must still get nothing outside
the outputs folder, Gradio's upload cache and the page's own assets.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import struct
import time
import zlib

import httpx
import pytest
from gradio_client import Client
from PIL import Image

import app
from backend import metadata
from backend.metadata import OutputStore, read_png_texts, read_settings
from tests.ui.server import ROOT

LOGIN = ("alice", "wonderland")
OWNER = "ab" * 16
SECRET = "TOPSECRET-5f1c0d"
TINY = dict(width=64, height=64, num_inference_steps=2, prior_num_inference_steps=2, preview="off")


# ------------------------------------------------------------------------------ who may connect


def exposure(argv, env=None, monkeypatch=None):
    for name in ("KANDINSKY_STUDIO_ARGS", "GRADIO_SERVER_NAME", "SPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    args = app.parse_args(argv)
    app.check_exposure(args, app.read_auth(args))
    return args


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.7", "203.0.113.9", "example.org",
                                  "localhost.example.org", "127.0.0.1.nip.io", "", "0", "::ffff:127.0.0.1"])
def test_beyond_loopback_without_a_login_is_refused(host, monkeypatch):
    with pytest.raises(SystemExit, match="refusing to serve"):
        exposure(["--host", host], monkeypatch=monkeypatch)
    exposure(["--host", host, "--auth", "alice:wonderland"], monkeypatch=monkeypatch)   # with a login: fine
    exposure(["--host", host, "--allow-unauthenticated"], monkeypatch=monkeypatch)      # said explicitly: fine


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_login_but_a_share_link_does(host, monkeypatch):
    exposure(["--host", host], monkeypatch=monkeypatch)
    with pytest.raises(SystemExit, match="gradio.live"):
        exposure(["--host", host, "--share"], monkeypatch=monkeypatch)


def test_every_way_of_setting_the_host_is_checked(monkeypatch):
    with pytest.raises(SystemExit, match="refusing"):
        exposure([], env={"GRADIO_SERVER_NAME": "0.0.0.0"}, monkeypatch=monkeypatch)
    with pytest.raises(SystemExit, match="refusing"):
        exposure([], env={"KANDINSKY_STUDIO_ARGS": "--host 0.0.0.0"}, monkeypatch=monkeypatch)
    with pytest.raises(SystemExit, match="refusing"):
        exposure([], env={"KANDINSKY_STUDIO_ARGS": "--share"}, monkeypatch=monkeypatch)
    # a login from the environment counts, the command line's host too
    exposure(["--host", "0.0.0.0"], env={"KANDINSKY_STUDIO_ARGS": "--auth a:b"}, monkeypatch=monkeypatch)
    # on a Hugging Face Space the Space's visibility decides
    exposure(["--host", "0.0.0.0"], env={"SPACE_ID": "someone/studio"}, monkeypatch=monkeypatch)


@pytest.mark.parametrize("pair", ["alice", "alice:", ":secret", ""])
def test_malformed_logins_are_refused(pair, monkeypatch):
    with pytest.raises(SystemExit, match="USER:PASSWORD"):
        exposure(["--host", "0.0.0.0", "--auth", pair], monkeypatch=monkeypatch)


def test_login_file(tmp_path, monkeypatch):
    logins = tmp_path / "logins.txt"
    logins.write_text("# team\nalice:won:der:land\n\n  bob:builder  \n")
    args = exposure(["--host", "0.0.0.0", "--auth-file", str(logins)], monkeypatch=monkeypatch)
    assert app.read_auth(args) == [("alice", "won:der:land"), ("bob", "builder")]
    with pytest.raises(SystemExit, match="cannot read"):
        exposure(["--host", "0.0.0.0", "--auth-file", str(tmp_path / "missing.txt")], monkeypatch=monkeypatch)


# ------------------------------------------------------------------------------ the running app


@pytest.fixture(scope="module")
def app_options():
    return {"extra_args": ["--auth", ":".join(LOGIN)]}


@pytest.fixture(scope="module")
def login():
    return LOGIN


@pytest.fixture(scope="module")
def session(server, client):
    """Files the app must never serve next to its outputs; plain HTTP with the login cookie; one
    generated image of the login."""
    (server.workdir / "secret.txt").write_text(SECRET)
    Image.new("RGB", (8, 8), "red").save(server.workdir / "secret.png")
    http = httpx.Client(base_url=server.url, timeout=30)
    assert http.post("login", data={"username": LOGIN[0], "password": LOGIN[1]}).status_code == 200
    result = client.predict(prompt="mine", **TINY, api_name="/text2img")
    assert 'data-state="done"' in result[1]
    return http


@pytest.fixture(scope="module")
def login_owner(session, client):
    """The owner the login acts as: made from the user name (kandinsky_ui/sessions.py), the same for
    every request of that login."""
    return client.predict(prompt="mine too", **TINY, api_name="/text2img")[0]


DATA_ROUTES = [("GET", "config"), ("GET", "gradio_api/info"), ("GET", "gradio_api/openapi.json"),
               ("GET", "gradio_api/file=/etc/passwd"), ("GET", "gradio_api/queue/data?session_hash=x"),
               ("GET", "gradio_api/call/text2img/x"), ("GET", "gradio_api/upload_progress?upload_id=x"),
               ("POST", "gradio_api/upload"), ("POST", "gradio_api/queue/join"), ("POST", "gradio_api/call/text2img"),
               ("POST", "gradio_api/run/predict"), ("POST", "gradio_api/api/text2img"),
               ("POST", "gradio_api/component_server"), ("POST", "gradio_api/process_recording")]


def test_every_data_route_needs_the_login(server, session):
    anonymous = httpx.Client(base_url=server.url, timeout=30)
    for method, route in DATA_ROUTES:
        response = anonymous.request(method, route, json={})
        assert response.status_code == 401, (method, route, response.status_code, response.text[:200])
    assert anonymous.post("login", data={"username": "alice", "password": "wrong"}).status_code == 400
    assert "generate-text2img" not in anonymous.get("").text      # the login page, not the app
    with pytest.raises(Exception):
        Client(server.url, verbose=False)
    with pytest.raises(Exception):
        Client(server.url, auth=("alice", "wrong"), verbose=False)
    # logged in, the same routes answer
    assert session.get("config").status_code == 200 and session.get("gradio_api/info").status_code == 200


def traversal_paths(server, owner) -> dict[str, list[str]]:
    """Requests for files the app must not serve, grouped by target (raw paths: no client normalises them)."""
    work, out = server.workdir, server.outputs
    own = out / owner
    link = own / "link.png"
    if not link.exists():
        link.symlink_to(work / "secret.txt")           # a link planted inside the outputs folder
    secret = str(work / "secret.txt")
    outside = {
        "secret": [secret, "/" + secret, f"{own}/../../secret.txt", f"{out}/..%2fsecret.txt",
                   f"{out}/%2e%2e/secret.txt", f"{out}/%2e%2e%2fsecret.txt", f"{out}/..%252fsecret.txt",
                   f"{out}/..%5csecret.txt", f"{out}/....//secret.txt", f"{out}%00/../secret.txt",
                   f"{own}/link.png", secret.replace("/", "%2f"), "file://" + secret],
        "browser secret": [f"{out}/.browser-secret", f"{out}/%2Ebrowser-secret", f"{out}/./.browser-secret",
                           f"{own}/../.browser-secret", str(out).upper() + "/.BROWSER-SECRET"],
        "system": ["/etc/passwd", "/proc/self/environ", "/proc/self/cmdline", "../../../../../../etc/passwd",
                   "%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd"],
        "app": [str(ROOT / "app.py"), "app.py", str(server.log_path), str(server.models)],
        "ssrf": [f"{server.url}config", f"http://localhost:{server.port}/gradio_api/info",
                 "http://169.254.169.254/latest/meta-data/"],
    }
    requests = {target: [prefix + path for prefix in ("/gradio_api/file=", "/file=", "/gradio_api/file/", "/file/")
                         for path in paths] for target, paths in outside.items()}
    requests["static"] = ["/static/../../../../../etc/passwd", "/static/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
                          "/assets/..%2f..%2f..%2f..%2f..%2f..%2fetc/passwd",
                          "/svelte/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                          "/gradio_api/static/..%2f..%2fetc/passwd", f"/gradio_api/proxy={server.url}config",
                          "/gradio_api/custom_component/x/client/..%2f..%2f..%2f/etc%2fpasswd",
                          "/theme.css/../../etc/passwd", "/gradio_api/stream/x/0/0/..%2f..%2fetc%2fpasswd"]
    return requests


def raw_get(server, cookie: str, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", path, headers={"Cookie": cookie})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_no_file_outside_the_apps_folders_through_the_file_routes(server, session, login_owner):
    cookie = "; ".join(f"{name}={value}" for name, value in session.cookies.items())
    mine = server.owner_images()[login_owner][0]
    status, body = raw_get(server, cookie, f"/gradio_api/file={mine}")
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"      # the route works for what it should serve
    browser_secret = (server.outputs / ".browser-secret").read_bytes().strip()
    tried = 0
    for target, paths in traversal_paths(server, login_owner).items():
        for path in paths:
            status, body = raw_get(server, cookie, path)
            tried += 1
            assert status in (400, 403, 404, 405, 422), (target, path, status, body[:200])
            for leak in (SECRET.encode(), browser_secret, b"root:x:0", b"PATH=", b"def main("):
                assert leak not in body, (target, path)
    print(f"\n{tried} traversal requests refused")


def raw_call(server, session, client, api: str, **kwargs):
    endpoint = client.view_api(print_info=False, return_format="dict")["named_endpoints"][f"/{api}"]
    data = [kwargs.pop(p["parameter_name"], p.get("parameter_default")) for p in endpoint["parameters"]]
    event = session.post(f"gradio_api/call/{api}", json={"data": data}).json()["event_id"]
    return session.get(f"gradio_api/call/{api}/{event}").text


@pytest.mark.parametrize("target", ["secret.png", "outputs/.browser-secret", "other-owner.png", "/etc/passwd"])
def test_inputs_cannot_name_files_on_the_server(target, server, session, client, login_owner):
    """A file input must have been uploaded: a path on the server is refused before any handler."""
    if target == "other-owner.png":
        other = server.owner_images()[login_owner][0]
        path = str(other)
    elif target.startswith("/"):
        path = target
    else:
        path = str(server.workdir / target)
    payload = {"path": path, "orig_name": "x.png", "meta": {"_type": "gradio.FileData"}}
    answer = raw_call(server, session, client, "img2img", owner="cd" * 16, prompt="x", image=payload, **TINY)
    assert "event: error" in answer and re.search("not uploaded by a user|blocked_paths", answer), answer[-500:]
    answer = raw_call(server, session, client, "png_info", file=payload)
    assert "event: error" in answer and "mine" not in answer, answer[-500:]
    assert "cd" * 16 not in server.owner_images()


NAME_RE = re.compile(r"^[0-9a-f]{32}/(\d{8}-\d{6}-\d{4}[0-9a-f]{4}-\d+(-partial)?\.png|inputs/[0-9a-f]{20}\.png)$")


@pytest.mark.parametrize("owner", ["../../evil", "/etc", "..", "a" * 31 + "/", "AB" * 16, "ab" * 16 + "/../x",
                                   "ab" * 16 + "\x00", "%2e%2e%2f" * 4])
def test_owner_ids_from_clients_never_reach_a_path(owner, server, client):
    result = client.predict(owner=owner, prompt="who am i", **TINY, api_name="/text2img")
    given = result[0]
    assert given != owner and re.fullmatch(r"[0-9a-f]{32}", given) and 'data-state="done"' in result[1]
    assert (server.outputs / given).is_dir()


def test_the_app_writes_only_under_outputs_with_names_it_makes(server, client, login_owner):
    """After everything above: the outputs tree holds only generated names; nothing else was written."""
    job = client.submit(owner=login_owner, prompt="stop me", **dict(TINY, num_inference_steps=200, width=128, height=128,
                                                               preview="fast"), api_name="/text2img")
    while not any("Denoising: step" in update[1] for update in job.outputs()):
        assert not job.done(), job.outputs()[-1:]
        time.sleep(0.05)
    client.predict(owner=login_owner, api_name="/stop")
    job.result(timeout=60)
    assert any(p.name.endswith("-partial.png") for p in server.owner_images()[login_owner])
    written = sorted(str(p.relative_to(server.outputs)) for p in server.outputs.rglob("*") if p.is_file())
    odd = [name for name in written if name != ".browser-secret" and not NAME_RE.match(name)
           and not name.endswith("link.png")]                 # the link is the test's own
    assert written and not odd, odd
    assert (server.outputs / ".browser-secret").stat().st_mode & 0o077 == 0
    extra = {p.name for p in server.workdir.iterdir()} - {"outputs", "models", "app.log", "secret.txt", "secret.png"}
    assert not extra, extra


# ------------------------------------------------------------------------------ outputs, in process


@pytest.mark.parametrize("owner", ["../x", "..", "a/b", "/etc", "", "a" * 65, "x\x00y", "ä", "a b", ".hidden", "bob",
                                   "AB" * 16])
def test_output_store_refuses_owner_names_that_are_not_plain(owner, tmp_path):
    store = OutputStore(tmp_path / "out")
    with pytest.raises(ValueError, match="owner"):
        store.save(Image.new("RGB", (8, 8)), {"seed": 1}, owner)
    assert not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("seed", ["../../evil", "1/../../x", 1.5, None, "7"])
def test_file_names_are_made_from_numbers_only(seed, tmp_path):
    store = OutputStore(tmp_path / "out")
    with pytest.raises(ValueError, match="seed"):
        store.save(Image.new("RGB", (8, 8)), {"seed": seed}, OWNER)
    path = store.save(Image.new("RGB", (8, 8)), {"seed": 2**32 - 1, "partial": True}, OWNER)
    assert path.parent == store.root / OWNER and re.fullmatch(r"\d{8}-\d{6}-\d{4}[0-9a-f]{4}-4294967295-partial\.png",
                                                               path.name)
    assert [p.name for p in (tmp_path / "out" / OWNER).iterdir()] == [path.name]   # no .tmp left behind


@pytest.mark.parametrize("reference", ["inputs/../../x.png", "../inputs/" + "0" * 20 + ".png", "/etc/passwd",
                                       "inputs/" + "0" * 20 + ".png/../../x", "inputs/" + "G" * 20 + ".png"])
def test_input_references_from_a_png_are_checked(reference, tmp_path):
    store = OutputStore(tmp_path / "out")
    with pytest.raises(ValueError, match="not an input image reference"):
        store.input_path(OWNER, reference)


def test_selected_images_must_be_the_owners_own(tmp_path):
    """Paths that come back from the browser (the gallery selection) are checked before use."""
    import gradio as gr

    from kandinsky_ui.gallery import Gallery

    store = OutputStore(tmp_path / "out")
    mine = store.save(Image.new("RGB", (8, 8)), {"seed": 1}, OWNER)
    theirs = store.save(Image.new("RGB", (8, 8)), {"seed": 2}, "cd" * 16)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    link = store.root / OWNER / "link.png"
    link.symlink_to(outside)
    gallery = Gallery(store, limit=100)
    assert gallery.selected_image(OWNER, str(mine)).size == (8, 8)
    for path in (theirs, outside, link, store.root / OWNER / ".." / ("cd" * 16) / theirs.name, "/etc/passwd", ""):
        with pytest.raises(gr.Error):
            gallery.selected_image(OWNER, str(path))


# ------------------------------------------------------------------------------ PNG info bounds


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(*chunks: bytes, width: int = 8, height: int = 8) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + b"".join(chunks)
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def itxt(key: str, text: str, compressed: bool = False) -> bytes:
    body = zlib.compress(text.encode()) if compressed else text.encode()
    return _chunk(b"iTXt", key.encode() + b"\0" + bytes([int(compressed), 0]) + b"\0\0" + body)


def test_png_info_reads_text_chunks_without_decoding_pixels():
    settings = json.dumps({"prompt": "ünïcode 🦊", "seed": 3})
    data = png(_chunk(b"tEXt", b"Software\0other tool"), itxt("kandinsky_studio", settings, compressed=True),
               _chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"a cat\nSteps: 30, Seed: 7")),
               width=60000, height=60000)       # 3.6 gigapixels: decoding would take 10 GB
    started = time.perf_counter()
    texts = read_png_texts(data)
    assert texts == {"kandinsky_studio": settings, "parameters": "a cat\nSteps: 30, Seed: 7"}
    assert read_settings(data) == {"prompt": "ünïcode 🦊", "seed": 3}
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("data,message", [
    (b"GIF89a" + b"\0" * 100, "not a PNG file"),
    (b"\x89PNG\r\n\x1a\n", "cut short before its header"),
    (b"\x89PNG\r\n\x1a\n" + bytes(range(64)), "damaged"),
    (png(_chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"x" * (50 << 20), 9))), "unpacks to more than"),
    (png(itxt("kandinsky_studio", "y" * (3 << 20), compressed=True)), "unpacks to more than"),
    (png(_chunk(b"tEXt", b"parameters\0" + b"z" * ((1 << 20) + 1))), "at most 1,048,576 are read"),
    (png(_chunk(b"zTXt", b"parameters\0\1" + b"junk")), "unknown compression method"),
    (png(_chunk(b"zTXt", b"parameters\0\0" + b"not zlib")), "not valid compressed data"),
    (png(_chunk(b"iTXt", b"parameters\0\0\0\0\0\xff\xfe")), "not UTF-8"),
    (png()[:33] + _chunk(b"tEXt", b"parameters\0" + b"q" * 100)[:60], "truncated inside"),
])
def test_png_info_refuses_what_it_should_not_read(data, message):
    with pytest.raises(ValueError, match=message):
        read_png_texts(data)


def test_png_info_file_size_and_chunk_count_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(metadata, "MAX_PNG_BYTES", 1000)
    big = tmp_path / "big.png"
    big.write_bytes(png(_chunk(b"tEXt", b"Comment\0" + b"c" * 2000)))
    with pytest.raises(ValueError, match="PNG info reads files up to"):
        read_settings(big)
    monkeypatch.setattr(metadata, "MAX_PNG_BYTES", 50 * 2**20)
    monkeypatch.setattr(metadata, "MAX_PNG_CHUNKS", 50)
    many = tmp_path / "many.png"
    many.write_bytes(png(*[_chunk(b"tIME", b"\0" * 7)] * 60))
    with pytest.raises(ValueError, match="more than 50 chunks"):
        read_settings(many)
    assert os.path.getsize(many) < 2000
