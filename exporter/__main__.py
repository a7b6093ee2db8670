"""`python -m exporter build ...`: the command line of exporter.build.build_engines."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .engines_format import TARGETS

EXIT_BUILD_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

EPILOG = """\
The output folder appears only when every part was exported and validated (and, with
--backend tensorrt, built); on any failure nothing is written and an existing folder is kept.
--force replaces an engines folder (one with a manifest.json), never a folder of other files.
A second build into an --out that a running build is writing is refused.

exit codes:
  0    built
  1    a part failed validation against PyTorch, or TensorRT failed to build it
  2    bad input: missing or malformed checkpoint, unknown option value, an --out that may not be
       replaced (engines without --force, other files, a symbolic link) or cannot be written
       (permissions, less disk free than the weights need, disk full), another build into --out
       running, --backend tensorrt without an NVIDIA GPU and the tensorrt package, or with
       --precision int8/int4
  130  interrupted (Ctrl-C)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line instead of argparse's usage block; exit code 2 as argparse."""
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m exporter", description="Export LLaDA-V checkpoints to ONNX / TensorRT engines.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser(
        "build", help="build an engines folder from a checkpoint", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export the vision tower, projector and denoiser (one graph for both passes) of a\n"
                    "checkpoint to ONNX, validate each against the float32 PyTorch model with ONNX Runtime on\n"
                    "several input shapes (and each TensorRT engine too), and write a self-contained engines\n"
                    "folder (docs/engines.md).")
    build.add_argument("--precision", choices=("fp32", "fp16", "int8", "int4"), default="fp16",
                       help="precision baked into the graphs (default: fp16; norms, softmax and RoPE stay fp32); "
                            "int8/int4: weight-only quantized matmuls (ONNX Runtime's MatMulNBits) on fp32 "
                            "activations, for --backend onnx")
    build.add_argument("--model", type=Path, metavar="DIR",
                       help="checkpoint folder: config.json, safetensors, tokenizer (default: the shipped tiny model)")
    build.add_argument("--out", type=_output_folder, default=Path("engines"), metavar="DIR",
                       help="output folder (default: ./engines)")
    build.add_argument("--backend", choices=TARGETS, default="onnx",
                       help="onnx: ONNX parts only (default); tensorrt: also a TensorRT engine per part "
                            "(needs an NVIDIA GPU and `pip install '.[gpu]'`)")
    build.add_argument("--force", action="store_true",
                       help="replace an engines folder at --out once the new build succeeded")
    build.add_argument("--quiet", action="store_true", help="no progress lines")
    limits = build.add_argument_group(
        "limits", "what one call of the engines may take (TensorRT's optimization profiles; the runtime splits larger "
                  "batches and tile sets into calls that fit, for every backend). The defaults fit an 80 GB GPU: "
                  "the model's length up to 8192 (LLaDA-V's) and the largest batch of 8, 4, 2, 1 that fits there (2 "
                  "for LLaDA-V 8B in fp16); the build prints the memory the largest shapes need")
    limits.add_argument("--max-batch", type=int, metavar="N", help="rows per denoiser call")
    limits.add_argument("--max-sequence", type=int, metavar="N",
                        help="prompt + answer positions (default: the model's tokenizer_model_max_length, else "
                             "max_position_embeddings, up to 8192)")
    limits.add_argument("--max-block", type=int, metavar="N", help="block length: logits rows per call (default 256)")
    limits.add_argument("--max-gen-length", type=int, metavar="N",
                        help="answer length for the prefix cache, whose cached pass runs the block and the answer "
                             "after it (default 1024)")
    return parser


def _output_folder(text: str) -> Path:
    if not text:  # Path("") is the current folder
        raise argparse.ArgumentTypeError("is empty (an unset variable?): give the folder to write, e.g. --out engines")
    return Path(text)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _build(args)
    except KeyboardInterrupt:
        print("error: interrupted: nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED


def _build(args: argparse.Namespace) -> int:
    from .build import BuildError, EngineBuildError, ValidationError, build_engines  # after parsing: --help stays fast

    try:
        build_engines(args.model, args.out, args.precision, args.backend, args.force, progress=not args.quiet,
                      max_batch=args.max_batch, max_sequence=args.max_sequence, max_block=args.max_block,
                      max_gen_length=args.max_gen_length)
    except BuildError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValidationError, EngineBuildError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BUILD_FAILED
    return 0


def _one_line(err: Exception) -> str:
    return " ".join(str(err).splitlines())


if __name__ == "__main__":
    sys.exit(main())
