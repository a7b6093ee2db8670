"""Command line: one generation, an interactive chat, or an OpenAI-compatible server.

    python -m runtime generate --engines DIR --prompt TEXT [--image PATH ...] [--cache dual ... | --official] [--stream]
    python -m runtime chat --engines DIR      (stdin: questions; /image PATH, /drop, /reset, /quit)
    python -m runtime serve --engines DIR [--port 8000] [--max-batch 8] [--ray --replicas N]

Errors are one line on stderr and exit status 2; Ctrl-C exits with 130, a closed stdout (`| head`) with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from .backends import BACKENDS
from .config import CACHE_MODES, REFRESH_POLICIES, REMASKING, GenerationConfig
from .serving.cli import add_serve_options, serve
from .serving.settings import SERVE_DEFAULTS


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (see `python -m runtime --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m runtime", description="Run LLaDA-V engines.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    generate = commands.add_parser("generate", help="answer one prompt")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--image", action="append", default=[], metavar="PATH",
                          help="an image for the prompt (repeat for several, one <image> each)")
    chat = commands.add_parser("chat", help="multi-turn chat on stdin")
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (POST /v1/chat/completions)")
    add_serve_options(serve)
    for sub in (generate, chat, serve):
        sub.add_argument("--engines", "--model", dest="path", required=True, metavar="DIR",
                         help="engines folder (onnxruntime, tensorrt) or checkpoint folder (torch)")
        sub.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
        sub.add_argument("--device", default=None, help="cpu or cuda (default: cuda for tensorrt, else cpu)")
        if sub is not serve:
            sub.add_argument("--stream", action="store_true", help="print the answer as it is decoded")
            sub.add_argument("--stats", action="store_true", help="print each generation's stats as JSON on stderr")
        options = sub.add_argument_group("generation" if sub is not serve else
                                         "a request's defaults (max_tokens -> gen-length)")
        options.add_argument("--gen-length", type=int,
                             default=GenerationConfig.gen_length if sub is not serve else SERVE_DEFAULTS.gen_length)
        options.add_argument("--block-length", type=int, default=GenerationConfig.block_length)
        options.add_argument("--steps", type=int, default=None, help="default: gen-length")
        options.add_argument("--temperature", type=float, default=GenerationConfig.temperature)
        options.add_argument("--remasking", choices=REMASKING, default=GenerationConfig.remasking)
        options.add_argument("--cache", choices=CACHE_MODES, default=GenerationConfig.cache)
        options.add_argument("--refresh", choices=REFRESH_POLICIES, default=GenerationConfig.refresh,
                             help="with a cache, when a full forward refreshes it (see --refresh-interval)")
        options.add_argument("--refresh-interval", type=int, default=GenerationConfig.refresh_interval,
                             help="steps (interval), committed tokens (committed) or the most steps (drift) "
                                  "between refreshes")
        options.add_argument("--drift-threshold", type=float, default=GenerationConfig.drift_threshold,
                             help="--refresh drift: the keys' relative change that triggers a refresh")
        options.add_argument("--threshold", type=float, default=None)
        options.add_argument("--seed", type=int, default=GenerationConfig.seed)
        if sub is not serve:
            options.add_argument("--official", action="store_true",
                                 help="the official LLaDA-V demo's decoding: one block of gen-length, one token per "
                                      "step, temperature 0, low-confidence remasking, no cache")
    return parser


# What --official fixes, as option name -> its default; another value given beside --official is refused.
OFFICIAL_FIXED = {"block_length": GenerationConfig.block_length, "steps": None, "temperature": 0.0,
                  "remasking": "low_confidence", "cache": "none", "refresh": GenerationConfig.refresh,
                  "refresh_interval": GenerationConfig.refresh_interval,
                  "drift_threshold": GenerationConfig.drift_threshold, "threshold": None}


def generation_config(args) -> GenerationConfig:
    if getattr(args, "official", False):
        given = [f"--{name.replace('_', '-')}" for name, default in OFFICIAL_FIXED.items()
                 if getattr(args, name) != default]
        if given:
            raise ValueError(f"--official sets the decoding itself: drop {', '.join(given)} (--gen-length goes "
                             f"with it)")
        return GenerationConfig.official(args.gen_length)
    return GenerationConfig(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                            temperature=args.temperature, remasking=args.remasking, cache=args.cache,
                            refresh=args.refresh, refresh_interval=args.refresh_interval,
                            drift_threshold=args.drift_threshold, threshold=args.threshold, seed=args.seed)


def print_answer(args, run, stream_run) -> None:
    """Run one turn: stream its partial answers (printing what each adds), or print the final text."""
    if args.stream:
        stream, shown = stream_run(), ""
        for text in stream:
            sys.stdout.write(text[len(shown):] if text.startswith(shown) else "\n" + text)
            sys.stdout.flush()
            shown = text
        result = stream.result
        sys.stdout.write(result.text[len(shown):] if result.text.startswith(shown) else "\n" + result.text)
        sys.stdout.write("\n")
    else:
        result = run()
        print(result.text)
    sys.stdout.flush()
    if args.stats:
        print(json.dumps(result.stats.to_dict()), file=sys.stderr)


def chat_loop(args, pipe, config: GenerationConfig) -> None:
    conversation = pipe.chat(config)
    images: list[str] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            return
        if line == "/reset":
            conversation.reset()
            images = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line == "/drop":
            try:
                conversation.drop_oldest_turn()
                print(f"(oldest turn dropped, {conversation.turns} left)", file=sys.stderr)
            except ValueError as err:
                print(f"error: {one_line(err)}", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not path:
                print("error: /image needs a path", file=sys.stderr)
            else:
                images.append(path)
            continue
        turn_images, images = images, []
        try:
            print_answer(args, lambda: conversation.send(line, turn_images or None),
                         lambda: conversation.stream(line, turn_images or None))
        except ValueError as err:  # a bad image or a too long conversation: this turn only
            print(f"error: {one_line(err)}", file=sys.stderr)


def one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *rest, **kw: f"warning: {one_line(message)}\n"  # one line, no path
    try:
        config = generation_config(args)
        if args.command == "serve":
            return serve(args, config)
        from .pipeline import Pipeline  # here, not at the top: Ctrl-C while torch imports is handled below

        pipe = Pipeline.load(args.path, backend=args.backend, device=args.device)
        if args.command == "generate":
            image = args.image or None
            print_answer(args, lambda: pipe.generate(args.prompt, image=image, config=config),
                         lambda: pipe.stream(args.prompt, image=image, config=config))
        else:
            chat_loop(args, pipe, config)
    except ValueError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away: send what is still buffered nowhere, so that exiting does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
