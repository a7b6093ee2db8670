"""Train the shipped demo LLaDA-V from scratch on the synthetic visual QA task.

    python -m benchmarks.demo_model.train [--out DIR] [--steps N] [--minutes M] [--seed S]

LLaDA-V's objective (the paper's Eq. 1, as in LLaDA's SFT): the image and the prompt stay clean;
each response token (answer + <|eot_id|> + <|endoftext|> padding up to the response length) is
replaced by the mask token with probability t ~ U(0, 1), drawn per example; the loss is the
cross-entropy on masked tokens weighted by 1/t and divided by the response length. Every
`long_every`-th step of the full task is a long batch (LONG_RESPONSE_LENGTH = 64: half descriptions, half
one-word questions, so that those learn to end in a long response too); the others are 16 one-word questions at
RESPONSE_LENGTH = 8. The vision
tower, projector and denoiser are trained together, through the real LLaDA-V path: preprocess ->
encode_tiles -> merge_tile_embeddings -> spliced into the embedded prompt -> denoiser.

A curriculum of two stages: for the first `--perception-steps` steps each image is one object on a single
64 px tile and the question asks its shape or which half of the image it is in (perception first: mixed in
with the full task, shape stayed at chance); the rest is the full task, position questions included so that
reading an object's place is not forgotten.

The shipped weights are this command with its defaults (fixed seed, fp32, 2 threads): 9,000 steps, 28.6
minutes on this project's 2-core machine on 2026-12-03 (a perception step 127 ms, a full-task step 199 ms on
average; the host runs at different speeds on different days: the 10,000-step recipe before it took 47.6 minutes
on 2026-12-02). One-word questions are drawn with TRAINING_WEIGHTS (data.py): two-step questions twice as often.
A different thread count changes float summation order, so weights come out close but not bitwise equal.
`--minutes` only stops a run early on a slower machine; `--stop-after N` reproduces a `--save-every` checkpoint of
the same schedule.

The learning rate is low on purpose: with one-token answers, Eq. 1 weights a masked answer by 1/t, so
its gradient has E[1/t] = ln(1/eps) ~ 7 times the variance of plain cross-entropy. At 5e-4 to 1e-3 the
model never left the answer-from-the-question-alone plateau (loss ~0.17); at 1.5e-4 to 2e-4 it did. (At
1e-3 even plain cross-entropy did not learn shapes in one-object scenes, which 2e-4 learns in 1,000 steps.)
These were measured with the earlier N(0, 0.02) initialisation (see llada_v/tiny.py), not the current one.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llada_v import IMAGE_TOKEN_INDEX, SHIPPED_MODEL_DIR, LladaV, SpecialTokens, conversation_ids, save_model
from llada_v.config import tiny_config
from llada_v.generate import denoise
from llada_v.image_processing import ImageTiles, merge_tile_embeddings, preprocess
from llada_v.tiny import build_tokenizer, init_weights
from llada_v.tokenizer import SYSTEM_PROMPT, load_tokenizer

from .data import corpus, make_example, prompt_text

RESPONSE_LENGTH = 8
LONG_RESPONSE_LENGTH = 64  # the longest description is 32 tokens; the dial is measured at gen_length 64
MASK_EPS = 1e-3  # LLaDA's forward process: t is drawn from [eps, 1] so 1/t stays bounded


# ---- the objective ---------------------------------------------------------------------------

def mask_response(response: torch.Tensor, mask_id: int, generator: torch.Generator | None = None):
    """response [B, R] -> (noisy [B, R], masked [B, R] bool, t [B]): each token masked with prob t."""
    b, r = response.shape
    # Low-discrepancy draw (as in MDLM): t_i = (u + i / B) mod 1, each still U(0, 1), spread over the batch.
    u = (torch.rand(1, generator=generator) + torch.arange(b) / b) % 1
    t = (1 - MASK_EPS) * u + MASK_EPS
    masked = torch.rand(b, r, generator=generator) < t[:, None]
    return torch.where(masked, mask_id, response), masked, t


def diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. 1: mean over the batch of sum over masked response tokens of CE / t, divided by R.

    logits [B, R, V]; targets [B, R]; masked [B, R] bool; t [B].
    """
    b, r = targets.shape
    ce = F.cross_entropy(logits.reshape(b * r, -1), targets.reshape(-1), reduction="none").view(b, r)
    return (ce * masked / t[:, None]).sum() / (b * r)


