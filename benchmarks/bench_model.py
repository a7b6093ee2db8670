"""A benchmark-sized model: LLaDA-V's structure with seeded random weights, sized so that the prompt is
dominated by image tokens as in the real model (one image gives 741 tokens here, 729+ in LLaDA-V) and
one request takes seconds on a 2-core CPU; with `--text`, its language model alone as a text-only LLaDA
model, in the released LLaDA layout.

`python -m benchmarks.bench_model [--text] --out DIR` writes the checkpoint and builds its engines
(DIR/checkpoint, DIR/engines); speed is measured on it, quality on the shipped model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from llada_v import SHIPPED_MODEL_DIR, LladaV, SpecialTokens, load_tokenizer, save_model
from llada_v.config import LLADA, LanguageConfig, LladaVConfig, VisionConfig, default_grid_pinpoints
from llada_v.tiny import init_weights

IMAGE_SIZE = 152  # 19 x 19 patches of 8 px: the global view (361) and one grid tile (19 x 20) give 741 tokens
# More vocabulary rows than the tokenizer has, as in LLaDA; the loader cuts them to the tokenizer's 375
# (docs/fidelity.md), so the head (384 x 375 against 4 layers of 1.8M weights) is 2% of a decoded
# position's work, against 7% in LLaDA-8B.
VOCAB_SIZE = 1024


def bench_config() -> LladaVConfig:
    vision = VisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          image_size=IMAGE_SIZE, patch_size=8)
    language = LanguageConfig(vocab_size=VOCAB_SIZE, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                              num_attention_heads=6, num_key_value_heads=6, rope_theta=10000.0,
                              max_position_embeddings=4096)
    return LladaVConfig(language=language, vision=vision, image_grid_pinpoints=default_grid_pinpoints(IMAGE_SIZE))


def text_bench_config() -> LladaVConfig:
    """The same language model as a text-only LLaDA model. LLaDA's loader keeps every vocabulary row
    (docs/fidelity.md), so its head has all 1,024: 5% of a decoded position's work, as against 7% in LLaDA-8B."""
    return LladaVConfig(language=bench_config().language, vision=None, family=LLADA)


def write_checkpoint(folder: Path, seed: int = 0, text: bool = False) -> Path:
    """The benchmark model's checkpoint, in LLaDA-V's layout, or (text) in the text-only LLaDA layout."""
    tokenizer = load_tokenizer(SHIPPED_MODEL_DIR)
    if len(tokenizer) > VOCAB_SIZE:
        raise ValueError(f"the shipped tokenizer has {len(tokenizer)} tokens, more than the benchmark vocabulary {VOCAB_SIZE}")
    model = LladaV(text_bench_config() if text else bench_config())
    init_weights(model, seed)
    special = SpecialTokens.from_tokenizer(tokenizer)
    # Zero rows: their logit is 0 while the best of 1000 random logits is well above, so they never win.
    # <|eot_id|>: no request stops early and every row of a benchmark decodes all its blocks. In the text model
    # also the ids LLaDA-V bans and LLaDA does not (docs/fidelity.md), so the research loops (LLaDA-V's rules)
    # and the runtime (LLaDA's) decode the same answers and the benchmark's rows compare like with like.
    never = [special.eot, *(special.banned_at_masked if text else ())]
    with torch.no_grad():
        model.denoiser.lm_head.weight[never] = 0
    save_model(model, folder, tokenizer_folder=SHIPPED_MODEL_DIR)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-model"), help="folder for checkpoint/ and engines/")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8", "int4"), default="fp32",
                        help="engine precision (fp32: ONNX Runtime's CPU kernels are fp32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", action="store_true",
                        help="a text-only model in the released LLaDA layout (LLaDA-8B-Instruct's), no vision")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)

    from exporter.build import BuildError, build_engines

    if args.out.exists() and any(args.out.iterdir()):
        if not args.force:
            print(f"error: {args.out} exists and is not empty; pass --force to replace it", file=sys.stderr)
            return 2
        shutil.rmtree(args.out)
    checkpoint = write_checkpoint(args.out / "checkpoint", args.seed, text=args.text)
    try:
        build_engines(checkpoint, args.out / "engines", precision=args.precision)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"checkpoint: {checkpoint}\nengines:    {args.out / 'engines'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
