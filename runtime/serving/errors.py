"""OpenAI's error JSON, {"error": {"message", "type", "param", "code"}}.

Faults (anything not the request's own doing) are answered "internal error" with the request's id; the detail
goes only to the server's log, under that id.
"""

from __future__ import annotations

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "request_too_large", 500: "server_error", 503: "service_unavailable", 504: "timeout_error"}


class APIError(Exception):
    """An error answered as OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None, counted: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.counted = counted  # the scheduler has counted this request's outcome already

    @property
    def type(self) -> str:
        return TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        """A Starlette JSONResponse (imported here: the CLI reads the limits' defaults without loading the server)."""
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def internal_error(request_id: str, counted: bool = False) -> APIError:
    return APIError(500, f"internal error (request {request_id}): the server's log has the details", None,
                    "internal_error", {"x-request-id": request_id}, counted)
