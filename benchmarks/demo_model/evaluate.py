"""Exact-match accuracy and token F1 of a model on the held-out split of the synthetic visual QA task.

    python -m benchmarks.demo_model.evaluate [--model DIR | --engines DIR] [--backend torch|onnxruntime|tensorrt|reference]
        [--cache none|prefix|dual] [--refresh-interval N] [--limit N]

The torch / onnxruntime / tensorrt backends go through the project's runtime (`runtime.Pipeline`).
`reference` decodes with the plain LLaDA loop in PyTorch (llada_v/generate.py) (low-confidence remasking,
temperature 0, no cache): the figure the runtime's `cache="none"` must reproduce.
A predictor maps a list of examples to their answers; `accuracy` scores them. Other benchmarks reuse
`load_examples`, `is_exact_match` and `token_f1`.
"""

from __future__ import annotations

import argparse
import json
import string
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

import torch

from llada_v import SHIPPED_MODEL_DIR, SpecialTokens, load_model, load_tokenizer
from llada_v.generate import reference_loop
from runtime.backends import BACKENDS
from runtime.config import CACHE_MODES

from .data import LONG_TYPES, QUESTION_TYPES, Example, load_examples
from .train import Encoder, prompt_embeddings

# The decodings the demo model was trained for, one token per step: one-word answers in one block of 8 tokens,
# descriptions in 64 (two blocks of 32).
SHORT_DECODING = {"gen_length": 8, "block_length": 8, "steps": 8}
LONG_DECODING = {"gen_length": 64, "block_length": 32, "steps": 64}


def decoding_for(kind: str) -> dict:
    return LONG_DECODING if kind in LONG_TYPES else SHORT_DECODING


def by_decoding(predict_with: Callable[[list[Example], dict], list[str]], decode: dict) -> "Predictor":
    """A predictor that decodes every example with `decode`, or when it is empty each with its kind's decoding
    (the examples of one decoding in one call, the answers back in the order of the examples)."""
    def predict(examples: list[Example]) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        for i, ex in enumerate(examples):
            groups.setdefault(tuple(sorted((decode or decoding_for(ex.kind)).items())), []).append(i)
        answers: list[str] = [""] * len(examples)
        for settings, indices in groups.items():
            for i, text in zip(indices, predict_with([examples[i] for i in indices], dict(settings))):
                answers[i] = text
        return answers

    return predict

__all__ = ["load_examples", "normalize", "is_exact_match", "token_f1", "accuracy", "reference_predictor",
           "runtime_predictor"]

Predictor = Callable[[list[Example]], list[str]]


def normalize(text: str) -> str:
    """Exact-match normalisation: strip whitespace and trailing punctuation, lowercase."""
    return text.strip().rstrip(string.punctuation).strip().lower()


def is_exact_match(predicted: str, expected: str) -> bool:
    return normalize(predicted) == normalize(expected)


def words(text: str) -> list[str]:
    """The words of a normalised answer, punctuation dropped: "top left: red circle," -> [top, left, red, circle]."""
    return normalize(text).translate(str.maketrans("", "", string.punctuation)).split()


