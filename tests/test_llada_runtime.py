"""The runtime decodes a text-only LLaDA model as the official ML-GSAI/LLaDA code does (tests/official_llada.py):
on the tiny released-layout checkpoint, the torch backend and fp32 ONNX engines give official generate's tokens
and text for several settings, random remasking included, alone and in a left-padded batch; a chat continues the
ids as official chat.py does; and what the model cannot do is refused with a message saying why."""

import functools
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import official_llada as official
from exporter import build_engines
from llada_v import load_tokenizer
from llada_v.tokenizer import chat_ids
from released_llada_layout import EOS, EOT, MASK
from runtime import GenerationConfig, Pipeline, PromptTooLongError, Request

QUESTION = "What is 2 + 3?"
# (gen_length, block_length, steps): one token a step in blocks, two a step, one block, the official defaults
SETTINGS = [(16, 8, 16), (32, 8, 16), (24, 24, 24), (128, 32, 128)]


@pytest.fixture(scope="module")
def ending_llada(released_llada, tmp_path_factory):
    """The released-layout checkpoint whose head rows of <|endoftext|> and <|eot_id|> are those of the two tokens its
    random weights repeat most, a little larger, so that its answers hold both, as a trained model ends its answers
    and pads them: the tokens where LLaDA's rules (nothing banned, no stop) and LLaDA-V's part."""
    folder = tmp_path_factory.mktemp("ending-llada") / "checkpoint"
    shutil.copytree(released_llada, folder)
    head = "model.transformer.ff_out.weight"
    shard = next(path for path in folder.glob("*.safetensors") if head in safe_open(path, "pt").keys())
    tensors = load_file(shard)
    for token, like, scale in ((EOS, 23320, 1.25), (EOT, 105522, 1.01)):
        tensors[head][token] = tensors[head][like] * scale
    save_file(tensors, shard, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def oracle(ending_llada):
    return official.LLaDAModelLM(ending_llada)


@pytest.fixture(scope="module")
def pipes(ending_llada, tmp_path_factory):
    engines = build_engines(ending_llada, tmp_path_factory.mktemp("llada-runtime") / "fp32", "fp32", progress=False)
    with Pipeline.load(ending_llada, "torch") as torch_pipe, Pipeline.load(engines, "onnxruntime") as ort_pipe:
        yield {"torch": torch_pipe, "onnxruntime": ort_pipe}


def official_prompt(tokenizer, question: str) -> torch.Tensor:
    """generate.py's main: the chat template with the generation prompt, tokenised."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return torch.tensor([tokenizer(text)["input_ids"]])


@pytest.fixture(scope="module")
def official_answer(oracle, ending_llada):
    """answer(gen_length, block_length, steps, remasking, seed): generate.py's (ids, text) for QUESTION, each computed
    once. seed: set torch's global generator first, which random remasking draws from."""
    tokenizer = load_tokenizer(ending_llada)

    @functools.cache
    def answer(gen_length: int, block_length: int, steps: int, remasking: str = "low_confidence",
               seed: int | None = None) -> tuple[list[int], str]:
        if seed is not None:
            torch.manual_seed(seed)
        prompt = official_prompt(tokenizer, QUESTION)
        out = official.generate(oracle, prompt, steps=steps, gen_length=gen_length, block_length=block_length,
                                remasking=remasking)
        ids = out[:, prompt.shape[1]:]
        return ids[0].tolist(), tokenizer.batch_decode(ids, skip_special_tokens=True)[0]

    return answer


def test_the_defaults_are_the_official_ones():
    cfg = GenerationConfig()
    assert (cfg.gen_length, cfg.block_length, cfg.steps, cfg.temperature, cfg.remasking) == \
        (128, 32, 128, 0.0, "low_confidence")  # generate.py's main, chat.py


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("gen_length, block_length, steps", SETTINGS)
def test_generate_gives_the_official_tokens(pipes, official_answer, backend, gen_length, block_length, steps):
    pipe = pipes[backend]
    ids, text = official_answer(gen_length, block_length, steps)
    assert MASK not in ids  # the official loop never committed the mask token, which the runtime bans
    assert EOS in ids  # which LLaDA-V bans
    result = pipe.generate(QUESTION, config=GenerationConfig(gen_length=gen_length, block_length=block_length,
                                                             steps=steps))
    # No stop rule: every position is the answer, decoded without the special tokens, after every step ran.
    assert result.token_ids == ids and result.text == text
    assert result.stats["nfe"] == steps


def test_an_answer_runs_past_its_eot(pipes, official_answer):
    ids, text = official_answer(128, 32, 128)
    assert EOT in ids[:-1] and set(ids[ids.index(EOT):]) - {EOT, EOS}  # LLaDA-V would have stopped there
    result = pipes["torch"].generate(QUESTION)
    assert result.token_ids == ids and result.text == text and result.stats["finish_reason"] == "stop"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("seed", [0, 7])
def test_random_remasking_draws_as_the_official_code_with_the_same_seed(pipes, official_answer, backend, seed):
    pipe = pipes[backend]
    ids, _ = official_answer(32, 16, 16, "random", seed)
    result = pipe.generate(QUESTION, config=GenerationConfig(gen_length=32, block_length=16, steps=16,
                                                             remasking="random", seed=seed))
    assert result.token_ids == ids
    low_confidence, _ = official_answer(32, 16, 16)
    assert ids != low_confidence  # the draws decided the order


def test_a_batch_gives_the_official_left_padded_batch(pipes, oracle, official_answer):
    """generate.py's main batches prompts left-padded with <|endoftext|> and an attention_mask; each row of ours is
    decoded as alone, and both give the same tokens."""
    pipe = pipes["onnxruntime"]
    questions = [QUESTION, "Tell me a story about a dragon who lost its way in the mountains."]
    prompts = [official_prompt(pipe.tokenizer, q)[0] for q in questions]
    width = max(len(p) for p in prompts)
    padded = torch.stack([torch.cat((torch.full((width - len(p),), EOS), p)) for p in prompts])
    attention_mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    out = official.generate(oracle, padded, attention_mask, steps=16, gen_length=16, block_length=8)
    results = pipe.generate(questions, config=GenerationConfig(gen_length=16, block_length=8, steps=16))
    assert [r.token_ids for r in results] == out[:, width:].tolist()
    assert results[0].token_ids == official_answer(16, 8, 16)[0]


def test_a_chat_continues_the_ids_as_official_chat_py(pipes, oracle):
    pipe = pipes["torch"]
    conversation = pipe.chat(GenerationConfig(gen_length=32, block_length=32, steps=32))
    prompt = None
    for question in ("Hi", "What is 2 + 3?", "And 4 + 5?"):
        answer, prompt = official.chat_turn(oracle, pipe.tokenizer, prompt, question, gen_length=32, steps=32)
        if question == "And 4 + 5?":  # streamed: the turn joins the conversation when the stream ends
            stream = conversation.stream(question)
            assert list(stream)[-1] == answer
            result = stream.result
        else:
            result = conversation.send(question)
        assert result.text == answer
    assert [pipe.special.bos] + [t for turn in conversation.turn_ids for t in turn] == prompt[0].tolist()
    assert conversation.turns == 3 and conversation.messages[-1] == {"role": "assistant", "content": answer}


def test_a_chat_keeps_its_system_turn_when_the_oldest_turn_is_dropped(pipes, monkeypatch):
    pipe = pipes["torch"]
    prompts = []
    start_loop = pipe.start
    monkeypatch.setattr(pipe, "start", lambda requests, config: prompts.append(requests[0].ids)
                        or start_loop(requests, config))
    conversation = pipe.chat(GenerationConfig(gen_length=8, block_length=8, steps=8), system="Answer briefly.")
    system = {"role": "system", "content": "Answer briefly."}

    def turn(text):
        return chat_ids(pipe.tokenizer, [{"role": "user", "content": text}])[1:]  # without its BOS

    start = chat_ids(pipe.tokenizer, [system, {"role": "user", "content": "Hi"}])[:-len(turn("Hi"))]
    answers = [[t for t in conversation.send(text).token_ids if t != EOS] for text in ("Hi", "Bye")]
    conversation.drop_oldest_turn()
    conversation.send("Again")
    assert prompts == [start + turn("Hi"), start + turn("Hi") + answers[0] + turn("Bye"),
                       start + turn("Bye") + answers[1] + turn("Again")]
    assert conversation.messages[0] == system and conversation.turns == 2


def test_the_prompt_is_the_chat_template_alone_and_image_is_text(pipes):
    pipe = pipes["torch"]
    text = "Describe <image> please"
    prepared = pipe.prepare(Request(text))
    assert prepared.ids == official_prompt(pipe.tokenizer, text)[0].tolist()  # no system turn, <image> as text


def test_a_plain_prompt_is_tokenised_as_generate_py_takes_the_base_models(pipes, oracle):
    pipe = pipes["torch"]
    text = "The capital of France is"
    prompt = torch.tensor([pipe.tokenizer(text, add_special_tokens=False)["input_ids"]])  # no BOS, no template
    out = official.generate(oracle, prompt, steps=16, gen_length=16, block_length=8)
    assert pipe.prepare(Request(text, plain=True)).ids == prompt[0].tolist()
    result = pipe.generate(Request(text, plain=True), config=GenerationConfig(gen_length=16, block_length=8))
    assert result.token_ids == out[0, prompt.shape[1]:].tolist()
    with pytest.raises(ValueError, match="the prompt is empty"):
        pipe.generate(Request("", plain=True))


def test_images_are_refused_by_a_model_without_vision(pipes, tmp_path):
    pipe = pipes["onnxruntime"]
    picture = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()
    with pytest.raises(ValueError, match="no vision tower"):
        pipe.generate(QUESTION, image=picture)
    with pytest.raises(ValueError, match="no vision tower"):
        pipe.chat().send(QUESTION, image=picture)


def test_a_prompt_beyond_the_4096_positions_is_refused(pipes):
    pipe = pipes["onnxruntime"]
    assert pipe.runner.max_sequence_length == 4096  # the released config's max_sequence_length
    with pytest.raises(PromptTooLongError, match="4096"):
        pipe.generate("one two three four " * 1100, config=GenerationConfig(gen_length=8, block_length=8))
