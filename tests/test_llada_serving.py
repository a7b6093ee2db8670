"""A text-only LLaDA model's engines behind the CLI (`python -m runtime generate` and `chat`) and the OpenAI-compatible
server (chat completions with the `openai` client, plain completions for the Base model): the answers Pipeline
gives, and image parts refused with a message saying the model has no vision tower."""

import io
import subprocess
import sys

import httpx
import numpy as np
import pytest
from openai import BadRequestError

from benchmarks.server_process import ServerProcess, user_message
from exporter import build_engines
from runtime import GenerationConfig, Pipeline, Request
from runtime.__main__ import main
from server_checks import client

CONFIG = GenerationConfig(gen_length=16, block_length=8, steps=16)
SETTINGS = ["--gen-length", "16", "--block-length", "8"]


@pytest.fixture(scope="module")
def engines(released_llada, tmp_path_factory):
    return build_engines(released_llada, tmp_path_factory.mktemp("llada-serving") / "fp32", "fp32", progress=False)


@pytest.fixture(scope="module")
def pipe(engines):
    with Pipeline.load(engines, "onnxruntime") as pipe:
        yield pipe


@pytest.fixture(scope="module")
def server(engines):
    server = ServerProcess("--engines", str(engines), "--gen-length", "16", "--block-length", "8")
    yield server
    server.stop()


def test_cli_generate(engines, pipe):
    expected = pipe.generate("What is 2 + 3?", config=CONFIG)
    done = subprocess.run([sys.executable, "-m", "runtime", "generate", "--engines", str(engines), "--prompt",
                           "What is 2 + 3?", *SETTINGS], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"


def test_cli_chat_continues_the_conversation(engines, pipe, monkeypatch, capsys):
    conversation = pipe.chat(CONFIG)
    expected = [conversation.send(question).text for question in ("Hi", "And then?")]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAnd then?\n/image x.png\nWhat is it?\n"))
    assert main(["chat", "--engines", str(engines), *SETTINGS]) == 0
    out, err = capsys.readouterr()
    assert all(text + "\n" in out for text in expected)
    assert "no vision tower" in err  # the image's turn is refused, the chat goes on


def test_cli_refuses_an_image(engines, capsys):
    assert main(["generate", "--engines", str(engines), "--prompt", "Hi", "--image", "x.png", *SETTINGS]) == 2
    assert "no vision tower" in capsys.readouterr().err


def test_chat_completions(server, pipe):
    messages = [{"role": "user", "content": "Describe <image> in words"}]  # `<image>` is text for LLaDA
    expected = pipe.generate(messages, config=CONFIG)
    answer = client(server).chat.completions.create(model="m", messages=messages)
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == expected.stats["finish_reason"]
    assert answer.usage.completion_tokens == len(expected.token_ids) == 16  # every position: no stop rule


def test_an_image_part_is_refused(server):
    picture = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(BadRequestError, match="no vision tower") as caught:
        client(server).chat.completions.create(model="m", messages=[user_message("What is it?", [picture])])
    assert caught.value.body["param"] == "messages[0].content[1]"


def test_completions_take_a_plain_prompt(server, pipe):
    expected = pipe.generate(Request("The capital of France is", plain=True), config=CONFIG)
    answer = client(server).completions.create(model="m", prompt="The capital of France is")
    assert answer.choices[0].text == expected.text


def test_cfg_scale_is_refused(server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "cfg_scale": 1.5}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and "cfg_scale" in response.json()["error"]["message"]
    body["cfg_scale"] = 0
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