def token_f1(predicted: str, expected: str) -> float:
    """SQuAD's token-level F1: harmonic mean of the precision and recall of the shared words (a multiset)."""
    pred, gold = words(predicted), words(expected)
    if not pred or not gold:
        return float(pred == gold)
    shared = sum((Counter(pred) & Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


def accuracy(predictions: list[str], examples: list[Example]) -> dict:
    """{"accuracy": exact match, "f1": mean token F1, "n": count, "per_type": {kind: exact match},
    "f1_per_type": {kind: F1}, "errors": [...]} of answers to `examples`."""
    hits, f1s, totals, errors = defaultdict(int), defaultdict(float), defaultdict(int), []
    for ex, predicted in zip(examples, predictions, strict=True):
        ok = is_exact_match(predicted, ex.answer)
        totals[ex.kind] += 1
        hits[ex.kind] += ok
        f1s[ex.kind] += token_f1(predicted, ex.answer)
        if not ok:
            errors.append({"question": ex.question, "answer": ex.answer, "predicted": predicted, "kind": ex.kind})
    n = sum(totals.values())
    kinds = [k for k in QUESTION_TYPES if totals[k]]
    return {"accuracy": sum(hits.values()) / max(1, n), "f1": sum(f1s.values()) / max(1, n), "n": n,
            "per_type": {k: hits[k] / totals[k] for k in kinds}, "f1_per_type": {k: f1s[k] / totals[k] for k in kinds},
            "errors": errors}


# ---- the reference loop (plain LLaDA, no cache) -----------------------------------------------

@torch.no_grad()
def reference_generate(model, encoder: Encoder, examples: list[Example], gen_length: int, block_length: int,
                       steps: int) -> list[str]:
    """The reference loop on a batch of examples; answers end at <|eot_id|>."""
    special: SpecialTokens = encoder.special
    prompts = prompt_embeddings(model, [encoder.encode(ex.image, ex.question) for ex in examples])
    x, _ = reference_loop(model, prompts, special, gen_length, block_length, steps)
    texts = []
    for row in x.tolist():
        cut = row.index(special.eot) if special.eot in row else len(row)
        texts.append(encoder.tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


def reference_predictor(model_dir: str | Path = SHIPPED_MODEL_DIR, batch_size: int = 50, **decode) -> Predictor:
    """The reference loop as a predictor, decoding `batch_size` examples at a time (`decode`: gen_length,
    block_length and steps for every example; default: each example's kind's)."""
    model = load_model(model_dir).eval()
    encoder = Encoder(load_tokenizer(model_dir), model.config)

    def predict_with(examples: list[Example], settings: dict) -> list[str]:
        return [text for i in range(0, len(examples), batch_size)
                for text in reference_generate(model, encoder, examples[i:i + batch_size], **settings)]

    return by_decoding(predict_with, decode)


def runtime_predictor(path: str | Path, backend: str = "torch", cache: str = "none", refresh_interval: int = 1,
                      decode: dict | None = None, **config) -> Predictor:
    """The project's runtime as a predictor (`decode`: as in reference_predictor; `config`: more
    GenerationConfig fields)."""
    from runtime import GenerationConfig, Pipeline

    pipe = Pipeline.load(path, backend=backend)

    def predict_with(examples: list[Example], settings: dict) -> list[str]:
        generation = GenerationConfig(**settings, cache=cache, refresh_interval=refresh_interval, **config)
        return [pipe.generate(ex.question, image=ex.image, config=generation).text for ex in examples]

    return by_decoding(predict_with, decode or {})


def main() -> None:
    parser = argparse.ArgumentParser(description="exact-match accuracy on the demo task's held-out split")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="checkpoint folder (default: the shipped model)")
    source.add_argument("--engines", type=Path, help="exported engines folder")
    parser.add_argument("--backend", choices=(*BACKENDS, "reference"), default=None,
                        help="default: onnxruntime with --engines, else torch")
    parser.add_argument("--cache", choices=CACHE_MODES, default="none")
    parser.add_argument("--refresh-interval", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N held-out examples")
    parser.add_argument("--seed", type=int, default=0, help="data seed of the held-out split")
    parser.add_argument("--errors", action="store_true", help="also print the wrong answers")
    args = parser.parse_args()
    backend = args.backend or ("onnxruntime" if args.engines else "torch")
    path = args.engines or args.model or SHIPPED_MODEL_DIR
    examples = load_examples("eval", args.seed, args.limit)
    if backend == "reference":
        if args.cache != "none":
            parser.error("the reference loop has no cache: use --cache none")
        predict = reference_predictor(path)
    else:
        predict = runtime_predictor(path, backend, args.cache, args.refresh_interval)
    result = accuracy(predict(examples), examples)
    errors = result.pop("errors")
    print(json.dumps({"backend": backend, "path": str(path), "cache": args.cache,
                      "refresh_interval": args.refresh_interval, **result}, indent=2))
    if args.errors:
        for err in errors:
            print(err)


if __name__ == "__main__":
    main()
