"""API keys: `Authorization: Bearer KEY` on every path but the open ones, compared in constant time.

A plain ASGI middleware rather than FastAPI's HTTPBearer dependency: a dependency runs after the body has been
read and parsed, and a request without a valid key must cost nothing (no body read, no JSON, no engine work).
"""

from __future__ import annotations

import hmac
import os

from .errors import APIError

ENV_VAR = "LLADA_V_API_KEY"


def api_keys(given: list[str] | None, environ=os.environ) -> tuple[str, ...]:
    """The keys from --api-key (repeatable) and the LLADA_V_API_KEY variable (several separated by commas)."""
    keys = list(given or []) + [key for key in environ.get(ENV_VAR, "").split(",") if key.strip()]
    keys = [key.strip() for key in keys]
    if any(not key for key in keys):
        raise ValueError("an API key cannot be empty")
    return tuple(dict.fromkeys(keys))


class ApiKeyCheck:
    """Refuses a request to any path outside `open_paths` (exact paths, or prefixes written with a final "*") with
    OpenAI's 401 error JSON unless it carries one of `keys`. Every key is compared, with hmac.compare_digest, so the time taken
    does not tell which key or how much of one matched."""

    def __init__(self, app, keys: tuple[str, ...], open_paths: tuple[str, ...]):
        if not keys:
            raise ValueError("ApiKeyCheck needs at least one key")
        self.app, self.keys, self.open_paths = app, [key.encode() for key in keys], open_paths

    def is_open(self, path: str) -> bool:
        return any(path == p or p.endswith("*") and path.startswith(p[:-1]) for p in self.open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.is_open(scope["path"]):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        valid = False
        for key in self.keys:
            valid |= hmac.compare_digest(token.strip(), key)
        if valid and scheme.lower() == b"bearer":
            return await self.app(scope, receive, send)
        message = ("this server needs an API key: send it as the header `Authorization: Bearer KEY`" if not header
                   else "the API key is not valid for this server (expected `Authorization: Bearer KEY`)")
        refusal = APIError(401, message, None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        await refusal.response()(scope, receive, send)
