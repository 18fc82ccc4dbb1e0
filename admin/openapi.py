"""The OpenAPI 3 document of the admin API."""

from __future__ import annotations

from typing import Any


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Keystile admin API", "version": "1"},
        "paths": {},
    }
