"""`python -m runtime serve`: its options and how they become the server's settings, uvicorn's included."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import sys

from ..config import GenerationConfig
from .auth import ENV_VAR
from .limits import ServerLimits
from .settings import ListenerSettings, ServerSettings

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    limits, listener = ServerLimits(), ListenerSettings()
    server = {f.name: f.default for f in dataclasses.fields(ServerSettings)}  # its required `engines` has none
    serve.add_argument("--host", default=listener.host)
    serve.add_argument("--port", type=int, default=listener.port)
    serve.add_argument("--max-batch", type=int, default=server["max_batch"],
                       help=f"rows decoded together, all requests (default {server['max_batch']})")
    serve.add_argument("--max-queue", type=int, default=server["max_queue"],
                       help=f"requests waiting for a row; beyond it: 503 with Retry-After "
                            f"(default {server['max_queue']})")
    serve.add_argument("--image-cache-mb", type=float, default=server["image_cache_mb"],
                       help=f"image embeddings kept for images seen again, MB (0 = off; default "
                            f"{server['image_cache_mb']:g})")
    serve.add_argument("--allow-local-images", metavar="DIR", default=None,
                       help="accept image_url paths (file://...) inside DIR; refused otherwise")
    serve.add_argument("--model-name", default=None, help="the model id in /v1/models (default: the folder's name)")
    serve.add_argument("--no-playground", dest="playground", action="store_false",
                       help="do not serve the playground page at /")
    serve.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json (default: off)")
    serve.add_argument("--ray", action="store_true", help="serve from Ray Serve replicas (pip install '.[ray]')")
    serve.add_argument("--replicas", type=int, default=1, help="with --ray: replicas, each with its own engines")

    access = serve.add_argument_group("access")
    access.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help=f"every path but /health, /metrics and the playground needs `Authorization: Bearer KEY` "
                             f"(repeat for several keys; or set {ENV_VAR}, several separated by commas). Without a "
                             f"key anyone who reaches the port may use the server")
    access.add_argument("--protect-metrics", action="store_true", help="/metrics needs the key too")
    access.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                        help="web origins whose pages may call the API (CORS), e.g. https://app.example.com, or '*' "
                             "(default: none)")
    access.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                        help="Host headers answered (others get 400), e.g. api.example.com, or '*' (default: "
                             f"{', '.join(LOOPBACK_HOSTS)} when bound to a loopback address, else any)")

    cost = serve.add_argument_group("what one request may cost (checked before the work)")
    cost.add_argument("--max-tokens-limit", type=int, default=limits.max_tokens,
                      help=f"the longest answer a request may ask for (default {limits.max_tokens})")
    cost.add_argument("--max-prompt-chars", type=int, default=limits.max_prompt_chars,
                      help=f"characters of a prompt, all messages (default {limits.max_prompt_chars})")
    cost.add_argument("--max-images", type=int, default=limits.max_images,
                      help=f"images in one request (default {limits.max_images})")
    cost.add_argument("--max-image-megapixels", type=float, default=limits.max_image_megapixels,
                      help=f"one decoded image, and its padded square when a request has several "
                           f"(default {limits.max_image_megapixels:g})")
    cost.add_argument("--max-megapixels-in-flight", type=float, default=limits.max_megapixels_in_flight,
                      help=f"decoded images of all requests at once; beyond it: 503 with Retry-After "
                           f"(default {limits.max_megapixels_in_flight:g})")
    cost.add_argument("--max-body-mb", type=float, default=server["max_body_mb"],
                      help=f"largest request body (default {server['max_body_mb']:g})")
    cost.add_argument("--max-image-mb", type=float, default=server["max_image_mb"],
                      help=f"largest encoded image (default {server['max_image_mb']:g})")
    cost.add_argument("--max-concurrent-requests", type=int, default=limits.max_concurrent_requests,
                      help=f"requests in progress (being read, waiting or running); beyond it: 503 with "
                           f"Retry-After (default {limits.max_concurrent_requests})")
    cost.add_argument("--request-timeout", type=float, default=limits.request_timeout,
                      help=f"seconds from arrival after which a request is stopped and answered with 504 "
                           f"(0 = never; default {limits.request_timeout:g})")

    connections = serve.add_argument_group("connections (uvicorn)")
    connections.add_argument("--timeout-keep-alive", type=int, default=listener.timeout_keep_alive,
                             help=f"seconds an idle keep-alive connection stays open "
                                  f"(default {listener.timeout_keep_alive})")
    connections.add_argument("--timeout-read", type=float, default=listener.timeout_read,
                             help=f"seconds a client has to send a whole request, head and body, or its connection "
                                  f"is closed (default {listener.timeout_read:g})")
    connections.add_argument("--shutdown-timeout", type=float, default=listener.shutdown_timeout,
                             help=f"on SIGTERM, seconds until exit: running requests finish or are answered with "
                                  f"an error (default {listener.shutdown_timeout:g})")


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name
        return False


def allowed_hosts(args) -> tuple[str, ...] | None:
    """None (any Host) for '*' or, by default, when bound to a non-loopback address."""
    if args.allowed_hosts is None:
        return LOOPBACK_HOSTS if is_loopback(args.host) else None
    return None if "*" in args.allowed_hosts else tuple(args.allowed_hosts)


def serve(args, defaults: GenerationConfig) -> int:
    from .auth import api_keys

    limits = ServerLimits(args.max_tokens_limit, args.max_prompt_chars, args.max_images, args.max_image_megapixels,
                          args.max_megapixels_in_flight, args.max_concurrent_requests, args.request_timeout or None)
    settings = ServerSettings(args.path, args.backend, args.device, args.max_batch, args.max_queue,
                              args.image_cache_mb, args.max_body_mb, args.max_image_mb, args.allow_local_images,
                              args.model_name, defaults, api_keys=api_keys(args.api_key),
                              protect_metrics=args.protect_metrics, allowed_origins=tuple(args.allowed_origins),
                              allowed_hosts=allowed_hosts(args), docs=args.docs, playground=args.playground,
                              limits=limits)
    if not settings.api_keys and not is_loopback(args.host):
        print(f"warning: serving on {args.host} without an API key: anyone who reaches the port can use the server; "
              f"give --api-key (or {ENV_VAR}), or keep it on 127.0.0.1 behind a proxy that checks clients",
              file=sys.stderr)
    if args.ray:
        from .ray_serve import serve_on_ray

        serve_on_ray(settings, args.replicas, args.host, args.port)
        return 0
    if args.replicas != 1:
        raise ValueError("--replicas needs --ray (one process serves one set of engines)")
    listener = ListenerSettings(args.host, args.port, args.timeout_keep_alive, args.timeout_read,
                                args.shutdown_timeout)
    check_folder(args.path, args.backend, args.device)
    from .listener import make_server
    from .app import create_app

    failed = []

    def stop_on_failure():
        failed.append(True)
        server.should_exit = True

    app = create_app(settings, on_load_failure=stop_on_failure, shutdown_timeout=args.shutdown_timeout)
    server = make_server(app, listener, lambda seconds: app.state.engine.begin_stop(seconds))
    server.run()
    return 2 if failed else 0


def check_folder(path: str, backend: str, device: str | None) -> None:
    """Refuse a folder or a device that cannot serve these engines before the server starts (the engines load
    after it)."""
    from ..backends import default_device
    from ..backends.runner import resolve_device

    resolve_device(device or default_device(backend), backend)
    if backend == "torch":
        from llada_v.weights import checkpoint_config

        checkpoint_config(path)
    else:
        from ..backends.engines import open_engines

        open_engines(path)
