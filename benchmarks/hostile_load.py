"""Load test: a well-behaved client's latency alone, then while hostile clients attack the same server process.

    python -m benchmarks.hostile_load --engines engines --requests 20

The well-behaved client streams its questions one after the other (the example images and questions of the demo
task, one seed each), in three phases: alone; while every pathological case of the hostile probe (issue 30) is sent
at a steady rate (--rate per second each: steps far beyond the answer, a padded-square bomb, twenty 8192x8192 images, a 16 MB prompt, requests
without the key, a 1 MB header, half-open connections), which the server must refuse without cost; and with a crowd
of valid 1600x1200 image requests added, which it serves beside the client within its pixel budget. The attackers
run in a process of their own. Reports the client's p50/p95/max latency per phase, whether its answers stayed the
same, the attackers' replies by status, and the server's peak memory. Writes hostile_load.json under --out.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw

from benchmarks.common import load_requests, machine_info
from benchmarks.server_process import ServerProcess, data_url, user_message
from runtime.backends import BACKENDS

KEY = "benchmark-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_body(question: str, *images: Image.Image, **settings) -> bytes:
    content = [{"type": "text", "text": question}, *({"type": "image_url", "image_url": {"url": data_url(image)}}
                                                      for image in images)]
    return json.dumps({"messages": [{"role": "user", "content": content}], **settings}).encode()


CROWD = "1600x1200 image requests (valid)"
ATTACKS = ("steps 1e10", "padded-square bomb", "20 images of 8192x8192", "16 MB prompt", "no key", "1 MB header",
           CROWD)


def hostile_bodies() -> dict[str, tuple[bytes, dict]]:
    """Each attack's request body (made once) and its headers."""
    picture = Image.new("RGB", (1600, 1200), (240, 240, 240))
    ImageDraw.Draw(picture).ellipse((500, 300, 1100, 900), fill=(200, 30, 30))
    hi = [user_message("Hi")]
    return {
        "steps 1e10": (json.dumps({"messages": hi, "max_tokens": 64, "steps": 10**10}).encode(), AUTH),
        "padded-square bomb": (image_body("Compare them.", Image.new("RGB", (64, 64)), Image.new("L", (1, 100_000)),
                                          max_tokens=8), AUTH),
        "20 images of 8192x8192": (image_body("Describe them.", *[Image.new("1", (8192, 8192), 1)] * 20), AUTH),
        "16 MB prompt": (json.dumps({"messages": [user_message("x" * 16 * 2**20)], "max_tokens": 8}).encode(), AUTH),
        "no key": (json.dumps({"messages": hi, "max_tokens": 8}).encode(), {}),
        "1 MB header": (json.dumps({"messages": hi, "max_tokens": 8}).encode(), {**AUTH, "x-filler": "a" * 2**20}),
        CROWD: (image_body("What colour is the circle?", picture, max_tokens=8), AUTH),
    }


def attack(url: str, body: bytes, headers: dict, rate: float, stop: threading.Event, replies: Counter,
           lock: threading.Lock):
    """Send the same request `rate` times a second (0: each as soon as the last was answered) until `stop`, counting
    the replies by status."""
    with httpx.Client(timeout=120) as client:
        while not stop.wait(1 / rate if rate else 0):
            try:
                status = str(client.post(f"{url}/v1/chat/completions", content=body,
                                         headers={"content-type": "application/json", **headers}).status_code)
            except httpx.TransportError as err:
                status = type(err).__name__
            with lock:
                replies[status] += 1


def slowloris(port: int, connections: int, stop: threading.Event, replies: Counter, lock: threading.Lock):
    """Keep `connections` connections open that each sent half a request head; count those the server closed."""
    sockets: list[socket.socket] = []
    while not stop.is_set():
        while len(sockets) < connections:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
                sock.setblocking(False)
                sockets.append(sock)
            except OSError:
                break
        time.sleep(0.5)
        for sock in list(sockets):
            try:
                closed = sock.recv(1024) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if closed:
                sock.close()
                sockets.remove(sock)
                with lock:
                    replies["closed by the server"] += 1
    for sock in sockets:
        sock.close()


def well_behaved(url: str, bodies: list[dict]) -> dict:
    """Each body streamed in turn: latencies and answers."""
    latencies, answers = [], []
    for body in bodies:
        start, text = time.perf_counter(), ""
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=300) as reply:
            if reply.status_code != 200:
                raise RuntimeError(f"the well-behaved client got {reply.status_code}: {reply.read().decode()}")
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(f"the well-behaved client's stream failed: {chunk['error']}")
                    text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
        latencies.append(time.perf_counter() - start)
        answers.append(text)
    return {"latencies": latencies, "answers": answers, "p50": float(np.percentile(latencies, 50)),
            "p95": float(np.percentile(latencies, 95)), "max": max(latencies)}


