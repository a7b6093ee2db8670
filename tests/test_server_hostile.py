"""No request can hurt the others: every finding of the hostile probe (issue 30) against the real server process,
run with a memory limit (RLIMIT_AS) and a small file-descriptor limit so a request that would take the process down
fails the test instead of the machine. Each refusal is OpenAI's error JSON and comes before the work it bounds."""

import io
import json
import resource
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image, ImageDraw

from benchmarks.server_process import ServerProcess, data_url, user_message
from server_checks import metric, post, wait_until

MEMORY_LIMIT = 3 * 2**30  # the server idles at ~1.5 GB of address space; the probe took 4.3-30 GB with some of these
FD_LIMIT = 400
# About 2,000 positions and 1,984 steps: far longer than any test waits.
LONG = {"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 1984, "block_length": 8, "steps": 1984}


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("local-images")


@pytest.fixture(scope="module")
def guarded(no_eot_model_dir, local_dir):
    """Tight limits, so that each is reached cheaply: 8 megapixels per image and in flight, 2-second request reads,
    3-second requests; answers that never end early (torch backend)."""
    server = ServerProcess("--engines", str(no_eot_model_dir), "--backend", "torch", "--max-batch", "3",
                           "--max-tokens-limit", "2048", "--max-image-megapixels", "8", "--max-megapixels-in-flight", "8",
                           "--timeout-read", "2",
                           "--request-timeout", "3", "--allow-local-images", str(local_dir),
                           env={"MALLOC_ARENA_MAX": "2"},
                           rlimits={resource.RLIMIT_AS: MEMORY_LIMIT, resource.RLIMIT_NOFILE: FD_LIMIT})
    yield server
    server.stop()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_message(question: str, *pngs: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question}, *(
        {"type": "image_url", "image_url": {"url": data_url(Image.open(io.BytesIO(data)))}} for data in pngs)]}]


def error_of(reply, status: int, code: str) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code, error
    return error


def healthy(server) -> bool:
    return httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def small_answer(server):
    return post(server, {"messages": [user_message("Hi")], "max_tokens": 8})


# ---- work the library would do for a request ---------------------------------------------------------------------

@pytest.mark.parametrize("steps", [10**10, 10**8])
def test_steps_far_beyond_the_answer_are_refused_at_once(guarded, steps):
    reply = post(guarded, {"messages": [user_message("Hi")], "max_tokens": 64, "steps": steps})
    assert "use steps <= gen_length" in error_of(reply, 400, "invalid_settings")["message"]
    error_of(post(guarded, {"messages": [user_message("Hi")], "max_tokens": 5000}), 400, "max_tokens_too_large")
    assert small_answer(guarded).status_code == 200


def test_a_padded_square_is_measured_before_it_is_made(guarded):
    tall = png(Image.new("L", (1, 100_000), 200))  # a few hundred bytes; padded to a square: 10**10 pixels
    assert len(tall) < 2000
    error = error_of(post(guarded, {"messages": image_message("Compare them.", png(Image.new("RGB", (64, 64))), tall),
                                    "max_tokens": 8}), 413, "image_too_large")
    assert "100000x100000 square" in error["message"]
    # Alone it is tiled (anyres), which stays small: it is answered.
    assert post(guarded, {"messages": image_message("What is it?", tall), "max_tokens": 8}).status_code == 200


def test_many_large_images_are_refused_before_any_is_decoded(guarded):
    huge = png(Image.new("1", (8192, 8192), 1))  # 67 megapixels, legal for the library
    before = guarded.peak_rss_mb()
    error_of(post(guarded, {"messages": image_message("Describe them.", *[huge] * 20)}), 400, "too_many_images")
    error_of(post(guarded, {"messages": image_message("Describe them.", *[huge] * 8)}), 413, "image_too_large")
    square = png(Image.new("1", (2100, 2100), 1))  # 4.4 megapixels: two are under the image limit, over the budget
    error_of(post(guarded, {"messages": image_message("Describe them.", square, square)}), 413, "images_too_large")
    assert guarded.peak_rss_mb() - before < 100  # nothing was decoded
    assert healthy(guarded)


def test_a_crowd_of_image_requests_is_held_to_the_pixel_budget(guarded):
    picture = Image.new("RGB", (1600, 1200), (240, 240, 240))  # 1.9 megapixels: four fit in the budget of 8
    ImageDraw.Draw(picture).ellipse((500, 300, 1100, 900), fill=(200, 30, 30))
    body = {"messages": image_message("What colour is the circle?", png(picture)), "max_tokens": 8}
    with ThreadPoolExecutor(40) as pool:
        replies = list(pool.map(lambda _: post(guarded, body), range(40)))
    statuses = [r.status_code for r in replies]
    busy = [r.json()["error"]["code"] for r in replies if r.status_code == 503]
    assert set(statuses) <= {200, 503, 504} and statuses.count(200) >= 1 and busy, statuses
    assert "image_budget_full" in busy and set(busy) <= {"image_budget_full", "queue_full"}
    answers = {r.json()["choices"][0]["message"]["content"] for r in replies if r.status_code == 200}
    assert len(answers) == 1  # the same request, the same answer, however crowded
    print(f"40 concurrent 1600x1200 requests: {statuses.count(200)} answered, {len(busy)} refused with 503; "
          f"server peak RSS {guarded.peak_rss_mb():.0f} MB")
    assert healthy(guarded)


