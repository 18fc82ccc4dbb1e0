"""The consent page and the error page: templates, CSS, JS and icon from gateway/oauth/static/.

The same rules as the admin page (admin/page.py): nothing fetched from elsewhere, a strict
Content-Security-Policy, no inline script or style. Values are put into the HTML templates
escaped (a client's name is whatever it registered), and `frame-ancestors 'none'` keeps the
page out of frames, so no site can dress it up and trick a click on Allow.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

CONTENT_TYPES = {
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
}
TEMPLATES = ("consent.html", "error.html")
# form-action 'none': the page's forms never submit; its script posts JSON and follows the
# redirect it is given, so the key never lands in a URL.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_SLOT = re.compile(r"\{\{(\w+)\}\}")


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str

    def response(self) -> web.Response:
        charset = "utf-8" if self.content_type.startswith("text/") else None
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
        return web.Response(
            body=self.body, content_type=self.content_type, charset=charset, headers=headers
        )


class Pages:
    """Read once when the data plane is built: a broken installation fails at start."""

    def __init__(self) -> None:
        folder = resources.files("gateway.oauth").joinpath("static")
        self._assets: dict[str, Asset] = {}
        self._templates: dict[str, str] = {}
        for entry in folder.iterdir():
            suffix = "." + entry.name.rpartition(".")[2]
            if entry.name in TEMPLATES:
                self._templates[entry.name] = entry.read_text(encoding="utf-8")
            elif entry.is_file() and suffix in CONTENT_TYPES:
                self._assets[entry.name] = Asset(entry.read_bytes(), CONTENT_TYPES[suffix])
        missing = [t for t in TEMPLATES if t not in self._templates]
        if missing:
            raise FileNotFoundError(f"gateway/oauth/static/{missing[0]} is missing")

    def asset(self, name: str) -> web.Response | None:
        found = self._assets.get(name)
        return found.response() if found is not None else None

    def consent(
        self, *, client_name: str, redirect_host: str, loopback: bool, server: str, request: str
    ) -> web.Response:
        note = "(an application on this computer)" if loopback else ""
        values = {
            "client_name": client_name,
            "redirect_host": redirect_host,
            "redirect_note": note,
            "server": server,
            "request": request,
        }
        return self._render("consent.html", values, status=200)

    def error(self, status: int, title: str, message: str) -> web.Response:
        return self._render("error.html", {"title": title, "message": message}, status=status)

    def _render(self, name: str, values: Mapping[str, str], *, status: int) -> web.Response:
        text = _SLOT.sub(
            lambda m: html.escape(values[m.group(1)], quote=True), self._templates[name]
        )
        # no-store: the consent page carries its request's token, and is good for one decision.
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-store"}
        return web.Response(
            status=status, text=text, content_type="text/html", charset="utf-8", headers=headers
        )