# ---- turning examples into model inputs -------------------------------------------------------

@dataclass
class Encoded:
    """One example, ready to embed: prompt ids (IMAGE_TOKEN_INDEX where the image goes) and tiles."""
    prompt_ids: list[int]
    tiles: ImageTiles
    response: list[int] | None = None


class Encoder:
    """Tokenises prompts (cached: questions repeat) and answers, preprocesses images."""

    def __init__(self, tokenizer, cfg):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self._prompts: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompts:
            self._prompts[question] = conversation_ids(self.tokenizer, [{"role": "user", "content": prompt_text(question)}])
        return self._prompts[question]

    def response_ids(self, answer: str, length: int = RESPONSE_LENGTH) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.special.eot]
        if len(ids) > length:
            raise ValueError(f"answer {answer!r} needs {len(ids)} tokens, more than the response length {length}")
        return ids + [self.special.eos] * (length - len(ids))

    def encode(self, image, question: str, answer: str | None = None, response_length: int = RESPONSE_LENGTH) -> Encoded:
        response = None if answer is None else self.response_ids(answer, response_length)
        return Encoded(self.prompt_ids(question), preprocess(image, self.cfg), response)


def image_embeddings(model: LladaV, batch: list[Encoded]) -> list[torch.Tensor]:
    """All tiles of the batch through the vision tower and projector at once, then merged per image."""
    pixels = torch.cat([enc.tiles.pixel_values for enc in batch])
    tile_embeddings = model.encode_tiles(pixels).split([len(enc.tiles.pixel_values) for enc in batch])
    return [merge_tile_embeddings(emb, enc.tiles, model.image_newline, model.config)
            for emb, enc in zip(tile_embeddings, batch)]


def prompt_embeddings(model: LladaV, batch: list[Encoded]) -> list[torch.Tensor]:
    """Each prompt's token embeddings with the image embeddings spliced in at IMAGE_TOKEN_INDEX: [Lp, C]."""
    embed = model.denoiser.embed_tokens
    out = []
    for enc, image in zip(batch, image_embeddings(model, batch)):
        ids = torch.tensor(enc.prompt_ids)
        (at,) = (ids == IMAGE_TOKEN_INDEX).nonzero()[:, 0].tolist()
        out.append(torch.cat((embed(ids[:at]), image, embed(ids[at + 1:]))))
    return out


def training_step(model: LladaV, batch: list[Encoded], mask_id: int, generator: torch.Generator | None = None):
    response = torch.tensor([enc.response for enc in batch])
    noisy, masked, t = mask_response(response, mask_id, generator)
    logits = denoise(model, prompt_embeddings(model, batch), noisy)
    return diffusion_loss(logits, response, masked, t)


# ---- the model and the run --------------------------------------------------------------------

def make_tokenizer(folder: Path, seed: int, vocab_size: int) -> int:
    # The fixed system prompt is one token of its own: the CPU training spends its compute on image and question.
    roles = ["system", "user", "assistant"] * 100  # the chat template's role names
    return build_tokenizer(corpus(seed) + roles, folder, vocab_size, phrases=(SYSTEM_PROMPT,))


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; its defaults are the shipped model's."""
    steps: int = 9000
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.1
    warmup: int = 150
    vision_lr_scale: float = 1.0  # learning-rate factor of the image path
    perception_steps: int = 1000  # the curriculum's first stage: one object per image, its shape or position asked
    long_every: int = 4  # every long_every-th step of the full task is a long batch (0: none)
    long_batch_size: int = 8  # 8 long examples cost about what 16 one-word ones do (259 vs 307 ms a step)
    seed: int = 0
    vocab_size: int = 1024
    threads: int = 2


