"""The admin web page: one HTML page plus its CSS, JS and icon, served from admin/static/.

No build step and nothing fetched from elsewhere: the page talks only to this admin plane, which
the Content-Security-Policy pins down. The files are read once, when the app is built, so a
broken installation (package data missing) fails at start rather than on first visit.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from aiohttp import web

PAGE_PATH = "/admin/api-keys"
STATIC_PATH = "/admin/static/{name}"
PAGE_FILE = "api-keys.html"
CONTENT_TYPES = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
}
# default-src 'self' covers scripts, styles, images and fetch; the rest closes what it leaves
# open. form-action 'none': no form ever submits, so a key typed into one never lands in a URL.
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


def load_assets() -> dict[str, Asset]:
    """Every servable file of admin/static/, by name."""
    folder = resources.files("admin").joinpath("static")
    assets: dict[str, Asset] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            assets[entry.name] = Asset(entry.read_bytes(), CONTENT_TYPES[suffix])
    if PAGE_FILE not in assets:
        raise FileNotFoundError(f"admin/static/{PAGE_FILE} is missing from the installation")
    return assets


class AdminPage:
    def __init__(self, assets: dict[str, Asset]) -> None:
        self._page = assets[PAGE_FILE]
        self._static = {name: a for name, a in assets.items() if name != PAGE_FILE}

    async def page(self, _: web.Request) -> web.Response:
        return self._page.response()

    async def static(self, request: web.Request) -> web.Response:
        asset = self._static.get(request.match_info["name"])
        if asset is None:
            raise web.HTTPNotFound()
        return asset.response()


def add_routes(app: web.Application) -> None:
    """`GET /admin/api-keys` (the page) and `GET /admin/static/{name}` (its files)."""
    page = AdminPage(load_assets())
    app.router.add_get(PAGE_PATH, page.page)
    app.router.add_get(STATIC_PATH, page.static)
