"""JSON responses serialized with orjson (UTF-8, no ASCII escaping of Chinese text)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse

from gateway.service.gateway import Audited

__all__ = ["Json", "audited_json"]


class Json(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def audited_json(result: Audited, status_code: int = 200) -> Json:
    """The use case's body, with the index of its audit entry in the ``Audit-Index`` header."""
    return Json(result.body, status_code=status_code,
                headers={"Audit-Index": str(result.audit_id)})
