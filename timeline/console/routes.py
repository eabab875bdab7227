"""GET / and its assets: the console page, its script and its style, read once at start-up
and served under content-hashed URLs with a strict Content-Security-Policy."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files

from flask import Blueprint, Flask, Response, current_app, request

from timeline.errors import NotFound

EXTENSION = "timeline.console"
PAGE = "index.html"
#: What the page loads, by the name it uses for each (rewritten to the hashed URL).
ASSET_TYPES = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
ASSET_PREFIX = "/console/"
#: Everything comes from the service itself: no inline script or style, no other origin,
#: no framing, no form posting anywhere (the page's forms are handled by its script).
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
#: An asset's URL changes with its content, so a browser may keep it for good.
IMMUTABLE = "public, max-age=31536000, immutable"
#: The page names the current assets: a browser asks again each time (a 304 when unchanged).
REVALIDATE = "no-cache"

bp = Blueprint("console", __name__)


@dataclass(frozen=True, slots=True)
class Asset:
    """One file as served: its bytes, type and validator."""

    body: bytes
    content_type: str
    etag: str


@dataclass(frozen=True, slots=True)
class Console:
    """The page, and its assets by their hashed names under /console/."""

    page: Asset
    assets: dict[str, Asset]


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:16]


def build() -> Console:
    """Read the package's files, name each asset by its content's hash and point the page at
    those names. Fails (at start-up) if the page does not reference an asset exactly once."""
    folder = files(__package__ or "timeline.console") / "assets"
    html = (folder / PAGE).read_text(encoding="utf-8")
    assets: dict[str, Asset] = {}
    for name, content_type in ASSET_TYPES.items():
        body = (folder / name).read_bytes()
        digest = _digest(body)
        stem, _, extension = name.rpartition(".")
        hashed = f"{stem}.{digest}.{extension}"
        assets[hashed] = Asset(body, content_type, digest)
        reference = f'"{name}"'
        if html.count(reference) != 1:
            raise RuntimeError(f"console page references {name} {html.count(reference)} times")
        html = html.replace(reference, f'"{ASSET_PREFIX}{hashed}"')
    page = html.encode()
    return Console(Asset(page, "text/html; charset=utf-8", _digest(page)), assets)


def _serve(asset: Asset, cache_control: str) -> Response:
    response = Response(asset.body, content_type=asset.content_type)
    response.headers["Cache-Control"] = cache_control
    response.set_etag(asset.etag)
    response.make_conditional(request.environ)  # a 304 when the browser has this one
    return response


def _console() -> Console:
    console: Console = current_app.extensions[EXTENSION]
    return console


@bp.get("/")
def page() -> Response:
    return _serve(_console().page, REVALIDATE)


@bp.get(ASSET_PREFIX + "<name>")
def asset(name: str) -> Response:
    found = _console().assets.get(name)
    if found is None:  # an unknown name, or an old hash: the same 404 as any unknown route
        raise NotFound(f"no route {request.method} {request.path}")
    return _serve(found, IMMUTABLE)


@bp.after_request
def _security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def register(app: Flask) -> None:
    """Serve the console on this app: / and /console/<hashed name>."""
    app.extensions[EXTENSION] = build()
    app.register_blueprint(bp)
