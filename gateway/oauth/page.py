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
from importlib import resources

from aiohttp import web

from gateway.static_files import SECURITY_HEADERS, load_static

TEMPLATES = ("consent.html", "error.html")
_SLOT = re.compile(r"\{\{(\w+)\}\}")


class Pages:
    """Read once when the data plane is built: a broken installation fails at start."""

    def __init__(self) -> None:
        folder = resources.files("gateway.oauth").joinpath("static")
        self._assets = load_static("gateway.oauth", leave_out=TEMPLATES)
        self._templates: dict[str, str] = {}
        for name in TEMPLATES:
            template = folder.joinpath(name)
            if not template.is_file():
                raise FileNotFoundError(f"gateway/oauth/static/{name} is missing")
            self._templates[name] = template.read_text(encoding="utf-8")

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
