"""Scale-out on Ray Serve: the same FastAPI app (app.py) from N replicas, each loading its own engines
and running its own Scheduler; Ray's proxy spreads the requests. `ray[serve]` is an optional extra.

    python -m runtime serve --engines engines --ray --replicas 2

On CUDA each replica asks Ray for one GPU (`num_gpus=1`), so N replicas need N GPUs; on the CPU each asks
for one CPU. Replicas load before they take traffic (the app's startup waits for the engines).
"""

from __future__ import annotations

import dataclasses
import signal
import time

from .app import create_app
from .settings import ServerSettings


def deployment(settings: ServerSettings, replicas: int):
    """The Ray Serve application: `serve.run(deployment(settings, 2))`."""
    try:
        from ray import serve
    except ImportError as err:
        raise ValueError("--ray needs Ray Serve: pip install -e '.[ray]'") from err
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"--replicas must be an integer >= 1, got {replicas!r}")
    settings = dataclasses.replace(settings, load_in_background=False)
    gpu = settings.backend == "tensorrt" or (settings.device or "").startswith("cuda")
    options = {"num_gpus": 1} if gpu else {"num_cpus": 1}

    # A builder: each replica makes its own app (its own engines, scheduler and metrics) when it starts.
    @serve.deployment(name="llada_v", num_replicas=replicas, ray_actor_options=options,
                      max_ongoing_requests=settings.max_batch + settings.max_queue)
    @serve.ingress(lambda: create_app(settings))
    class LladaV:
        pass

    return LladaV.bind()


def serve_on_ray(settings: ServerSettings, replicas: int, host: str, port: int) -> None:
    """Start a local Ray, Serve on host:port and the deployment; block until Ctrl-C or SIGTERM, then take it
    all down (replicas, proxy and the Ray processes this started)."""
    app = deployment(settings, replicas)
    import ray
    from ray import serve

    def stop(signum, frame):
        raise KeyboardInterrupt

    ray.init(include_dashboard=False)
    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs a handler of its own that aborts
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="llada_v", route_prefix="/")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
