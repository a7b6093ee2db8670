"""POST /v1/completions (a plain prompt, no chat template) against the real server process with the `openai` client:
answers equal to Pipeline.generate(Request(prompt, plain=True)), streaming, batching with chat requests, errors,
metrics; and the warning a server bound beyond loopback without a key prints."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from benchmarks.server_process import ServerProcess, user_message
from runtime import GenerationConfig, Pipeline, Request
from runtime.generation.prompt import request_ids
from server_checks import client, metric


@pytest.fixture(scope="module")
def open_server(no_eot_model_dir):
    """Answers that never end early (so requests overlap), bound to every address without a key."""
    server = ServerProcess("--engines", str(no_eot_model_dir), "--backend", "torch", "--max-batch", "4",
                           "--host", "0.0.0.0")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pipe(no_eot_model_dir):
    with Pipeline.load(no_eot_model_dir, backend="torch") as pipe:
        yield pipe


def test_a_plain_prompt_has_no_chat_template(pipe):
    ids = request_ids(Request("The circle is", plain=True), pipe.tokenizer)
    assert ids == [pipe.tokenizer.bos_token_id, *pipe.tokenizer("The circle is", add_special_tokens=False)["input_ids"]]
    assert len(ids) < len(request_ids(Request("The circle is"), pipe.tokenizer))  # no system turn, no headers
    with pytest.raises(ValueError, match="a plain prompt is one text without images"):
        Request([{"role": "user", "content": "Hi"}], plain=True)


def test_openai_client_completions_plain_and_streaming(open_server, pipe):
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, seed=3, temperature=0.5)
    expected = pipe.generate(Request("The circle is", plain=True), config=cfg)
    before = metric(open_server, "llada_requests_total", outcome="completed")
    answer = client(open_server).completions.create(model="m", prompt="The circle is", max_tokens=16, seed=3,
                                                    temperature=0.5, extra_body={"block_length": 8})
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-")
    assert answer.choices[0].text == expected.text and answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == expected.stats["prompt_lengths"][0]
    assert answer.usage.completion_tokens == len(expected.token_ids) == 16
    assert answer.model_extra["llada"]["nfe"] == expected.stats["nfe"]
    chunks = list(client(open_server).completions.create(
        model="m", prompt=["The circle is"], max_tokens=16, seed=3, temperature=0.5, stream=True,
        stream_options={"include_usage": True}, extra_body={"block_length": 8}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # the prefix arrived in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16
    assert metric(open_server, "llada_requests_total", outcome="completed") == before + 2


# On a CPU full passes run one row at a time; cached passes are shared.
DUAL = {"block_length": 8, "cache": "dual", "refresh_interval": 2}


def test_completions_and_chat_requests_share_the_batch(open_server, pipe):
    asks = [("completion", f"Shape number {i} is", i) for i in range(3)] + \
        [("chat", f"What is shape number {i}?", i) for i in range(3)]
    clients = [client(open_server) for _ in asks]
    ready = threading.Barrier(len(asks))
    before = metric(open_server, "llada_denoiser_calls_total")

    def ask(item, openai_client):
        kind, text, seed = item
        ready.wait()
        if kind == "completion":
            answer = openai_client.completions.create(model="m", prompt=text, max_tokens=16, seed=seed,
                                                      extra_body=DUAL)
            return answer.choices[0].text, answer.model_extra["llada"]["nfe"]
        answer = openai_client.chat.completions.create(model="m", messages=[user_message(text)], max_tokens=16,
                                                       seed=seed, extra_body=DUAL)
        return answer.choices[0].message.content, answer.model_extra["llada"]["nfe"]

    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(ask, asks, clients))
    for (kind, text, seed), (got, _) in zip(asks, answers):
        cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, seed=seed, cache="dual", refresh_interval=2)
        assert got == pipe.generate(Request(text, plain=kind == "completion"), config=cfg).text
    calls = metric(open_server, "llada_denoiser_calls_total") - before
    assert calls < sum(nfe for _, nfe in answers)  # rows shared denoiser calls


@pytest.mark.parametrize("body, param, code", [
    ({"prompt": ["one", "two"]}, "prompt", "unsupported"),
    ({"prompt": [1, 2, 3]}, "prompt.str", "string_type"),
    ({"prompt": "Hi", "logprobs": 1}, "logprobs", "unsupported"),
    ({"prompt": "Hi", "echo": True}, "echo", "unsupported"),
    ({"prompt": "Hi", "max_tokens": 100000}, "max_tokens", "max_tokens_too_large"),
    ({"prompt": "Hi", "stream_canvas": True}, "stream_canvas", "unsupported"),
    ({"prompt": "\ud800"}, "prompt", "invalid_request"),
    ({"prompt": "x" * 70000}, "messages", "prompt_too_long"),
])
def test_bad_completion_requests_get_openai_errors(open_server, body, param, code):
    reply = httpx.post(f"{open_server.url}/v1/completions", content=json.dumps(body), timeout=60,  # \ud800 escaped
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_bound_beyond_loopback_without_a_key_it_says_so(open_server):
    assert "warning: serving on 0.0.0.0 without an API key" in open_server.output()
    # No Host check by default there: the operator names the hosts the server is reached by.
    assert httpx.get(f"{open_server.url}/health", headers={"Host": "llada.example.com"}).status_code == 200
