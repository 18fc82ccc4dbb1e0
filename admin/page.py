"""The admin web page: one HTML page plus its CSS, JS and icon, served from admin/static/.

No build step and nothing fetched from elsewhere: the page talks only to this admin plane, which
the Content-Security-Policy pins down. The files are read once, when the app is built, so a
broken installation (package data missing) fails at start rather than on first visit.
"""

from __future__ import annotations

from aiohttp import web

from gateway.static_files import Asset, load_static

PAGE_PATH = "/admin/api-keys"
STATIC_PATH = "/admin/static/{name}"
PAGE_FILE = "api-keys.html"


def load_assets() -> dict[str, Asset]:
    """Every servable file of admin/static/, by name."""
    assets = load_static("admin")
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
