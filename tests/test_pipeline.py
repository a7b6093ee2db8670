"""The pipeline end to end on the shipped model: the official LLaDA loop, backends, batching, early exit,
streaming, chat, the CLI and bad inputs. Only equalities between paths are checked, never output text."""

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import llada_v
from llada_v import IMAGE_TOKEN_INDEX, SpecialTokens, conversation_ids, load_tokenizer
from llada_v.image_processing import merge_tile_embeddings, preprocess
from runtime import GenerationConfig, Pipeline, Request, Runner
from runtime.__main__ import main
from runtime.generation.batch import Batch
from runtime.generation.prompt import as_request

SHIPPED = llada_v.SHIPPED_MODEL_DIR


@pytest.fixture(scope="module")
def torch_pipe():
    return Pipeline.load(SHIPPED, backend="torch")


@pytest.fixture(scope="module")
def ort_pipe(engines_dir):
    return Pipeline.load(engines_dir, backend="onnxruntime")


def image(seed: int, size=(90, 140)) -> np.ndarray:
    return (np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8)


def pil_image(seed: int) -> Image.Image:
    return Image.fromarray(image(seed, (150, 70)))


# ---- the official loop, transcribed (modeling_llada.py generate_with_embeds, LLaDA-V's banned ids) --------
# tests/test_fidelity.py holds the fuller transcription (prompt, images, mask detection by embedding); this one
# adds the runtime's conventions for what the official code leaves open: seeded Gumbel noise and random
# confidences per request, and the mask id banned.

def get_num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, :remainder[i]] += 1
    return num_transfer_tokens


def official_prompt_embeds(model, tokenizer, prompt, images):
    """The prompt's embeddings built from llada_v alone: text embedded, each image's merged tiles spliced in
    (several images: each one padded square view)."""
    content = " ".join(["<image>"] * len(images)) + "\n" + prompt if images else prompt
    ids = conversation_ids(tokenizer, [{"role": "user", "content": content}])
    aspect = "pad" if len(images) > 1 else "anyres"
    image_embeds = iter([merge_tile_embeddings(model.encode_tiles(t.pixel_values), t, model.image_newline, model.config)
                         for t in (preprocess(img, model.config, aspect) for img in images)])
    pieces = [next(image_embeds) if i == IMAGE_TOKEN_INDEX else model.denoiser.embed_tokens(torch.tensor([i]))
              for i in ids]
    return torch.cat(pieces)


