"""What the server tests ask of a running server (benchmarks/server_process.ServerProcess): the `openai` client on
it, a raw POST, a figure from its /metrics, and a wait for what it does in the background."""

import json
import time

import httpx
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families


def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def post(server, body, **kwargs) -> httpx.Response:
    """POST /v1/chat/completions: a dict or list as JSON; bytes, text or an iterator of bytes (chunked) as they are."""
    content = json.dumps(body) if isinstance(body, (dict, list)) else body
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, timeout=60,
                      headers={"content-type": "application/json"}, **kwargs)


def metric(server, name: str, headers: dict | None = None, **labels) -> float:
    """The sum of the /metrics samples called `name` whose labels include `labels`; KeyError when there is none."""
    text = httpx.get(f"{server.url}/metrics", headers=headers).text
    values = [sample.value for family in text_string_to_metric_families(text) for sample in family.samples
              if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())]
    if not values:
        raise KeyError(name)
    return sum(values)


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
