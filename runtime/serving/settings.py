"""What an operator sets that the command line shows before anything heavy loads: a request's defaults and
uvicorn's listener settings (the server's own settings are app.ServerSettings, its limits limits.ServerLimits)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import GenerationConfig

# The settings of a request that names none (max_tokens -> gen_length): shorter answers than a library call's.
SERVE_DEFAULTS = GenerationConfig(gen_length=64)


@dataclass(frozen=True)
class ListenerSettings:
    """uvicorn's (listener.py). timeout_keep_alive: seconds an idle keep-alive connection stays open; timeout_read:
    seconds a client has to send a whole request (head and body) from its connection or its request's first byte;
    shutdown_timeout: seconds from SIGTERM to exit, running requests included."""

    host: str = "127.0.0.1"
    port: int = 8000
    timeout_keep_alive: int = 5
    timeout_read: float = 30
    shutdown_timeout: float = 30

    def __post_init__(self):
        if not isinstance(self.timeout_keep_alive, int) or self.timeout_keep_alive < 1:
            raise ValueError(f"--timeout-keep-alive must be an integer >= 1, got {self.timeout_keep_alive!r}")
        for name in ("timeout_read", "shutdown_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"--{name.replace('_', '-')} must be a number of seconds > 0, got {value!r}")
