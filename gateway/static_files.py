"""The files of a page Keystile serves itself (the admin page, the OAuth consent and error
pages), read once from a package's static/ folder, and the headers every one of them carries.

Nothing is fetched from elsewhere and nothing is inline, which the Content-Security-Policy pins
down. The files are read when the app is built, so a broken installation (package data
missing) fails at start rather than on first visit.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

CONTENT_TYPES = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
}
# default-src 'self' covers scripts, styles, images and fetch; the rest closes what it leaves
# open. form-action 'none': no form ever submits (the pages' scripts post JSON), so a key typed
# into one never lands in a URL. frame-ancestors 'none': no site can frame a page and dress it
# up to trick a click.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str

    def response(self) -> web.Response:
        charset = "utf-8" if self.content_type.startswith("text/") else None
        return web.Response(
            body=self.body,
            content_type=self.content_type,
            charset=charset,
            headers=SECURITY_HEADERS,
        )


def load_static(package: str, *, leave_out: Collection[str] = ()) -> dict[str, Asset]:
    """Every servable file of `package`'s static/ folder, by name, but those in `leave_out`."""
    folder = resources.files(package).joinpath("static")
    assets: dict[str, Asset] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES and entry.name not in leave_out:
            assets[entry.name] = Asset(entry.read_bytes(), CONTENT_TYPES[suffix])
    return assets