@torch.no_grad()
def official_generate(model, prompt_embeds, special, steps, gen_length, block_length, temperature=0.0,
                      remasking="low_confidence", seed=0):
    """A full forward over the whole sequence each step, logits for every position, top-k; once <|eot_id|>
    is committed only the positions before it compete, and the turn ends once they are filled; a block
    ends once it has no masks. Gumbel noise and random confidences come from one generator seeded with
    `seed`, drawn for the block's positions; masked positions ban the special ids and the mask id itself."""
    g = torch.Generator().manual_seed(seed)
    lp, vocab = prompt_embeds.shape[0], model.config.language.vocab_size
    length = lp + gen_length
    x = torch.full((1, length), special.mask, dtype=torch.long)
    x[:, :lp] = -1  # prompt positions hold embeddings, never masks
    banned = list(special.banned_at_masked) + [special.mask]
    positions, attention = torch.arange(length)[None], torch.ones(1, length, dtype=torch.long)
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    stop = None
    for num_block in range(num_blocks):
        start, end = lp + num_block * block_length, lp + (num_block + 1) * block_length
        if stop is not None and stop <= start:
            break
        block_mask_index = x[:, start:end] == special.mask
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == special.mask
            if stop is not None and not mask_index[0, lp:stop].any() or not mask_index[0, start:end].any():
                break
            embeds = torch.cat([prompt_embeds[None], model.denoiser.embed_tokens(x[:, lp:])], dim=1)
            logits = model.denoiser(embeds, positions, attention, torch.arange(length)[None])[0]
            ban = torch.zeros(vocab, dtype=torch.bool)
            ban[banned] = True
            logits = logits.masked_fill(mask_index[..., None] & ban, float("-inf"))
            noisy = logits.clone()
            if temperature > 0:
                u = torch.rand((block_length, vocab), generator=g).clamp(min=1e-20)
                noisy[:, start:end] += temperature * -torch.log(-torch.log(u))
            x0 = torch.argmax(noisy, dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            else:
                x0_p = torch.zeros(x0.shape)
                x0_p[:, start:end] = torch.rand((block_length,), generator=g)
            x0_p[:, end if stop is None else stop:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            eligible = int(torch.isfinite(confidence).sum())  # the runtime commits no position that is not
            _, select_index = torch.topk(confidence[0], k=min(int(num_transfer_tokens[0, i]), eligible))
            x[0, select_index] = x0[0, select_index]
            answer = x[0, lp:].tolist()
            if special.eot in answer:
                stop = lp + answer.index(special.eot)
    answer = x[0, lp:].tolist()
    return answer[:answer.index(special.eot)] if special.eot in answer else answer


@pytest.mark.parametrize("prompt, images, settings", [
    ("What colour is the square?", [], dict(steps=16)),
    ("How many shapes are there?", [], dict(steps=8)),
    ("What shape is left of the circle?", [0], dict(steps=16)),
    ("Describe both.", [1, 2], dict(steps=16, temperature=0.8, seed=5)),
    ("What colour is the square?", [3], dict(steps=16, remasking="random", seed=2)),
    ("What colour is the square?", [], dict(steps=8, temperature=0.5, remasking="random")),
])
def test_official_loop_equals_uncached(shipped_model, torch_pipe, prompt, images, settings):
    tokenizer = load_tokenizer(SHIPPED)
    special = SpecialTokens.from_tokenizer(tokenizer)
    imgs = [image(i) for i in images]
    expected = official_generate(shipped_model, official_prompt_embeds(shipped_model, tokenizer, prompt, imgs),
                                 special, gen_length=16, block_length=8, **settings)
    result = torch_pipe.generate(prompt, image=imgs or None,
                                 config=GenerationConfig(gen_length=16, block_length=8, **settings))
    assert result.token_ids == expected


# ---- backends -----------------------------------------------------------------------------------------

CONFIGS = [
    dict(),
    dict(temperature=0.7, seed=11),
    dict(remasking="random", seed=4),
    dict(cache="dual", refresh_interval=3),
    dict(cache="prefix", refresh_interval=2, temperature=1.0, seed=1),
    dict(threshold=0.004, cache="dual", refresh_interval=4),
]
REQUESTS = [("What colour is the square?", None), ("What shape is left of the circle?", image(5)),
            ("Compare <image> with <image>.", [image(6), pil_image(7)])]


@pytest.mark.parametrize("settings", CONFIGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_onnxruntime_equals_torch(torch_pipe, ort_pipe, settings):
    cfg = GenerationConfig(gen_length=24, block_length=8, steps=12, **settings)
    for prompt, img in REQUESTS:
        expected = torch_pipe.generate(prompt, image=img, config=cfg)
        got = ort_pipe.generate(prompt, image=img, config=cfg)
        assert got.token_ids == expected.token_ids
        assert got.text == expected.text
        assert got.stats["nfe"] == expected.stats["nfe"]


# ---- batching -----------------------------------------------------------------------------------------

BATCH = [("Hi", None), ("What shape is left of the circle? Answer with one colour word please.", image(8)),
         Request("How many shapes are there?", [image(9), image(10, (60, 200))]), "What colour is the square?"]


@pytest.mark.parametrize("settings", [dict(), dict(cache="dual", refresh_interval=3, temperature=0.9, seed=7),
                                      dict(cache="prefix", refresh_interval=2, threshold=0.004),
                                      dict(remasking="random", seed=3)], ids=["default", "dual-temp", "prefix-threshold",
                                                                             "random"])
def test_batch_equals_requests_alone(ort_pipe, settings):
    cfg = GenerationConfig(gen_length=24, block_length=8, steps=12, **settings)
    batched = ort_pipe.generate(BATCH, config=cfg)
    assert len(set(batched[0].stats["prompt_lengths"])) == len(BATCH)  # the rows really are left-padded
    for request, result in zip(BATCH, batched):
        alone = ort_pipe.generate(as_request(request), config=cfg)
        assert result.token_ids == alone.token_ids
        assert result.text == alone.text


def test_rows_are_left_padded_with_positions_from_their_first_token(ort_pipe):
    prompts = [torch.ones(3, 4), torch.ones(5, 4)]
    batch = Batch.left_padded(prompts, 2, mask_id=7, runner=ort_pipe.runner)
    assert batch.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    assert batch.position_ids.tolist() == [[0, 0, 0, 1, 2, 3, 4], list(range(7))]
    assert batch.embeds[0, :2].eq(0).all() and batch.tokens.eq(7).all() and batch.gen_start == 5


def test_batch_on_torch_equals_alone(torch_pipe):
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=8, cache="dual", refresh_interval=2)
    batched = torch_pipe.generate(BATCH[:2], config=cfg)
    for (prompt, img), result in zip(BATCH[:2], batched):
        assert result.token_ids == torch_pipe.generate(prompt, image=img, config=cfg).token_ids


# ---- early exit ---------------------------------------------------------------------------------------

class ScriptedRunner(Runner):
    """A stand-in model: at answer position j the logits favour `script[j] = (token, strength)`."""

    name = "scripted"

    def __init__(self, script: dict, answer_start: int):
        super().__init__()
        self.script, self.answer_start, self.calls = script, answer_start, 0

    def _activate_impl(self):
        self.config = llada_v.LladaVConfig.from_file(SHIPPED / "config.json")
        self.folder, self.dtype, self.max_sequence_length = SHIPPED, torch.float32, 2048
        lm = self.config.language
        self.embed_table = torch.randn(lm.vocab_size, lm.hidden_size, generator=torch.Generator().manual_seed(0))
        self.image_newline = torch.zeros(lm.hidden_size)

    def _deactivate_impl(self):
        pass

    def _logits(self, position_ids, logits_index):
        self.calls += 1
        answer_positions = position_ids.gather(1, logits_index) - self.answer_start
        logits = torch.zeros(*logits_index.shape, self.config.language.vocab_size)
        for (b, p), j in np.ndenumerate(answer_positions.numpy()):
            token, strength = self.script[j]
            logits[b, p, token] = strength
        return logits

    def _denoise_full_impl(self, inputs_embeds, position_ids, attention_mask, logits_index, present_keys,
                           present_values):
        present_keys.zero_()
        present_values.zero_()
        return self._logits(position_ids, logits_index)

    def _denoise_cached_impl(self, inputs_embeds, position_ids, attention_mask, logits_index, *cache_args):
        return self._logits(position_ids, logits_index)


@pytest.mark.parametrize("settings", [dict(), dict(cache="dual", refresh_interval=2)])
def test_early_exit_once_everything_before_eot_is_filled(settings):
    tokenizer = load_tokenizer(SHIPPED)
    special = SpecialTokens.from_tokenizer(tokenizer)
    prompt = "What colour is the square?"
    words = tokenizer("red green blue", add_special_tokens=False)["input_ids"]
    # eot at answer position 3 is the most confident, so it is committed first, while 0..2 are still masked.
    script = {0: (words[0], 7.0), 1: (words[1], 6.0), 2: (words[2], 5.0), 3: (special.eot, 9.0)}
    script.update({j: (words[0], 1.0) for j in range(4, 16)})
    answer_start = len(conversation_ids(tokenizer, [{"role": "user", "content": prompt}]))
    runner = ScriptedRunner(script, answer_start)
    pipe = Pipeline(runner)
    result = pipe.generate(prompt, config=GenerationConfig(gen_length=16, block_length=8, steps=16, **settings))
    assert result.token_ids == words[:3]
    assert result.text == tokenizer.decode(words[:3])
    # step 1 commits eot (no exit: 0..2 masked), steps 2-4 fill 0..2, then the turn is over
    assert result.stats["steps"] == result.stats["nfe"] == runner.calls == 4


def test_early_exit_on_a_real_model(tmp_path):
    """A copy of the shipped model made to answer <|eot_id|> everywhere: every embedding gets a large
    component along one channel, which survives the final norm, and eot's lm_head row reads only that
    channel. Position 0 commits eot at the first step, so the answer is empty after one forward."""
    special = SpecialTokens.from_tokenizer(load_tokenizer(SHIPPED))
    model = llada_v.load_model(SHIPPED)
    with torch.no_grad():
        model.denoiser.embed_tokens.weight[:, 0] += 100.0
        model.denoiser.lm_head.weight[special.eot] = 0.0
        model.denoiser.lm_head.weight[special.eot, 0] = 10.0
    llada_v.save_model(model, tmp_path, tokenizer_folder=SHIPPED)
    result = Pipeline.load(tmp_path, backend="torch").generate(
        "Hi", config=GenerationConfig(gen_length=16, block_length=8, steps=16))
    assert result.token_ids == [] and result.text == ""
    assert result.stats["nfe"] == result.stats["steps"] == 1


# ---- streaming and chat -------------------------------------------------------------------------------

def test_stream_yields_each_step_and_ends_with_the_answer(ort_pipe):
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=8, cache="dual", refresh_interval=2)
    stream = ort_pipe.stream("What colour is the square?", image=image(12), config=cfg)
    texts = list(stream)
    expected = ort_pipe.generate("What colour is the square?", image=image(12), config=cfg)
    assert len(texts) == stream.result.stats["steps"]
    assert stream.result.token_ids == expected.token_ids
    assert texts[-1] == expected.text
    seen = []
    ort_pipe.generate("What colour is the square?", image=image(12), config=cfg, on_step=seen.append)
    assert seen == texts


def test_onnxruntime_loop_runs_torch_single_threaded_and_restores_it(ort_pipe, monkeypatch):
    """On CPU the loop's small torch ops share the cores with ONNX Runtime: one torch thread meanwhile,
    and the caller's setting between steps (on_step runs in the caller's world)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        in_loop, between = [], []
        denoise = ort_pipe.runner._denoise_full_impl
        monkeypatch.setattr(ort_pipe.runner, "_denoise_full_impl",
                            lambda *a: in_loop.append(torch.get_num_threads()) or denoise(*a))
        ort_pipe.generate("What colour is the square?", config=GenerationConfig(gen_length=4, block_length=4),
                          on_step=lambda text: between.append(torch.get_num_threads()))
        assert set(in_loop) == {1} and set(between) == {2} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_conversation_keeps_earlier_turns_as_context(ort_pipe):
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=8)
    conversation = ort_pipe.chat(cfg)
    first = conversation.send("What shape is left of the circle?", image=image(13))
    second = conversation.send("And what colour is it?")
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    messages = [{"role": "user", "content": "<image>\nWhat shape is left of the circle?"},
                {"role": "assistant", "content": first.text},
                {"role": "user", "content": "And what colour is it?"}]
    assert second.token_ids == ort_pipe.generate(Request(messages, image(13)), config=cfg).token_ids
    streamed = list(conversation.stream("How many?", image=image(14)))
    assert len(conversation.messages) == 6 and len(conversation.images) == 2 and streamed
    conversation.reset()
    assert conversation.messages == [] and conversation.images == []
    assert conversation.send("What colour is the square?").token_ids == \
        ort_pipe.generate("What colour is the square?", config=cfg).token_ids


def test_text_only_prompt_and_image_forms_agree(ort_pipe):
    cfg = GenerationConfig(gen_length=8, block_length=8, steps=4)
    question = "What colour is the circle?"  # a task question: answered with a word (an empty answer has no tokens/s)
    array = image(15)
    by_array = ort_pipe.generate(question, image=array, config=cfg)
    by_pil = ort_pipe.generate(question, image=Image.fromarray(array), config=cfg)
    by_placeholder = ort_pipe.generate(f"<image>\n{question}", image=[array], config=cfg)
    assert by_array.token_ids == by_pil.token_ids == by_placeholder.token_ids
    stats = by_array.stats
    assert stats["stage_seconds"]["vision"] > 0 and stats["stage_seconds"]["full_forward"] > 0
    assert stats["nfe"] == stats["full_forwards"] + stats["cached_forwards"]
    assert stats["tokens_per_second"] > 0
    assert abs(sum(stats["stage_seconds"].values()) - stats["seconds"]) < 1e-6


# ---- bad inputs ---------------------------------------------------------------------------------------

def test_image_count_mismatch(ort_pipe):
    with pytest.raises(ValueError, match="the prompt has 2 <image> placeholder\\(s\\) but 1 image\\(s\\)"):
        ort_pipe.generate("<image> and <image>?", image=image(0))
    with pytest.raises(ValueError, match="1 <image> placeholder\\(s\\) but 0 image\\(s\\)"):
        ort_pipe.generate("<image> what?")


def test_unreadable_and_corrupt_images(ort_pipe, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ort_pipe.generate("What?", image=tmp_path / "missing.png")
    corrupt = tmp_path / "corrupt.png"
    png = io.BytesIO()
    Image.fromarray(image(0)).save(png, format="PNG")
    corrupt.write_bytes(png.getvalue()[:60])
    with pytest.raises(ValueError, match="cannot read image"):
        ort_pipe.generate("What?", image=corrupt)
    with pytest.raises(ValueError, match="must be RGB with shape"):
        ort_pipe.generate("What?", image=np.zeros((4, 4), dtype=np.uint8))


def test_prompt_longer_than_the_engines_allow(ort_pipe, torch_pipe):
    long_prompt = "red green blue " * 700
    for pipe in (ort_pipe, torch_pipe):
        with pytest.raises(ValueError, match="exceeds the maximum sequence length 2048.*lower gen_length"):
            pipe.generate(long_prompt, config=GenerationConfig(gen_length=32, block_length=32))


def test_batch_arguments_are_checked(ort_pipe):
    with pytest.raises(ValueError, match="give each request its image"):
        ort_pipe.generate(["a", "b"], image=image(0))
    with pytest.raises(ValueError, match="the list of requests is empty"):
        ort_pipe.generate([])
    with pytest.raises(ValueError, match="config must be a GenerationConfig"):
        ort_pipe.generate("a", config={"gen_length": 8})


# ---- command line -------------------------------------------------------------------------------------

def test_cli_generate(engines_dir, ort_pipe, capsys, tmp_path):
    path = tmp_path / "square.png"
    Image.fromarray(image(16)).save(path)
    args = ["generate", "--engines", str(engines_dir), "--prompt", "Which colour?", "--image", str(path),
            "--gen-length", "16", "--block-length", "8", "--cache", "dual", "--refresh-interval", "2"]
    assert main(args) == 0
    expected = ort_pipe.generate("Which colour?", image=str(path), config=GenerationConfig(
        gen_length=16, block_length=8, cache="dual", refresh_interval=2))
    assert capsys.readouterr().out == expected.text + "\n"
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out.endswith(expected.text + "\n")


def test_cli_refresh_policy(engines_dir, ort_pipe, capsys):
    assert main(["generate", "--engines", str(engines_dir), "--prompt", "Which colour?", "--gen-length", "16",
                 "--block-length", "8", "--cache", "dual", "--refresh", "drift", "--refresh-interval", "8",
                 "--drift-threshold", "1e-6", "--stats"]) == 0
    out, err = capsys.readouterr()
    expected = ort_pipe.generate("Which colour?", config=GenerationConfig(
        gen_length=16, block_length=8, cache="dual", refresh="drift", refresh_interval=8, drift_threshold=1e-6))
    assert out == expected.text + "\n"
    assert json.loads(err)["full_forwards"] == expected.stats.full_forwards


def test_cli_official_settings(engines_dir, ort_pipe, capsys):
    assert main(["generate", "--engines", str(engines_dir), "--prompt", "What colour is the circle?",
                 "--official", "--gen-length", "8", "--stats"]) == 0
    out, err = capsys.readouterr()
    expected = ort_pipe.generate("What colour is the circle?", config=GenerationConfig.official(gen_length=8))
    assert out == expected.text + "\n" and json.loads(err)["steps"] == expected.stats["steps"]


@pytest.mark.parametrize("extra, match", [
    (["--official", "--cache", "dual", "--block-length", "8"], "--official sets the decoding itself: drop "
                                                                 "--block-length, --cache"),
    (["--gen-length", "10", "--block-length", "4"], "not a multiple of block_length"),
    (["--cache", "full"], "invalid choice: 'full'"),
    (["--refresh-interval", "0"], "refresh_interval must be >= 1"),
    (["--refresh", "adaptive"], "invalid choice: 'adaptive'"),
    (["--drift-threshold", "-1"], "drift_threshold must be a finite number > 0"),
    (["--official", "--refresh", "drift"], "--official sets the decoding itself: drop --refresh"),
    (["--image", "/nonexistent.png"], "does not exist"),
])
def test_cli_errors_are_one_line_and_exit_2(engines_dir, capsys, extra, match):
    try:
        status = main(["generate", "--engines", str(engines_dir), "--prompt", "Hi", *extra])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_cli_tensorrt_without_a_gpu(engines_dir, capsys):
    assert main(["generate", "--engines", str(engines_dir), "--prompt", "Hi", "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs an NVIDIA GPU" in err


def test_cli_missing_engines_folder(tmp_path, capsys):
    assert main(["generate", "--engines", str(tmp_path / "none"), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_cli_chat(engines_dir, ort_pipe, capsys, monkeypatch, tmp_path):
    path = tmp_path / "shape.png"
    Image.fromarray(image(17)).save(path)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {path}\nWhat shape?\nAnd its colour?\n/reset\nHi\n/quit\n"))
    assert main(["chat", "--engines", str(engines_dir), "--gen-length", "8", "--block-length", "8"]) == 0
    out = capsys.readouterr().out
    cfg = GenerationConfig(gen_length=8, block_length=8)
    conversation = ort_pipe.chat(cfg)
    expected = [conversation.send("What shape?", image=str(path)).text, conversation.send("And its colour?").text,
                ort_pipe.generate("Hi", config=cfg).text]
    assert out == "".join(text + "\n" for text in expected)


# ---- hardening: prompts, image forms, process state, long chats, the CLI's exits -------------------------

@pytest.mark.parametrize("prompt, match", [
    (None, "a prompt must be text or a conversation .*got NoneType"),
    (42, "got int"),
    (b"What?", "got bytes"),
    ({"role": "user", "content": "Hi"}, "got dict"),
    ("What \ud800 is it?", "lone surrogate"),
    ([{"role": "user", "content": "Hi \udfff"}], "lone surrogate"),
])
def test_prompts_that_are_not_text_are_refused(ort_pipe, prompt, match):
    with pytest.raises(ValueError, match=match):
        ort_pipe.generate(prompt)


def test_a_list_of_messages_is_one_conversation_not_a_batch(ort_pipe):
    cfg = GenerationConfig(gen_length=8, block_length=8)
    messages = [{"role": "user", "content": "What colour is the square?"}]
    result = ort_pipe.generate(messages, config=cfg)
    assert not isinstance(result, list)
    assert result.token_ids == ort_pipe.generate(Request(messages), config=cfg).token_ids
    batch = ort_pipe.generate([Request(messages), "Hi"], config=cfg)
    assert [r.token_ids for r in batch] == [result.token_ids, ort_pipe.generate("Hi", config=cfg).token_ids]


def test_images_as_bytes_files_and_generators_are_read_once(ort_pipe, tmp_path):
    cfg = GenerationConfig(gen_length=8, block_length=8)
    path = tmp_path / "a.png"
    Image.fromarray(image(3)).save(path)
    expected = ort_pipe.generate("Which colour?", image=path, config=cfg).token_ids
    with open(path, "rb") as file:
        assert ort_pipe.generate("Which colour?", image=file, config=cfg).token_ids == expected
    assert ort_pipe.generate("Which colour?", image=path.read_bytes(), config=cfg).token_ids == expected
    request = Request("Which colour?", (p for p in [path]))
    assert len(request.images) == 1 and len(request.messages()[-1]["content"].split("<image>")) == 2
    assert ort_pipe.generate(request, config=cfg).token_ids == expected
    with pytest.raises(ValueError, match="an image must be a path, encoded bytes, a binary file.*got int"):
        ort_pipe.generate("Which colour?", image=7)
    with open(path) as text_file, pytest.raises(ValueError, match="binary mode"):
        ort_pipe.generate("Which colour?", image=text_file)


def test_abandoned_streams_leave_torch_threads_as_they_were(ort_pipe):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        streams = [ort_pipe.stream("What colour is the square?", config=GenerationConfig(gen_length=8, block_length=8))
                   for _ in range(2)]
        for stream in streams:
            next(stream)  # then dropped mid-answer
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_a_chat_past_the_sequence_length_says_how_to_go_on(ort_pipe, monkeypatch):
    cfg = GenerationConfig(gen_length=8, block_length=8)
    conversation = ort_pipe.chat(cfg)
    conversation.send("What colour is the square?", image=image(4))
    conversation.send("And the circle?")
    monkeypatch.setattr(ort_pipe.runner, "max_sequence_length", 60)
    with pytest.raises(ValueError, match="holds 2 earlier turn\\(s\\): drop the oldest with drop_oldest_turn\\(\\)"):
        conversation.send("And the triangle?")
    assert conversation.turns == 2  # the failed turn left nothing behind
    conversation.drop_oldest_turn()
    assert conversation.turns == 1 and conversation.images == []
    assert [m["content"] for m in conversation.messages][0] == "And the circle?"


def test_tokenizer_files_and_chat_template_are_checked_when_loading(tmp_path):
    import shutil

    folder = shutil.copytree(SHIPPED, tmp_path / "model")
    (folder / "tokenizer_config.json").write_text("{garbage")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        Pipeline.load(folder, "torch")
    shutil.copy2(SHIPPED / "tokenizer_config.json", folder / "tokenizer_config.json")
    raw = json.loads((folder / "tokenizer_config.json").read_text())
    raw["chat_template"] = "{{ ''.__class__.__mro__ }}"  # the jinja sandbox refuses attribute access like this
    (folder / "tokenizer_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="chat template in .*tokenizer_config.json cannot be rendered"):
        Pipeline.load(folder, "torch")


def test_cli_interrupt_and_closed_stdout(engines_dir, capsys, monkeypatch):
    args = ["generate", "--engines", str(engines_dir), "--prompt", "Hi", "--gen-length", "8", "--block-length", "8"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "generate", interrupted)
    assert main(args) == 130
    assert capsys.readouterr().err == "interrupted\n"
    monkeypatch.undo()


def test_cli_ctrl_c_while_importing_is_one_line(interrupted_while_importing, engines_dir):
    status, stderr = interrupted_while_importing(["-m", "runtime", "generate", "--engines", str(engines_dir),
                                                  "--prompt", "Hi"])
    assert (status, stderr) == (130, "interrupted\n")


def test_cli_refuses_engines_whose_weights_point_outside_the_folder(engines_dir, tmp_path, capsys):
    import shutil

    import onnx

    folder = tmp_path / "engines"
    shutil.copytree(engines_dir, folder)
    graph_file = folder / "denoiser.onnx"
    onnx.save(onnx.load(str(graph_file)), str(graph_file), save_as_external_data=True, location="denoiser.data",
              size_threshold=0)
    (folder / "denoiser.data").rename(tmp_path / "elsewhere.data")  # beside the folder, and named from inside it
    model = onnx.load(str(graph_file), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere.data"
    graph_file.write_bytes(model.SerializeToString())
    assert main(["generate", "--engines", str(folder), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'../elsewhere.data', which is not a file inside" in err


def test_load_without_a_path_is_a_value_error():
    with pytest.raises(ValueError, match="path must be an engines folder .* got None"):
        Pipeline.load(None)


def test_cli_output_to_a_closed_pipe_exits_quietly(engines_dir):
    import subprocess
    import sys

    command = [sys.executable, "-m", "runtime", "generate", "--engines", str(engines_dir), "--prompt", "Hi",
               "--gen-length", "8", "--block-length", "8", "--stream"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first line
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1 and "Traceback" not in stderr and "BrokenPipe" not in stderr
