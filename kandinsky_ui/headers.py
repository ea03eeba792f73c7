"""Security headers on every HTTP response of the app: the page, Gradio's API, its file routes and
its errors alike.

- `X-Content-Type-Options: nosniff`: a browser takes a file as the type the server says (an upload
  is never run as a script or page because its bytes look like one);
- `Referrer-Policy: same-origin`: the page's address (which may carry a session hash) is sent back
  to the app only, never to another site;
- `Content-Security-Policy: frame-ancestors 'self'` and, for browsers without CSP level 2,
  `X-Frame-Options: SAMEORIGIN`: another site cannot show the app in a frame and trick a click
  (clickjacking); a page of the app's own origin still can, so does a Gradio share link (the app
  itself at another address, not a frame).

On a Hugging Face Space (SPACE_ID set) the Space's page on huggingface.co shows the app in a
frame from its *.hf.space address, so there frame-ancestors also names https://huggingface.co and
X-Frame-Options (which cannot name another origin) is left out.

`SecurityHeaders` is a plain ASGI middleware: it adds each header to the response's start message
unless the route set that header itself. It goes in through the option Gradio supports,
`launch(app_kwargs={"middleware": [security_headers_middleware(), ...]})`, which hands the list to
FastAPI's constructor.
"""
from __future__ import annotations

import os

from starlette.middleware import Middleware

SPACE_FRAME_ANCESTORS = ("https://huggingface.co",)


def security_headers(frame_ancestors: tuple[str, ...] = ()) -> list[tuple[bytes, bytes]]:
    """The headers, lower-case names; `frame_ancestors`: origins besides the app's own that may frame it."""
    headers = [(b"x-content-type-options", b"nosniff"),
               (b"referrer-policy", b"same-origin"),
               (b"content-security-policy", " ".join(("frame-ancestors 'self'", *frame_ancestors)).encode())]
    if not frame_ancestors:
        headers.append((b"x-frame-options", b"SAMEORIGIN"))
    return headers


class SecurityHeaders:
    """ASGI middleware adding `headers` to every HTTP response (a header the app set is kept)."""

    def __init__(self, app, frame_ancestors: tuple[str, ...] = ()):
        self.app = app
        self.headers = security_headers(tuple(frame_ancestors))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in self.headers if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def security_headers_middleware(on_space: bool | None = None) -> Middleware:
    """For `demo.launch(app_kwargs={"middleware": [security_headers_middleware()]})`; `on_space`:
    whether huggingface.co may frame the app (default: SPACE_ID is set)."""
    if on_space is None:
        on_space = bool(os.environ.get("SPACE_ID"))
    return Middleware(SecurityHeaders, frame_ancestors=SPACE_FRAME_ANCESTORS if on_space else ())
