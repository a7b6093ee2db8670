"""Scale-out on Ray Serve (runtime/serving/ray_serve.py): `python -m runtime serve --ray --replicas 2` answers from both
replicas, each answer that of a single process."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from benchmarks.server_process import ServerProcess, user_message
from runtime import GenerationConfig, Pipeline

pytest.importorskip("ray.serve", reason="Ray Serve is the optional extra: pip install -e '.[ray]'")


def test_two_replicas_answer_as_one_process(no_eot_model_dir):
    server = ServerProcess("--engines", str(no_eot_model_dir), "--backend", "torch", "--ray", "--replicas", "2",
                           timeout=300)
    try:
        def ask(i):
            reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
                "messages": [user_message(f"Question {i}?")], "max_tokens": 64, "block_length": 8, "seed": i})
            assert reply.status_code == 200, reply.text
            return i, reply.headers["x-llada-replica"], reply.json()["choices"][0]["message"]["content"]

        answers = []
        with ThreadPoolExecutor(8) as pool:
            for start in range(0, 64, 8):  # until both replicas have answered (Ray picks the replica)
                answers += pool.map(ask, range(start, start + 8))
                if len({replica for _, replica, _ in answers}) == 2:
                    break
        assert len({replica for _, replica, _ in answers}) == 2
    finally:
        assert server.stop() == 0
    with Pipeline.load(no_eot_model_dir, backend="torch") as pipe:
        for i, _, text in answers:
            cfg = GenerationConfig(gen_length=64, block_length=8, steps=64, seed=i)
            assert text == pipe.generate(f"Question {i}?", config=cfg).text
