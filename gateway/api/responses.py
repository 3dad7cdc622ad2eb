"""JSON responses serialized with orjson (UTF-8, no ASCII escaping of Chinese text)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse

__all__ = ["Json"]


class Json(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