def test_a_huge_prompt_is_refused_before_it_is_tokenized(guarded):
    stream_body = {"messages": [user_message("Tell me a story.")], "max_tokens": 64, "block_length": 8,
                   "stream": True}
    gaps, lines = [], []

    def well_behaved():
        last = time.perf_counter()
        with httpx.stream("POST", f"{guarded.url}/v1/chat/completions", json=stream_body, timeout=60) as reply:
            for line in reply.iter_lines():
                if line:
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now
                    lines.append(line)

    client = threading.Thread(target=well_behaved)
    client.start()
    reply = post(guarded, {"messages": [user_message("x" * (16 * 2**20))], "max_tokens": 8})
    client.join(60)
    assert "16777216 characters" in error_of(reply, 400, "prompt_too_long")["message"]
    assert lines[-1] == "data: [DONE]"
    print(f"well-behaved stream beside a 16 MB prompt: longest gap between its events {max(gaps):.3f} s")


# ---- connections --------------------------------------------------------------------------------------------------

def test_half_open_connections_are_closed_and_never_exhaust_descriptors(guarded):
    log_before = len(guarded.output())
    sockets = []

    def half_open(count: int):
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", guarded.port), timeout=10)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
            sockets.append(sock)

    half_open(100)
    assert small_answer(guarded).status_code == 200  # they hold no place among the requests in progress
    half_open(400)  # 500 in all: more than the server's 400 file descriptors; those past its budget close at once
    try:
        closed = 0
        for sock in sockets:  # --timeout-read 2: every one is closed by the server
            try:
                closed += sock.recv(1024) == b""
            except ConnectionResetError:
                closed += 1
        assert closed == len(sockets)
    finally:
        for sock in sockets:
            sock.close()
    assert small_answer(guarded).status_code == 200
    log = guarded.output()[log_before:]
    assert "Traceback" not in log and len(log) < 20_000, log[-2000:]


def test_request_heads_are_bounded_and_nested_fields_strict(guarded):
    assert httpx.get(f"{guarded.url}/health", headers={"x-filler": "a" * 32_000}).status_code == 200
    try:
        reply = httpx.get(f"{guarded.url}/health", headers={"x-filler": "a" * 2**20}, timeout=10)
        assert reply.status_code in (400, 431)
    except httpx.TransportError:  # or the connection is closed on it
        pass
    reply = post(guarded, {"messages": [user_message("Hi")], "stream": True, "stream_options": {"include_usage": "true"}})
    assert error_of(reply, 400, "bool_type")["param"] == "stream_options.include_usage"
    assert healthy(guarded)


@pytest.mark.parametrize("path", ["a\x00.png", "\ud800.png", "a" * 100_000 + ".png"])
def test_local_paths_that_are_no_paths_get_400_without_the_servers_folder(guarded, local_dir, path):
    message = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": path}}]}]
    error = error_of(post(guarded, {"messages": message}), 400, "invalid_image_url")
    assert str(local_dir) not in error["message"] and len(error["message"]) < 1000


# ---- time: --request-timeout and --shutdown-timeout ---------------------------------------------------------------

def test_a_request_past_its_deadline_is_retired_and_answered_the_others_go_on(guarded):
    timed_out = metric(guarded, "llada_requests_total", outcome="timed_out")
    slow = {**LONG, "cache": "dual", "refresh_interval": 8}  # cheap steps, so the short request's group has its turns
    with ThreadPoolExecutor(2) as pool:
        plain = pool.submit(post, guarded, slow)
        with httpx.stream("POST", f"{guarded.url}/v1/chat/completions", json={**slow, "stream": True},
                          timeout=60) as stream:
            assert small_answer(guarded).status_code == 200  # beside the two long ones
            lines = [line for line in stream.iter_lines() if line]
        assert "--request-timeout" in error_of(plain.result(), 504, "request_timeout")["message"]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "request_timeout"
    assert metric(guarded, "llada_requests_total", outcome="timed_out") == timed_out + 2


def test_sigterm_answers_every_request_it_ends_and_exits_within_the_timeout(no_eot_model_dir):
    server = ServerProcess("--engines", str(no_eot_model_dir), "--backend", "torch", "--max-tokens-limit", "2048",
                           "--shutdown-timeout", "3", "--max-concurrent-requests", "2")
    with ThreadPoolExecutor(1) as pool, httpx.stream("POST", f"{server.url}/v1/chat/completions",
                                                     json={**LONG, "stream": True}, timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        plain = pool.submit(post, server, LONG)
        wait_until(lambda: metric(server, "llada_batch_rows") == 2)
        busy = post(server, {"messages": [user_message("Hi")], "max_tokens": 8})  # a third request in progress
        assert "--max-concurrent-requests" in error_of(busy, 503, "server_busy")["message"]
        assert busy.headers["retry-after"] == "1" and healthy(server)
        server.terminate()
        signalled = time.perf_counter()
        rest = [line for line in lines if line]
        reply = plain.result()
    status = server.process.wait(30)
    elapsed = time.perf_counter() - signalled
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["error"]["code"] == "shutting_down"
    assert error_of(reply, 503, "shutting_down")
    assert status == -signal.SIGTERM and elapsed < 3 + 3, elapsed  # the timeout, and the process's own exit
    print(f"SIGTERM with two requests past a 3 s --shutdown-timeout: exited after {elapsed:.1f} s")