def run_attacks(url: str, port: int, names: list[str], rate: float, half_open: int, ready, stop, results):
    """In a process of its own: each named attack `rate` times a second (the crowd: 8 clients, each sending its next
    request when the last is answered) and `half_open` half-open connections, from `ready` until `stop` is set;
    then the replies by attack and status."""
    bodies = hostile_bodies()
    replies, lock, done = {name: Counter() for name in [*names, "half-open connections"]}, threading.Lock(), \
        threading.Event()
    threads = [threading.Thread(target=attack, args=(url, *bodies[name], 0 if name == CROWD else rate, done,
                                                     replies[name], lock))
               for name in names for _ in range(8 if name == CROWD else 1)]
    if half_open:
        threads.append(threading.Thread(target=slowloris, args=(port, half_open, done,
                                                                replies["half-open connections"], lock)))
    for thread in threads:
        thread.start()
    ready.set()
    stop.wait()
    done.set()
    for thread in threads:
        thread.join()
    results.put({name: dict(counts) for name, counts in replies.items() if counts})


def under_attack(server, bodies: list[dict], names: list[str], args) -> tuple[dict, dict]:
    """The well-behaved client's phase while `names` attack; its figures and the attackers' replies."""
    context = multiprocessing.get_context("spawn")
    ready, stop, results = context.Event(), context.Event(), context.Queue()
    attackers = context.Process(target=run_attacks, args=(server.url, server.port, names, args.rate,
                                                          args.half_open, ready, stop, results))
    attackers.start()
    try:
        if not ready.wait(300):
            raise RuntimeError("the attackers' process did not start")
        time.sleep(2)  # the attack is under way
        client = well_behaved(server.url, bodies)
    finally:
        stop.set()
    replies = results.get(timeout=300)
    attackers.join()
    return client, replies


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hostile_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=Path, required=True, help="engines folder (a checkpoint with --backend torch)")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    parser.add_argument("--requests", type=int, default=20, help="the well-behaved client's requests per phase")
    parser.add_argument("--gen-length", type=int, default=32, help="max_tokens of its requests")
    parser.add_argument("--rate", type=float, default=5,
                        help="requests per second of each pathological attack (0: as fast as answered)")
    parser.add_argument("--half-open", type=int, default=300, help="half-open connections kept open")
    parser.add_argument("--without", nargs="+", default=[], metavar="ATTACK",
                        help=f"leave out attacks (of {', '.join(ATTACKS)})")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    if min(args.requests, args.gen_length) < 1 or args.rate < 0 or args.half_open < 0:
        parser.error("--requests and --gen-length must be >= 1, --rate and --half-open >= 0")
    if set(args.without) - set(ATTACKS):
        parser.error(f"unknown attack in --without: use names of {', '.join(ATTACKS)}")
    return args


PHASES = {"alone": "alone", "refused": "under pathological attack", "crowded": "... and a crowd of valid requests"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bodies = [{"messages": [user_message(r.prompt, [r.image])], "max_tokens": args.gen_length, "block_length": 8,
               "cache": "dual", "seed": i, "stream": True} for i, r in enumerate(load_requests(args.requests, False))]
    pathological = [name for name in ATTACKS if name != CROWD and name not in args.without]
    server = ServerProcess("--engines", str(args.engines), "--backend", args.backend, "--api-key", KEY,
                           "--timeout-read", "5", threads=2)
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": machine_info(), "phases": {}, "hostile_replies": {}}
    try:
        well_behaved(server.url, bodies[:2])  # warm-up: first calls allocate
        report["phases"]["alone"] = well_behaved(server.url, bodies)
        for phase, names in (("refused", pathological), ("crowded", [*pathological, CROWD])):
            client, replies = under_attack(server, bodies, names, args)
            report["phases"][phase], report["hostile_replies"][phase] = client, replies
            print(f"{PHASES[phase]}: p50 {client['p50']:.2f} s, p95 {client['p95']:.2f} s", file=sys.stderr)
        report["healthy_after"] = httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        report["server_peak_rss_mb"] = server.peak_rss_mb()
        report["server_log_tracebacks"] = server.output().count("Traceback")
    finally:
        server.stop()
    alone = report["phases"]["alone"]["answers"]
    report["same_answers"] = {phase: sum(a == b for a, b in zip(alone, row["answers"]))
                              for phase, row in report["phases"].items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hostile_load.json").write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"wrote {args.out / 'hostile_load.json'}", file=sys.stderr)
    return 0


def print_table(report: dict) -> None:
    print("| well-behaved client | p50 latency (s) | p95 latency (s) | max (s) | same answers |")
    print("|---|---|---|---|---|")
    for phase, row in report["phases"].items():
        print(f"| {PHASES[phase]} | {row['p50']:.2f} | {row['p95']:.2f} | {row['max']:.2f} | "
              f"{report['same_answers'][phase]}/{len(row['answers'])} |")
    print(f"\nserver healthy after: {report['healthy_after']}; peak RSS {report['server_peak_rss_mb']:.0f} MB; "
          f"tracebacks in its log: {report['server_log_tracebacks']}\n")
    print("| attack (last phase) | replies |")
    print("|---|---|")
    for name, counts in report["hostile_replies"]["crowded"].items():
        print(f"| {name} | {', '.join(f'{status}: {n}' for status, n in sorted(counts.items()))} |")


if __name__ == "__main__":
    sys.exit(main())
