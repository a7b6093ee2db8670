"""The OpenAI-compatible server (runtime/serving/app.py), driven as a real process with the real `openai` client and
httpx: answers equal to the same request run alone, streaming, metrics, errors, cancellation and SIGTERM."""

import base64
import io
import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

import llada_v
from benchmarks.server_process import ServerProcess, user_message
from runtime import GenerationConfig, Pipeline
from runtime.serving import app as server_module
from runtime.serving.app import create_app
from runtime.serving.settings import ServerSettings
from server_checks import client, metric, post, wait_until

# max_tokens 8 with the server's default block 32 -> gen_length 8 in one block of 8, 8 steps (see generation_config).
CONFIG_8 = dict(gen_length=8, block_length=8, steps=8)


def image(seed: int, size=(90, 140)) -> np.ndarray:
    return (np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(image(0)).save(folder / "a.png")
    return folder


@pytest.fixture(scope="module")
def shipped_server(engines_dir, local_dir):
    """fp32 engines of the shipped model, with small limits to test them."""
    server = ServerProcess("--engines", str(engines_dir), "--max-body-mb", "1", "--max-image-mb", "0.25",
                           "--allow-local-images", str(local_dir), "--model-name", "llada-v-demo",
                           "--max-tokens-limit", "4096")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shipped_pipe(engines_dir):
    with Pipeline.load(engines_dir) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def long_server(no_eot_model_dir):
    """A model whose answers never end early (so requests overlap), torch backend, 4 rows."""
    server = ServerProcess("--engines", str(no_eot_model_dir), "--backend", "torch", "--max-batch", "4",
                           "--max-tokens-limit", "2048")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def long_pipe(no_eot_model_dir):
    with Pipeline.load(no_eot_model_dir, backend="torch") as pipe:
        yield pipe


# ---- answers ----------------------------------------------------------------------------------------------------

def test_openai_client_plain_and_streaming_with_an_image(shipped_server, shipped_pipe):
    ask = "What colour is the shape?"
    messages = [user_message(ask, [image(1)])]
    expected = shipped_pipe.generate(ask, image=image(1), config=GenerationConfig(**CONFIG_8, cache="dual"))
    answer = client(shipped_server).chat.completions.create(model="llada-v-demo", messages=messages, max_tokens=8,
                                                            extra_body={"cache": "dual"})
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == "stop"
    prompt_length = expected.stats["prompt_lengths"][0]
    assert answer.usage.prompt_tokens == prompt_length > 40  # the image's embeddings count
    assert answer.usage.completion_tokens == len(expected.token_ids)
    assert answer.model_extra["llada"]["nfe"] == expected.stats["nfe"]
    chunks = list(client(shipped_server).chat.completions.create(
        model="llada-v-demo", messages=messages, max_tokens=8, stream=True, extra_body={"cache": "dual"},
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    models = client(shipped_server).models.list()
    assert [m.id for m in models.data] == ["llada-v-demo"]


def test_sixteen_concurrent_clients_get_their_answers_alone(long_server, long_pipe):
    calls_before = metric(long_server, "llada_denoiser_calls_total")  # full and cached
    asks = [(f"Question number {i}{' about this picture' * (i % 3)}?", [image(i)] if i % 2 else [], i,
             "dual" if i % 4 < 2 else "none") for i in range(16)]

    clients = [client(long_server) for _ in asks]  # made up front, so the requests leave together
    all_ready = threading.Barrier(len(asks))

    def ask(item, openai_client):
        text, images, seed, cache = item
        all_ready.wait()
        answer = openai_client.chat.completions.create(
            model="m", messages=[user_message(text, images)], max_tokens=16, seed=seed, temperature=0.5,
            extra_body={"block_length": 8, "steps": 16, "cache": cache, "refresh_interval": 2})
        return answer.choices[0].message.content, answer.model_extra["llada"]["nfe"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, asks, clients))
    for (text, images, seed, cache), (got, _) in zip(asks, answers):
        cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, seed=seed, temperature=0.5, cache=cache,
                               refresh_interval=2)
        assert got == long_pipe.generate(text, image=images or None, config=cfg).text
    calls = metric(long_server, "llada_denoiser_calls_total") - calls_before
    assert calls < sum(nfe for _, nfe in answers)  # rows shared denoiser calls


def test_refresh_policy_as_extra_body_fields(long_server, long_pipe):
    """The refresh policy and its parameters travel as extra body fields: the answer and the denoiser calls are the
    library's with the same settings."""
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, cache="dual", refresh="drift", refresh_interval=8,
                           drift_threshold=1e-6)
    expected = long_pipe.generate("Tell me about the sea.", config=cfg)
    answer = client(long_server).chat.completions.create(
        model="m", messages=[user_message("Tell me about the sea.", [])], max_tokens=16,
        extra_body={"block_length": 8, "steps": 16, "cache": "dual", "refresh": "drift", "refresh_interval": 8,
                    "drift_threshold": 1e-6})
    assert answer.choices[0].message.content == expected.text
    llada = answer.model_extra["llada"]
    assert (llada["full_forwards"], llada["cached_forwards"]) == (expected.stats.full_forwards,
                                                                  expected.stats.cached_forwards)
    assert expected.stats.cached_forwards > 0


