"""The plain LLaDA-V sampler in PyTorch (no cache, one denoiser call over prompt and answer per step): the reference
every faster loop is compared with, and the pieces the benchmarks' comparators share.

Decoding rules are LLaDA-V's generate: the answer in blocks, each block's masks spread evenly over its steps
(get_num_transfer_tokens), low-confidence remasking at temperature 0 with float64 confidences, and the stop rule
(once <|eot_id|> is committed only the positions before it compete).
"""

from __future__ import annotations

import torch

from .model import LladaV
from .tokenizer import SpecialTokens


def denoise(model: LladaV, prompts: list[torch.Tensor], response: torch.Tensor) -> torch.Tensor:
    """Logits [B, R, V] at the response positions for prompts [Lp_b, C] each followed by response ids [B, R].

    Sequences are right-padded to the longest; padding is removed from attention by `attention_mask`.
    """
    b, r = response.shape
    response_embeds = model.denoiser.embed_tokens(response)
    lengths = [len(p) + r for p in prompts]
    width = max(lengths)
    hidden = prompts[0].shape[-1]
    embeds = torch.zeros(b, width, hidden)
    attention_mask = torch.zeros(b, width, dtype=torch.long)
    logits_index = torch.empty(b, r, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        lp = len(prompt)
        embeds[i, :lp + r] = torch.cat((prompt, response_embeds[i]))
        attention_mask[i, :lp + r] = 1
        logits_index[i] = torch.arange(lp, lp + r)
    position_ids = torch.arange(width).expand(b, width)
    logits, _, _ = model.denoiser(embeds, position_ids, attention_mask, logits_index)
    return logits


@torch.no_grad()
def reference_loop(model, prompts: list[torch.Tensor], special: SpecialTokens, gen_length: int, block_length: int,
                   steps: int) -> tuple[torch.Tensor, int]:
    """LLaDA-V's sampler on a batch of prompt embeddings [Lp, C]: low-confidence remasking, temperature 0, and
    its stop rule (once <|eot_id|> is committed only the positions before it compete). Returns the answer
    ids [B, gen_length] and the number of denoiser calls."""
    steps_per_block = steps_per_block_of(gen_length, block_length, steps)
    x = torch.full((len(prompts), gen_length), special.mask)
    calls = 0
    for start in range(0, gen_length, block_length):
        for k in block_schedule(block_length, steps_per_block):
            eligible = eligible_positions(x, start, start + block_length, special)
            if not eligible.any():
                break  # every row's block is filled, or its answer ended before it
            logits = denoise(model, prompts, x)
            calls += 1
            commit_most_confident(x, logits, eligible, k, special)
    return x, calls


def steps_per_block_of(gen_length: int, block_length: int, steps: int) -> int:
    if gen_length % block_length or steps % (gen_length // block_length):
        raise ValueError("gen_length must be a multiple of block_length, and steps of the number of blocks")
    return steps // (gen_length // block_length)


def block_schedule(masks: int, steps: int) -> list[int]:
    """Positions committed at each step of a block: `masks` spread evenly over `steps` (get_num_transfer_tokens)."""
    return [masks // steps + (s < masks % steps) for s in range(steps)]


def eligible_positions(x: torch.Tensor, start: int, end: int, special: SpecialTokens) -> torch.Tensor:
    """[B, gen_length] bool: masked, inside the block [start, end), and before the row's first <|eot_id|>."""
    positions = torch.arange(x.shape[1])
    is_eot = x == special.eot
    stops = torch.where(is_eot.any(1), is_eot.int().argmax(1), x.shape[1])
    return (x == special.mask) & (positions >= start) & (positions < end) & (positions < stops[:, None])


def commit_most_confident(x: torch.Tensor, logits: torch.Tensor, eligible: torch.Tensor, k: int,
                          special: SpecialTokens) -> None:
    """Low-confidence remasking at temperature 0, in place: each row commits its (at most) k most confident
    eligible positions. x, eligible [B, L]; logits [B, L, V] at the same positions (L: a slice of the answer)."""
    banned = list(special.banned_at_masked)
    logits[..., banned] = torch.where((x == special.mask)[..., None], float("-inf"), logits[..., banned])
    confidence, x0 = logits.double().softmax(-1).max(-1)  # float64, as LLaDA's generate.py
    confidence = torch.where(eligible, confidence, float("-inf"))
    for row in range(x.shape[0]):
        top = confidence[row].topk(min(k, int(eligible[row].sum()))).indices
        x[row, top] = x0[row, top]
