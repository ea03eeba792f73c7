"""Security headers (kandinsky_ui/headers.py) on every response: nosniff, Referrer-Policy, and framing
by the app's own origin only (CSP frame-ancestors, X-Frame-Options); on a Hugging Face Space
huggingface.co may frame it too. The middleware on a stand-in app, then the running app with and
without logins (the login guard still answers 429 beside it), then Chromium: a page of the app's
origin shows the app in a frame, a page of another origin cannot."""
from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient

from kandinsky_ui.headers import SecurityHeaders, security_headers_middleware
from tests.ui.server import AppServer

EXPECTED = {"x-content-type-options": "nosniff", "referrer-policy": "same-origin",
            "content-security-policy": "frame-ancestors 'self'", "x-frame-options": "SAMEORIGIN"}


def assert_headers(response, expected=EXPECTED):
    for name, value in expected.items():
        assert response.headers.get_list(name) == [value], (str(response.url), name, response.headers.get_list(name))


def stand_in(middleware: Middleware) -> TestClient:
    async def page(request):
        return PlainTextResponse("page")

    async def own(request):
        return PlainTextResponse("own", headers={"X-Frame-Options": "DENY"})

    async def socket(websocket):
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    routes = [Route("/", page), Route("/own", own), WebSocketRoute("/ws", socket)]
    return TestClient(Starlette(routes=routes, middleware=[middleware]))


def test_every_response_gets_the_headers_and_a_route_keeps_its_own(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    client = stand_in(security_headers_middleware())
    assert_headers(client.get("/"))
    assert_headers(client.get("/missing"))                          # errors too
    assert client.get("/missing").status_code == 404
    own = client.get("/own")
    assert_headers(own, {**EXPECTED, "x-frame-options": "DENY"})    # not doubled, not weakened
    with client.websocket_connect("/ws") as websocket:              # other scopes pass through
        assert websocket.receive_text() == "hi"


def test_on_a_space_huggingface_co_may_frame_the_app(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/studio")
    response = stand_in(security_headers_middleware()).get("/")
    assert response.headers["content-security-policy"] == "frame-ancestors 'self' https://huggingface.co"
    assert "x-frame-options" not in response.headers                # it cannot name another origin
    assert response.headers["x-content-type-options"] == "nosniff"
    monkeypatch.delenv("SPACE_ID")
    assert_headers(stand_in(security_headers_middleware()).get("/"))
    assert "x-frame-options" not in stand_in(Middleware(SecurityHeaders, frame_ancestors=("https://x.org",))).get(
        "/").headers


# ------------------------------------------------------------------------------ the running app


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_app_sends_them_on_the_page_the_api_and_file_routes(server, client):
    http = httpx.Client(base_url=server.url, timeout=30)
    page = http.get("")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert_headers(page)
    for route in ("config", "gradio_api/info", "gradio_api/openapi.json", "no-such-route",
                  "gradio_api/file=/etc/passwd"):
        assert_headers(http.get(route))
    uploaded = http.post("gradio_api/upload", files={"files": ("red.png", png_bytes(), "image/png")})
    assert uploaded.status_code == 200
    assert_headers(uploaded)
    (path,) = uploaded.json()
    served = http.get(f"gradio_api/file={path}")
    assert served.status_code == 200 and served.content == png_bytes()
    assert_headers(served)
    assert client.view_api(return_format="dict", print_info=False)["named_endpoints"]   # gradio_client works


def test_with_logins_both_middlewares_work(tmp_path):
    server = AppServer(tmp_path, extra_args=["--auth", "alice:wonderland", "--login-lockout", "60"])
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        assert_headers(http.get(""))                                  # the login page
        assert_headers(http.get("config"))                            # 401
        statuses = []
        for _ in range(11):
            response = http.post("login", data={"username": "alice", "password": "wrong"})
            statuses.append(response.status_code)
            assert_headers(response)
        assert statuses[:10] == [400] * 10 and statuses[10] == 429 and response.headers["retry-after"]
    finally:
        server.stop()


def test_a_page_of_the_apps_origin_can_frame_it_and_another_origin_cannot(server):
    """The host pages are served to Chromium by request interception at the app's own origin
    (127.0.0.1:port) and at another (localhost:port: another host is another origin)."""
    from playwright.sync_api import sync_playwright

    from tests.ui.conftest import CHROMIUM, CHROMIUM_ARGS

    port = server.port
    host_page = f'<html><body><iframe id="app" src="http://127.0.0.1:{port}/" width="1200" height="900">' \
                f'</iframe></body></html>'
    with sync_playwright() as playwright:
        # Chromium's local network access checks would block a localhost page's frame of 127.0.0.1 before
        # the app answers: off, so that what is tested is the app's answer
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            *CHROMIUM_ARGS, "--disable-features=LocalNetworkAccessChecks,BlockInsecurePrivateNetworkRequests"])
        try:
            context = browser.new_context()
            context.route("**/embed-test.html", lambda route: route.fulfill(
                status=200, content_type="text/html", body=host_page))
            page = context.new_page()
            page.set_default_timeout(60_000)

            page.goto(f"http://127.0.0.1:{port}/embed-test.html")
            frame = page.frame_locator("#app")
            frame.locator("#generate").wait_for()          # the app runs in the frame

            failures, console = [], []
            page.on("requestfailed", lambda request: failures.append((request.url, request.failure)))
            page.on("console", lambda message: console.append(message.text))
            page.goto(f"http://localhost:{port}/embed-test.html")
            page.wait_for_timeout(5000)
            app_frame = page.frame(url=lambda url: url.startswith(f"http://127.0.0.1:{port}"))
            shown = app_frame is not None and app_frame.locator("#generate-text2img").count() > 0
            assert not shown, "another origin could frame the app"
            assert (f"http://127.0.0.1:{port}/", "net::ERR_BLOCKED_BY_RESPONSE") in failures, failures
            assert any("frame-ancestors 'self'" in text for text in console), console
        finally:
            browser.close()
