"""The transcription of the official LLaDA code (official_llada.py) checked against the rules it transcribes, on
the tiny released-layout checkpoint and on scripted mask predictors, and the chat template ids of the reconstructed
tokenizer: the oracle the runtime's LLaDA decoding is compared with."""

import json
from types import SimpleNamespace

import pytest
import torch

import llada_v
import official_llada as official
import released_llada_layout
from released_llada_layout import EOS, EOT, MASK, VOCAB_ROWS

BOS, START_HEADER, END_HEADER = 126080, 126346, 126347


@pytest.fixture(scope="module")
def tokenizer(released_llada):
    return llada_v.load_tokenizer(released_llada)


@pytest.fixture(scope="module")
def model(released_llada):
    return official.LLaDAModelLM(released_llada)


class Recording:
    """A mask predictor that keeps what it was asked and what it answered."""

    device = torch.device("cpu")

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, attention_mask=None):
        out = self.model(x, attention_mask=attention_mask)
        self.calls.append((x.clone(), out.logits.clone()))
        return out


class Scripted:
    """Logits that are a script: answer position j prefers tokens[j] by margins[j] over every other token (0)."""

    device = torch.device("cpu")

    def __init__(self, prompt_length, tokens, margins):
        self.prompt_length, self.tokens, self.margins = prompt_length, tokens, margins

    def __call__(self, x, attention_mask=None):
        logits = torch.zeros(*x.shape, VOCAB_ROWS)
        for j, (token, margin) in enumerate(zip(self.tokens, self.margins)):
            logits[:, self.prompt_length + j, token] = margin
        return SimpleNamespace(logits=logits)


def _prompt(tokenizer, question="What is 2 + 3?"):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return torch.tensor([tokenizer(text)["input_ids"]])


def test_chat_template_ids_at_the_real_special_token_ids(tokenizer):
    ids = _prompt(tokenizer, "Hi")[0].tolist()
    pieces = [[BOS, START_HEADER], tokenizer("user")["input_ids"], [END_HEADER], tokenizer("\n\nHi")["input_ids"],
              [EOT, START_HEADER], tokenizer("assistant")["input_ids"], [END_HEADER], tokenizer("\n\n")["input_ids"]]
    assert ids == [i for piece in pieces for i in piece]
    assert tokenizer.convert_ids_to_tokens([MASK, EOS, 126082, 126340]) == ["<|mdm_mask|>", "<|endoftext|>", "[CLS]",
                                                                           "<role>"]
    assert len(tokenizer) == 126349 and tokenizer.pad_token_id == EOS


def test_chat_template_is_the_released_one(reference_dir):
    reference = json.loads((reference_dir / "tokenizer_config.json").read_text())  # LLaDA-V's tower: the same template
    assert released_llada_layout.TOKENIZER_CONFIG["chat_template"] == reference["chat_template"]


def test_blocks_are_decoded_left_to_right_on_the_schedule(model, tokenizer):
    recording, prompt = Recording(model), _prompt(tokenizer)
    out = official.generate(recording, prompt, steps=8, gen_length=16, block_length=8)
    length = prompt.shape[1]
    assert torch.equal(out[:, :length], prompt) and not (out == MASK).any()
    assert len(recording.calls) == 8
    for call, (x, _) in enumerate(recording.calls):
        block, step = divmod(call, 4)
        start = length + 8 * block
        assert (x[0, start:start + 8] == MASK).sum() == 8 - 2 * step  # 8 masks over 4 steps: 2 a step
        assert (x[0, start + 8:] == MASK).all() and not (x[0, :start] == MASK).any()


def test_low_confidence_commits_the_most_confident_masked_position(model, tokenizer):
    recording, prompt = Recording(model), _prompt(tokenizer)
    out = official.generate(recording, prompt, steps=8, gen_length=8, block_length=8)
    for (x, logits), (after, _) in zip(recording.calls, [*recording.calls[1:], (out, None)]):
        masked = x[0] == MASK
        p = logits[0].softmax(-1)
        confidence = torch.where(masked, p.max(-1).values, -1.0)
        committed = (after[0] != x[0]).nonzero().flatten().tolist()
        assert committed == [int(confidence.argmax())]
        assert after[0, committed[0]] == logits[0, committed[0]].argmax()


def test_sampling_draws_from_the_global_generator(model, tokenizer):
    prompt = _prompt(tokenizer)

    def sample(seed, **settings):
        torch.manual_seed(seed)
        return official.generate(model, prompt, steps=8, gen_length=8, block_length=8, **settings)

    assert torch.equal(sample(1, temperature=1.0), sample(1, temperature=1.0))
    assert not torch.equal(sample(1, temperature=1.0), sample(2, temperature=1.0))
    assert not torch.equal(sample(1, remasking="random"), sample(2, remasking="random"))
    assert torch.equal(sample(1), sample(2))  # temperature 0, low confidence: nothing random
    assert official.add_gumbel_noise(torch.zeros(3), 0.5).dtype == torch.float64