def train(out: Path, cfg: TrainConfig = TrainConfig(), minutes: float | None = None, log_every: int = 50,
          save_every: int | None = None, stop_after: int | None = None) -> LladaV:
    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp)
        vocab = make_tokenizer(tok_dir, cfg.seed, cfg.vocab_size)
        tokenizer = load_tokenizer(tok_dir)
        model = LladaV(tiny_config(vocab_size=vocab))
        init_weights(model, cfg.seed)
        encoder = Encoder(tokenizer, model.config)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"vocab {vocab}, {n_params / 1e6:.2f}M parameters, {cfg.steps} steps of {cfg.batch_size}")
        # Parameter groups: matrices decay, embeddings/norms/biases don't; the image path (vision tower,
        # projector, image_newline) may take a smaller learning rate.
        groups: dict[tuple[bool, bool], list] = {}
        for n, p in model.named_parameters():
            decays = p.dim() > 1 and "embed_tokens" not in n
            image_path = not n.startswith("denoiser.")
            groups.setdefault((decays, image_path), []).append(p)
        opt = torch.optim.AdamW([{"params": ps, "weight_decay": cfg.weight_decay if decays else 0.0,
                                  "lr_scale": cfg.vision_lr_scale if image_path else 1.0}
                                 for (decays, image_path), ps in groups.items()], lr=cfg.lr, betas=(0.9, 0.99))
        generator = torch.Generator().manual_seed(cfg.seed)
        start, running = time.time(), None
        bar = tqdm(range(cfg.steps), desc="train", dynamic_ncols=True)
        for step in bar:
            perception = step < cfg.perception_steps
            long = not perception and cfg.long_every > 0 and step % cfg.long_every == cfg.long_every - 1
            examples = [make_example("train", cfg.seed, step * cfg.batch_size + j, perception, long)
                        for j in range(cfg.long_batch_size if long else cfg.batch_size)]
            length = LONG_RESPONSE_LENGTH if long else RESPONSE_LENGTH
            batch = [encoder.encode(ex.image, ex.question, ex.answer, length) for ex in examples]
            step_lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
            for group in opt.param_groups:
                group["lr"] = step_lr * group["lr_scale"]
            loss = training_step(model, batch, encoder.special.mask, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step}")
            running = value if running is None else 0.98 * running + 0.02 * value
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{step_lr:.2e}", stage="perception" if perception else "full")
            if step % log_every == 0 or step == cfg.steps - 1:
                tqdm.write(f"step {step:5d}  loss {running:.4f}  {time.time() - start:7.1f}s")
            if save_every and (step + 1) % save_every == 0 and step + 1 < cfg.steps:
                save_model(model, out, tokenizer_folder=tok_dir)  # a usable checkpoint while training goes on
            if stop_after is not None and step + 1 >= stop_after:
                tqdm.write(f"stopping after step {step + 1} of the {cfg.steps}-step schedule (--stop-after)")
                break
            if minutes is not None and time.time() - start > 60 * minutes:
                tqdm.write(f"stopping at step {step + 1}: the {minutes} minute budget is spent")
                break
        model.eval()
        save_model(model, out, tokenizer_folder=tok_dir)
    print(f"saved {out} after {time.time() - start:.0f}s")
    return model


def main() -> None:
    recipe = TrainConfig()
    parser = argparse.ArgumentParser(description="train the shipped demo LLaDA-V on the synthetic visual QA task")
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL_DIR, help="checkpoint folder (default: the shipped model)")
    parser.add_argument("--steps", type=int, default=recipe.steps)
    parser.add_argument("--batch-size", type=int, default=recipe.batch_size)
    parser.add_argument("--lr", type=float, default=recipe.lr)
    parser.add_argument("--weight-decay", type=float, default=recipe.weight_decay)
    parser.add_argument("--warmup", type=int, default=recipe.warmup)
    parser.add_argument("--vision-lr-scale", type=float, default=recipe.vision_lr_scale,
                        help="learning rate factor of the image path")
    parser.add_argument("--perception-steps", type=int, default=recipe.perception_steps,
                        help="the curriculum's first stage: one object per image, its shape or position asked "
                             "(0: none)")
    parser.add_argument("--long-every", type=int, default=recipe.long_every,
                        help="every N-th step of the full task is a long batch (descriptions; 0: none)")
    parser.add_argument("--seed", type=int, default=recipe.seed)
    parser.add_argument("--threads", type=int, default=recipe.threads)
    parser.add_argument("--minutes", type=float, default=None, help="stop early once this much time is spent")
    parser.add_argument("--save-every", type=int, default=None, help="also save the checkpoint every N steps")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after N steps of the --steps schedule (reproduces a --save-every checkpoint)")
    args = parser.parse_args()
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      warmup=args.warmup, vision_lr_scale=args.vision_lr_scale,
                      perception_steps=args.perception_steps, long_every=args.long_every, seed=args.seed,
                      threads=args.threads)
    train(args.out, cfg, minutes=args.minutes, save_every=args.save_every, stop_after=args.stop_after)


if __name__ == "__main__":
    main()
