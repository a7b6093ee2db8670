"""Fast-dLLM's cached loops in plain PyTorch, the comparator for the runtime's cached rows.

`cached_loop` is the structure of Fast-dLLM's `generate_with_prefix_cache` / `generate_with_dual_cache`
(NVlabs/Fast-dLLM, llada/generate.py) over the llada_v Denoiser: at each block's first step a full forward
over prompt + answer, whose logits commit that step's tokens and whose keys/values become the cache; every
other step of the block runs only the block and what follows it (`prefix`: the cache holds the positions
before the block) or only the block (`dual`: the cache holds every position but the block's own, Fast-dLLM's
`replace_position`). Decoding rules are LLaDA-V's (low-confidence remasking, temperature 0, the stop rule
at <|eot_id|>), as in the reference loop, so its answers are the runtime's at one refresh per block.

Written by hand because that is the point: it is the research code's loop, not ours. One prompt at a time
(the benchmark's requests are single), and logits only at the block's positions (Fast-dLLM's model computes
them for every query: this comparator is, if anything, faster than the original).
"""

from __future__ import annotations

import torch

from llada_v import SpecialTokens
from llada_v.generate import block_schedule, commit_most_confident, eligible_positions, steps_per_block_of

CACHES = ("prefix", "dual")


@torch.no_grad()
def cached_loop(model, prompt: torch.Tensor, special: SpecialTokens, gen_length: int, block_length: int,
                steps: int, cache: str) -> tuple[torch.Tensor, int, int]:
    """One prompt's embeddings [Lp, C] -> (answer ids [1, gen_length], full forwards, cached forwards)."""
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    denoiser = model.denoiser
    steps_per_block = steps_per_block_of(gen_length, block_length, steps)
    prompt_length = len(prompt)
    total = prompt_length + gen_length
    positions = torch.arange(total)[None]
    x = torch.full((1, gen_length), special.mask)
    full_calls = cached_calls = 0
    for start in range(0, gen_length, block_length):
        end = start + block_length
        block = torch.arange(prompt_length + start, prompt_length + end)[None]
        for step, k in enumerate(block_schedule(block_length, steps_per_block)):
            eligible = eligible_positions(x, start, end, special)
            if not eligible.any():
                break
            if step == 0:  # refresh: the full forward, its keys/values kept
                embeds = torch.cat((prompt, denoiser.embed_tokens(x[0])))[None]
                logits, keys, values = denoiser(embeds, positions, torch.ones(1, total, dtype=torch.long), block)
                full_calls += 1
                if cache == "prefix":
                    keys = [k_[:, :, :prompt_length + start] for k_ in keys]
                    values = [v_[:, :, :prompt_length + start] for v_ in values]
                    past_mask = torch.ones(1, prompt_length + start, dtype=torch.long)
                else:
                    past_mask = torch.ones(1, total, dtype=torch.long)
                    past_mask[:, block[0]] = 0  # the block's stale slots: its fresh keys are attended instead
            else:
                query_end = gen_length if cache == "prefix" else end
                query = x[:, start:query_end]
                logits = denoiser(denoiser.embed_tokens(query), positions[:, prompt_length + start:prompt_length + query_end],
                                  torch.ones_like(query), torch.arange(block_length)[None], keys, values, past_mask)[0]
                cached_calls += 1
            commit_most_confident(x[:, start:end], logits, eligible[:, start:end], k, special)
    return x, full_calls, cached_calls