def _commit_order(settings, tokens, margins):
    """Decode a scripted answer one position a step; returns the answer and its positions in commit order."""
    recording, prompt = Recording(Scripted(2, tokens, margins)), torch.tensor([[BOS, 9]])
    out = official.generate(recording, prompt, steps=len(tokens), gen_length=len(tokens), block_length=len(tokens),
                            **settings)
    states = [x for x, _ in recording.calls] + [out]
    order = [int((after[0, 2:] != before[0, 2:]).nonzero()) for before, after in zip(states, states[1:])]
    return out[0, 2:].tolist(), order


# <|endoftext|> at 0 and 4, <|eot_id|> at 2; the margins order the confidences 0 > 2 > 4 > 5 > 3 > 1.
TOKENS, MARGINS = [EOS, 5, EOT, 6, EOS, 7], [17.0, 12.0, 16.0, 13.0, 15.0, 14.0]


@pytest.mark.parametrize("settings, first, then", [
    ({}, [0, 2, 4, 5, 3, 1], []),
    # temperature 0: line 98 writes -inf into the logits themselves (logits_with_noise is logits), so positions
    # predicting <|endoftext|> or <|eot_id|> have confidence 0 and come last, in an order topk's ties decide
    ({"confidence_eos_eot_inf": True}, [5, 3, 1], [0, 2, 4]),
    # sampling: logits_with_noise is a float64 copy, so only <|eot_id|> loses its confidence
    ({"confidence_eos_eot_inf": True, "temperature": 0.5}, [0, 4, 5, 3, 1, 2], []),
])
def test_the_eos_and_eot_confidences_can_be_taken_away(settings, first, then):
    torch.manual_seed(0)
    answer, order = _commit_order(settings, TOKENS, MARGINS)
    assert answer == TOKENS  # margins of 12 and more survive the noise of 126,463 competitors
    assert order[:len(first)] == first and sorted(order[len(first):]) == then


def test_eos_logits_can_be_taken_away():
    answer, _ = _commit_order({"logits_eos_inf": True}, TOKENS, MARGINS)
    assert EOS not in answer and answer[1::2] == [5, 6, 7]


def test_left_padding_is_masked_and_its_shifted_positions_change_only_rounding(model, tokenizer):
    """The official batch (generate.py's main: left padding with <|endoftext|> and an attention_mask): the padded
    tokens are never attended to, and RoPE, which counts them, gives scores that depend on position differences
    only, so a padded row's logits are the row's alone up to rounding."""
    prompt = _prompt(tokenizer)
    pad = torch.full((1, 3), EOS)
    mask = torch.cat((torch.zeros(1, 3, dtype=torch.long), torch.ones_like(prompt)), dim=1)
    padded = model(torch.cat((pad, prompt), dim=1), attention_mask=mask).logits[:, 3:]
    other_pad = model(torch.cat((pad * 0 + 7, prompt), dim=1), attention_mask=mask).logits[:, 3:]
    unmasked = model(torch.cat((pad, prompt), dim=1)).logits[:, 3:]
    alone = model(prompt).logits
    torch.testing.assert_close(padded, other_pad, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-4)
    assert (unmasked - alone).abs().max() > 1e-2  # the mask is what keeps the padding out


def test_a_chat_turn_continues_the_previous_output_without_eos(tokenizer):
    """chat.py: the answer is every generated token decoded without the special ones; the next prompt is the whole
    previous output with its <|endoftext|> removed, then the new turn without its BOS."""
    first = _prompt(tokenizer, "Hi")
    scripted = Scripted(first.shape[1], [tokenizer("Hello")["input_ids"][0], EOT] + [EOS] * 30, [5.0] * 32)
    answer, prompt = official.chat_turn(scripted, tokenizer, None, "Hi", gen_length=32, steps=32)
    assert answer == tokenizer.decode(tokenizer("Hello")["input_ids"][:1])
    assert prompt[0].tolist() == first[0].tolist() + scripted.tokens[:2]
    second = _prompt(tokenizer, "And you?")[0].tolist()
    _, next_prompt = official.chat_turn(Scripted(len(prompt[0]) + len(second) - 1, [EOS] * 32, [5.0] * 32),
                                        tokenizer, prompt, "And you?", gen_length=32, steps=32)
    assert next_prompt[0].tolist() == prompt[0].tolist() + second[1:]
