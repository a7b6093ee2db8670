"""Who may use the server (runtime/serving/auth.py, cli.py, app.py), against the real process: API keys on every path
but /health, /metrics and the playground, checked before the body is read; CORS; the Host check; /docs off."""

import socket

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

import llada_v
from benchmarks.server_process import ServerProcess, user_message
from runtime.serving.auth import api_keys
from runtime.serving.cli import allowed_hosts, is_loopback
from runtime.serving.app import create_app
from runtime.serving.settings import ServerSettings
from server_checks import metric

ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def keyed_server(engines_dir):
    server = ServerProcess("--engines", str(engines_dir), "--api-key", "key-one", "--api-key", "key-two",
                           "--allowed-origins", ORIGIN, "--protect-metrics", env={"LLADA_V_API_KEY": "key-env"})
    yield server
    server.stop()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def engine_work(server) -> float:
    """Requests by any outcome and denoiser calls so far."""
    names = ("llada_requests_total", "llada_denoiser_calls_total")
    return sum(metric(server, name, headers=bearer("key-one")) for name in names)


def test_every_v1_path_needs_one_of_the_keys(keyed_server):
    url = keyed_server.url
    for headers, message in (({}, "needs an API key"), (bearer("wrong"), "not valid"), ({"Authorization": "key-one"},
                                                                                          "not valid")):
        reply = httpx.get(f"{url}/v1/models", headers=headers)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
        error = reply.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert message in error["message"]
    for key in ("key-one", "key-two", "key-env"):  # --api-key twice, and the environment variable
        assert httpx.get(f"{url}/v1/models", headers=bearer(key)).status_code == 200
    assert httpx.get(f"{url}/v1/no-such-path").status_code == 401  # unknown paths are not a way around the key
    answer = OpenAI(base_url=f"{url}/v1", api_key="key-two", max_retries=0).chat.completions.create(
        model="m", messages=[user_message("Hi")], max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).chat.completions.create(
            model="m", messages=[user_message("Hi")], max_tokens=8)


def test_health_and_playground_stay_open_metrics_only_with_protect_metrics(keyed_server):
    url = keyed_server.url
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/").status_code == 200
    assert httpx.get(f"{url}/playground/playground.js").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 401  # --protect-metrics
    assert httpx.get(f"{url}/metrics", headers=bearer("key-one")).status_code == 200


def test_a_refused_request_is_refused_before_its_body_is_read(keyed_server):
    before = engine_work(keyed_server)
    with socket.create_connection(("127.0.0.1", keyed_server.port), timeout=10) as sock:
        # A 30 MB body is announced and never sent: the 401 comes at once, without waiting for it.
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 30000000\r\n\r\n")
        head = sock.recv(65536).decode()
    assert head.startswith("HTTP/1.1 401")
    assert engine_work(keyed_server) == before


def test_cors_preflight_and_responses_for_the_allowed_origin_only(keyed_server):
    url = f"{keyed_server.url}/v1/chat/completions"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = httpx.options(url, headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "POST" in allowed.headers["access-control-allow-methods"]
    other = httpx.options(url, headers={"Origin": "https://evil.example", **preflight})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    # The page on the allowed origin can read the answers, the 401s included; another origin's page cannot.
    refused = httpx.post(url, json={"messages": [user_message("Hi")]}, headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    reply = httpx.get(f"{keyed_server.url}/v1/models", headers={"Origin": "https://evil.example", **bearer("key-one")})
    assert "access-control-allow-origin" not in reply.headers


def test_docs_are_off_and_other_hosts_are_refused_on_a_loopback_server(engines_dir):
    server = ServerProcess("--engines", str(engines_dir), "--no-playground")
    try:
        for path in ("/docs", "/redoc", "/openapi.json", "/"):
            reply = httpx.get(f"{server.url}{path}")
            assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found_error", path
        # DNS rebinding: a page on another site reaches 127.0.0.1 under its own name.
        assert httpx.get(f"{server.url}/v1/models", headers={"Host": "evil.example"}).status_code == 400
        for host in ("localhost", f"localhost:{server.port}", f"127.0.0.1:{server.port}"):
            assert httpx.get(f"{server.url}/v1/models", headers={"Host": host}).status_code == 200, host
    finally:
        server.stop()


def test_docs_on_request():
    app = create_app(ServerSettings(str(llada_v.SHIPPED_MODEL_DIR), backend="torch", docs=True))
    with TestClient(app) as http:
        assert http.get("/openapi.json").json()["paths"].keys() >= {"/v1/chat/completions", "/v1/completions"}
        assert http.get("/docs").status_code == 200


def test_cli_access_settings():
    class Args:
        host, allowed_hosts = "127.0.0.1", None

    assert allowed_hosts(Args) == ("localhost", "127.0.0.1", "[::1]")
    Args.host = "0.0.0.0"
    assert allowed_hosts(Args) is None  # any: the operator names the hosts the server is reached by
    Args.allowed_hosts = ["api.example.com"]
    assert allowed_hosts(Args) == ("api.example.com",)
    Args.allowed_hosts = ["*"]
    assert allowed_hosts(Args) is None
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "0.0.0.0", "example.com")] == \
        [True, True, True, True, False, False]
    assert api_keys(["a", " b "], {"LLADA_V_API_KEY": "c,a"}) == ("a", "b", "c")
    with pytest.raises(ValueError, match="cannot be empty"):
        api_keys([""], {})
    with pytest.raises(ValueError, match="needs an API key"):
        ServerSettings(str(llada_v.SHIPPED_MODEL_DIR), protect_metrics=True)
