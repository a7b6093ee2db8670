"""What an operator sets, importable without the server's dependencies, so the command line shows its defaults
before anything heavy loads: a request's defaults, the server's settings and uvicorn's listener settings (what one
request may cost is limits.ServerLimits)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..backends import check_backend
from ..config import GenerationConfig
from .limits import ServerLimits

# The settings of a request that names none (max_tokens -> gen_length): shorter answers than a library call's.
SERVE_DEFAULTS = GenerationConfig(gen_length=64)


@dataclass(frozen=True)
class ServerSettings:
    """What `python -m runtime serve` is given. defaults: the settings of a request that names none
    (max_tokens -> gen_length); max_body_mb: a request body; max_image_mb: one image's encoded bytes;
    api_keys: Bearer keys every path but /health, /metrics (unless protect_metrics) and the playground needs
    (none: open to anyone who reaches the port); allowed_origins: web origins that may call it (CORS);
    allowed_hosts: Host headers it answers (None: any); docs: serve /docs, /redoc and /openapi.json;
    playground: serve the page at /; limits: what one request may cost (limits.py)."""

    engines: str
    backend: str = "onnxruntime"
    device: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    image_cache_mb: float = 256
    max_body_mb: float = 32
    max_image_mb: float = 16
    allow_local_images: str | None = None
    model_name: str | None = None
    defaults: GenerationConfig = SERVE_DEFAULTS
    load_in_background: bool = True  # False: the app's startup waits for the engines (Ray Serve replicas)
    api_keys: tuple[str, ...] = ()
    protect_metrics: bool = False
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] | None = None
    docs: bool = False
    playground: bool = True
    limits: ServerLimits = field(default_factory=ServerLimits)

    def __post_init__(self):
        check_backend(self.backend)
        for name, zero_ok in (("max_body_mb", False), ("max_image_mb", False), ("image_cache_mb", True)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf \
                    or (value == 0 and not zero_ok):
                raise ValueError(f"{name} must be a number of MB {'>= 0' if zero_ok else '> 0'}, got {value!r}")
        if self.allow_local_images is not None and not Path(self.allow_local_images).is_dir():
            raise ValueError(f"--allow-local-images {self.allow_local_images}: not a folder")
        if self.protect_metrics and not self.api_keys:
            raise ValueError("--protect-metrics needs an API key (--api-key)")

    @property
    def name(self) -> str:
        return self.model_name or Path(self.engines).resolve().name


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