def test_stream_only_ever_adds_text(long_server, long_pipe):
    cfg = GenerationConfig(gen_length=32, block_length=8, steps=32)
    expected = long_pipe.generate("Tell me a story.", config=cfg).text
    stream = client(long_server).chat.completions.create(
        model="m", messages=[user_message("Tell me a story.")], max_tokens=32, stream=True,
        extra_body={"block_length": 8, "steps": 32})
    deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 3  # the answer arrived in pieces as its prefix was decoded
    assert "".join(deltas) == expected


def test_max_tokens_maps_onto_blocks(long_server, long_pipe):
    answer = client(long_server).chat.completions.create(model="m", messages=[user_message("Hi")], max_tokens=11,
                                                         extra_body={"block_length": 8})
    # gen_length 16 (two blocks of 8), steps keep the default's one token per step, the answer cut at 11 tokens.
    expected = long_pipe.generate("Hi", config=GenerationConfig(gen_length=16, block_length=8, steps=16))
    assert answer.usage.completion_tokens == 11
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content == long_pipe.tokenizer.decode(expected.token_ids[:11])


def test_image_cache_hits_and_metrics_parse(shipped_server):
    hits = metric(shipped_server, "llada_image_cache_total", result="hit")
    completed = metric(shipped_server, "llada_requests_total", outcome="completed")
    messages = [user_message("What shape is it?", [image(9)])]
    answers = [client(shipped_server).chat.completions.create(model="m", messages=messages, max_tokens=8)
               .choices[0].message.content for _ in range(2)]
    assert answers[0] == answers[1]
    assert metric(shipped_server, "llada_image_cache_total", result="hit") == hits + 1
    assert metric(shipped_server, "llada_requests_total", outcome="completed") == completed + 2
    assert metric(shipped_server, "llada_step_seconds_count") > 0
    assert metric(shipped_server, "llada_completion_tokens_total") > 0
    assert metric(shipped_server, "llada_queue_depth") == 0


def test_local_images_only_inside_the_allowed_folder(shipped_server, local_dir, tmp_path):
    outside = tmp_path / "b.png"
    Image.fromarray(image(0)).save(outside)
    (local_dir / "link.png").symlink_to(outside)
    by_data = client(shipped_server).chat.completions.create(
        model="m", messages=[user_message("What colour?", [image(0)])], max_tokens=8).choices[0].message.content

    def ask(url):
        return httpx.post(f"{shipped_server.url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What colour?"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "max_tokens": 8})

    for url in ("a.png", f"file://{local_dir / 'a.png'}"):
        reply = ask(url)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == by_data
    for url in ("../b.png", str(outside), f"file://{outside}", "link.png"):
        reply = ask(url)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "local_image_refused", url


# ---- bad input --------------------------------------------------------------------------------------------------

def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages.0.role"),
    ({"messages": HI, "max_tokens": "8"}, 400, "max_tokens"),
    ({"messages": HI, "temperature": -1}, 400, "temperature"),
    ({"messages": HI, "seed": 2**64}, 400, "seed"),
    ({"messages": HI, "cache": "triple"}, 400, "cache"),
    ({"messages": HI, "n": 2}, 400, "n"),
    ({"messages": HI, "max_tokens": 16, "block_length": 8, "steps": 3}, 400, None),  # 3 steps for 2 blocks
    ({"messages": HI, "max_tokens": 4000}, 400, "messages"),  # longer than the engines' sequence
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, 400, "messages"),  # must end with a user turn
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}]},
     400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]},
     400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]},
     400, "messages"),
])
def test_bad_requests_get_openai_errors(shipped_server, body, status, param):
    reply = post(shipped_server, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unknown_openai_fields_are_ignored(shipped_server):
    reply = post(shipped_server, {"messages": HI, "max_tokens": 8, "top_p": 0.9, "user": "u1", "presence_penalty": 0})
    assert reply.status_code == 200


def test_too_large_bodies_images_and_bombs_get_413(shipped_server):
    big_body = json.dumps({"messages": [{"role": "user", "content": "x" * (2 * 2**20)}]})
    assert post(shipped_server, big_body).status_code == 413
    chunked = post(shipped_server, (big_body[i:i + 65536].encode() for i in range(0, len(big_body), 65536)))
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"
    noise = png_bytes(Image.fromarray(image(3, (400, 400))))  # ~480 KB: over the 0.25 MB limit, under the body limit
    big_image = "data:image/png;base64," + base64.b64encode(noise).decode()
    reply = post(shipped_server, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": big_image}}]}]})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "image_too_large"
    bomb = png_bytes(Image.new("1", (8200, 8200)))  # 67 megapixels in a few KB
    assert len(bomb) < 100_000
    reply = post(shipped_server, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(bomb).decode()}}]}]})
    assert reply.status_code == 413 and "pixels" in reply.json()["error"]["message"]
    assert httpx.get(f"{shipped_server.url}/health").status_code == 200  # nothing else disturbed


# ---- overload, cancellation, shutdown ----------------------------------------------------------------------------

# About 2,000 positions and 1,984 steps: far longer than any test waits.
LONG = {"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 1984, "block_length": 8, "steps": 1984}


def test_full_queue_503_and_cancelled_stream_frees_its_row(no_eot_model_dir):
    server = ServerProcess("--engines", str(no_eot_model_dir), "--backend", "torch", "--max-batch", "1",
                           "--max-queue", "1", "--max-tokens-limit", "2048")
    try:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**LONG, "stream": True},
                          timeout=60) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")  # it holds the one row now
            with ThreadPoolExecutor(1) as pool:
                queued = pool.submit(post, server, {**LONG, "max_tokens": 8, "steps": 8})  # takes the one place
                wait_until(lambda: metric(server, "llada_queue_depth") == 1)
                refused = post(server, LONG)
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "queue_full"
                next(lines)
                # Closing the stream closes the connection: the row is freed and the queued request runs.
                running.close()
                assert queued.result().status_code == 200
        wait_until(lambda: metric(server, "llada_requests_total", outcome="cancelled") == 1)
        assert metric(server, "llada_requests_total", outcome="rejected") == 1
        assert metric(server, "llada_batch_rows") == 0
    finally:
        server.stop()


def test_a_plain_request_whose_client_leaves_frees_its_row(long_server):
    cancelled = metric(long_server, "llada_requests_total", outcome="cancelled")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{long_server.url}/v1/chat/completions", json=LONG, timeout=httpx.Timeout(60, read=2))
    wait_until(lambda: metric(long_server, "llada_requests_total", outcome="cancelled") == cancelled + 1)
    wait_until(lambda: metric(long_server, "llada_batch_rows") == 0)


def test_sigterm_finishes_running_requests_then_exits(no_eot_model_dir):
    server = ServerProcess("--engines", str(no_eot_model_dir), "--backend", "torch", "--max-tokens-limit", "2048")
    with httpx.stream("POST", f"{server.url}/v1/chat/completions",
                      json={**LONG, "max_tokens": 256, "steps": 256, "stream": True}, timeout=60) as running:
        lines = running.iter_lines()
        assert next(lines).startswith("data: ")
        server.terminate()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
    # uvicorn re-raises the signal once it has shut down: the exit is SIGTERM's, after a clean shutdown.
    assert server.process.wait(60) == -signal.SIGTERM
    assert "Application shutdown complete" in server.output()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)


# ---- start-up (in process) -----------------------------------------------------------------------------------------

def test_health_is_503_until_the_engines_are_loaded(monkeypatch):
    release = threading.Event()
    real_load = server_module.Engine.load

    def slow_load(self):
        release.wait(30)
        real_load(self)

    monkeypatch.setattr(server_module.Engine, "load", slow_load)
    app = create_app(ServerSettings(str(llada_v.SHIPPED_MODEL_DIR), backend="torch"))
    with TestClient(app) as http:
        loading = http.get("/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        refused = http.post("/v1/chat/completions", json={"messages": HI})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        release.set()
        wait_until(lambda: http.get("/health").status_code == 200)
        assert http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 8}).status_code == 200


def test_an_unexpected_fault_is_internal_error_json_with_the_detail_only_in_the_log(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("disk on fire in /srv/secret")

    monkeypatch.setattr(server_module, "conversation", broken)
    app = create_app(ServerSettings(str(llada_v.SHIPPED_MODEL_DIR), backend="torch", load_in_background=False))
    with TestClient(app, raise_server_exceptions=False) as http:
        reply = http.post("/v1/chat/completions", json={"messages": HI})
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    request_id = reply.headers["x-request-id"]
    assert error["message"].startswith(f"internal error (request {request_id})") and "fire" not in error["message"]
    assert any(request_id in r.getMessage() and "disk on fire" in str(r.exc_info[1]) for r in caplog.records
               if r.exc_info)


def test_a_failed_load_is_reported(tmp_path):
    failures = []
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{")
    app = create_app(ServerSettings(str(folder), backend="torch"), on_load_failure=lambda: failures.append(1))
    with TestClient(app) as http:
        wait_until(lambda: failures == [1])
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed" and "config.json" in health.json()["error"]


def test_serve_cli_refuses_a_bad_folder_and_settings(tmp_path, capsys):
    from runtime.__main__ import main

    assert main(["serve", "--engines", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["serve", "--engines", str(llada_v.SHIPPED_MODEL_DIR), "--backend", "torch", "--replicas", "2"]) == 2
    assert "--ray" in capsys.readouterr().err
    assert main(["serve", "--engines", str(llada_v.SHIPPED_MODEL_DIR), "--max-body-mb", "0"]) == 2
    assert "max_body_mb" in capsys.readouterr().err
    assert main(["serve", "--engines", str(llada_v.SHIPPED_MODEL_DIR), "--max-tokens-limit", "0"]) == 2
    assert "--max-tokens-limit" in capsys.readouterr().err
    assert main(["serve", "--engines", str(llada_v.SHIPPED_MODEL_DIR), "--max-megapixels-in-flight", "16"]) == 2
    assert "--max-megapixels-in-flight 16 is less than --max-image-megapixels 32" in capsys.readouterr().err
    assert main(["serve", "--engines", str(llada_v.SHIPPED_MODEL_DIR), "--timeout-read", "0"]) == 2
    assert "--timeout-read must be a number of seconds > 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["serve", "--engines", str(llada_v.SHIPPED_MODEL_DIR), "--backend", "tensorrt"]) == 2
        assert "GPU" in capsys.readouterr().err


def test_request_to_generation_config_mapping():
    defaults = GenerationConfig(gen_length=64, block_length=32, steps=64, cache="dual", refresh_interval=4)
    body = server_module.ChatCompletionRequest(messages=HI, max_tokens=40)
    cfg, max_tokens = server_module.generation_config(body, defaults)
    assert (cfg.gen_length, cfg.block_length, cfg.steps, cfg.cache, max_tokens) == (64, 32, 64, "dual", 40)
    body = server_module.ChatCompletionRequest(messages=HI, max_tokens=5)
    cfg, _ = server_module.generation_config(body, defaults)
    assert (cfg.gen_length, cfg.block_length, cfg.steps) == (5, 5, 5)
    body = server_module.ChatCompletionRequest(messages=HI, threshold=0.9, seed=7, temperature=0.0)
    cfg, max_tokens = server_module.generation_config(body, defaults)
    assert (cfg.threshold, cfg.seed, max_tokens) == (0.9, 7, 64)
    assert (cfg.refresh, cfg.drift_threshold) == (defaults.refresh, defaults.drift_threshold)
    body = server_module.ChatCompletionRequest(messages=HI, refresh="drift", refresh_interval=32, drift_threshold=0.1)
    cfg, _ = server_module.generation_config(body, defaults)
    assert (cfg.refresh, cfg.refresh_interval, cfg.drift_threshold) == ("drift", 32, 0.1)
    for bad in (dict(refresh="adaptive"), dict(drift_threshold=0), dict(drift_threshold=float("inf"))):
        with pytest.raises(ValidationError):
            server_module.ChatCompletionRequest(messages=HI, **bad)


def test_image_parts_go_before_the_text_as_llada_v_was_trained():
    body = server_module.ChatCompletionRequest(messages=[user_message("What is it?", [image(0), image(1)])])
    messages, urls = server_module.conversation(body)
    assert messages == [{"role": "user", "content": "<image> <image>\nWhat is it?"}]
    assert len(urls) == 2 and all(url.startswith("data:image/png;base64,") for url in urls)
