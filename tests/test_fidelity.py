"""Fidelity to the official LLaDA-V code (docs/fidelity.md): each rule against the transcription in
official_llada_v.py, on a case where the official behaviour and the obvious alternative differ, then whole
generations on a checkpoint in the released layout through the torch backend and fp32 ONNX engines."""

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

import llada_v
import official_llada_v as official
import released_layout
from exporter.build import build_engines
from llada_v import CheckpointError, LladaVConfig
from llada_v.config import LanguageConfig
from llada_v.image_processing import preprocess
from runtime import GenerationConfig, Pipeline, Runner

QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return released_layout.write_checkpoint(tmp_path_factory.mktemp("released") / "checkpoint")


@pytest.fixture(scope="module")
def official_model(released):
    return official.load_pretrained_model(released)


@pytest.fixture(scope="module")
def tokenizer(released):
    return llada_v.load_tokenizer(released)


def picture(width, height, seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    pixels[: height // 2, :, 3] = 0  # fully transparent top half: black once resized in RGBA
    image = Image.fromarray(pixels, "RGBA")
    if mode == "P":
        return image.convert("RGB").quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    return image if mode == "RGBA" else image.convert("RGB")


# ---- 1. prompt ids -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_prompt_ids_drop_the_first_token_after_each_image(tokenizer, n_images):
    from runtime.generation.prompt import Request, request_ids

    ours = request_ids(Request(QUESTION, [picture(8, 8)] * n_images), tokenizer)
    text = official.prompt_question(tokenizer, QUESTION, n_images)
    assert ours == official.tokenizer_image_token(text, tokenizer)
    assert ours.count(llada_v.IMAGE_TOKEN_INDEX) == n_images
    every_chunk_whole = [i for n, chunk in enumerate(text.split("<image>"))
                         for i in ([llada_v.IMAGE_TOKEN_INDEX] if n else []) + tokenizer(chunk)["input_ids"]]
    assert len(every_chunk_whole) - len(ours) == n_images  # the `\n` (and the spaces) after each image


# ---- 2. vocabulary ---------------------------------------------------------------------------------------------

def test_vocabulary_is_cut_to_the_tokenizers_length(released, tokenizer):
    model = llada_v.load_model(released)
    rows = len(tokenizer)
    assert rows == 126349 and model.config.language.vocab_size == rows
    shard = json.loads((released / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    with safe_open(released / shard, "pt") as f:
        stored = f.get_tensor("lm_head.weight").float()
    assert stored.shape[0] == released_layout.VOCAB_ROWS
    assert torch.equal(model.denoiser.lm_head.weight, stored[:rows])
    hidden = torch.randn(64, stored.shape[1])
    assert (hidden @ stored.T).argmax(-1).min() >= rows  # the uncut head would answer with padding rows


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, shipped_model_dir):
    folder = shutil.copytree(shipped_model_dir, tmp_path / "model")
    released_layout.write_tokenizer(folder)
    with pytest.raises(CheckpointError, match="the tokenizer has 126349 tokens but the model's vocabulary only"):
        llada_v.load_model(folder)


# ---- 3. stop rule, on a scripted denoiser whose logits read the answer so far ---------------------------------

A, B = 10, 11
STOP_AT = 4


class ScriptedDenoiser(nn.Module):
    """Token t embeds as (t, 0), so the logits can be a script of the answer: <|eot_id|> at STOP_AT is the
    surest guess, then A after it, then before it A while the last position is masked, B once it is not.
    The official rule fills the positions before the stop first (A A A A); letting the whole block compete
    would fill those after it first (B B B B). mask_at_0: the mask token is the surest guess at 0."""

    def __init__(self, prompt_length: int, mask_at_0: bool = False):
        super().__init__()
        self.prompt_length, self.mask_at_0 = prompt_length, mask_at_0
        table = torch.zeros(126349, 2)
        table[:, 0] = torch.arange(126349)
        self.embed_tokens = nn.Embedding.from_pretrained(table)

    def forward(self, inputs_embeds, position_ids, attention_mask, logits_index, *cache):
        answer = inputs_embeds[:, self.prompt_length:, 0].round().long()
        logits = torch.zeros(*inputs_embeds.shape[:2], 126349)
        for b, row in enumerate(answer.tolist()):
            at = self.prompt_length
            if self.mask_at_0:
                logits[b, at:, A] = 10.0
                logits[b, at, released_layout.MASK] = 30.0
                continue
            logits[b, at + STOP_AT, released_layout.EOT] = 20.0
            logits[b, at + STOP_AT + 1:, A] = 15.0
            before = B if row[-1] != released_layout.MASK else A
            logits[b, at:at + STOP_AT, before] = 12.0 - 0.1 * torch.arange(STOP_AT)
        return torch.gather(logits, 1, logits_index[..., None].expand(-1, -1, logits.shape[-1])), (), ()


class ScriptedRunner(Runner):
    name = "scripted"

    def __init__(self, denoiser: ScriptedDenoiser, tokenizer_folder):
        super().__init__()
        self.denoiser, self.tokenizer_folder = denoiser, tokenizer_folder

    def _activate_impl(self):
        language = LanguageConfig(vocab_size=126349, hidden_size=2, intermediate_size=2, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1)
        self.config, self.folder = LladaVConfig(language=language, vision=None), self.tokenizer_folder
        self.dtype = torch.float32
        self.max_sequence_length, self.embed_table = 1024, self.denoiser.embed_tokens.weight

    def _deactivate_impl(self):
        pass

    def _denoise_full_impl(self, inputs_embeds, position_ids, attention_mask, logits_index, *presents):
        return self.denoiser(inputs_embeds, position_ids, attention_mask, logits_index)[0]

    def _denoise_cached_impl(self, *args):
        raise AssertionError("these tests run without a cache")


def scripted(released, tokenizer, mask_at_0=False):
    """Our pipeline and the official loop's model around one scripted denoiser, and the prompt's embeddings."""
    ids = official.tokenizer_image_token(official.prompt_question(tokenizer, QUESTION, 0), tokenizer)
    denoiser = ScriptedDenoiser(len(ids), mask_at_0)
    embeds = denoiser.embed_tokens(torch.tensor(ids))[None]
    return Pipeline(ScriptedRunner(denoiser, released)), SimpleNamespace(denoiser=denoiser), embeds


@pytest.mark.parametrize("gen_length", [8, 16])
def test_stop_rule_fills_the_positions_before_the_stop_and_ends_the_turn(released, tokenizer, gen_length):
    pipe, model, embeds = scripted(released, tokenizer)
    settings = dict(gen_length=gen_length, block_length=8, steps=gen_length)
    expected, nfe = official.generate_with_embeds(model, tokenizer, embeds, **settings)
    assert expected == [A] * STOP_AT and nfe == 1 + STOP_AT  # stop first, then 0..3; the second block never runs
    result = pipe.generate(QUESTION, config=GenerationConfig(**settings))
    assert result.token_ids == expected and result.stats["nfe"] == nfe


def test_mask_token_is_banned_a_deliberate_deviation(released, tokenizer):
    pipe, model, embeds = scripted(released, tokenizer, mask_at_0=True)
    settings = dict(gen_length=8, block_length=8, steps=8)
    stuck, _ = official.generate_with_embeds(model, tokenizer, embeds, **settings)
    assert stuck == [released_layout.MASK] * 8  # the official loop commits the mask at 0 on every step
    ours = pipe.generate(QUESTION, config=GenerationConfig(**settings)).token_ids
    banned = (126081, 126080, 126346, 126347, released_layout.MASK)
    assert ours == official.generate_with_embeds(model, tokenizer, embeds, banned=banned, **settings)[0] == [A] * 8


class ConfidentEndDenoiser(ScriptedDenoiser):
    """An answer ending in a run of <|eot_id|> that float32 cannot tell from certain, as a trained model's
    end-of-text padding: A at 0..STOP_AT-1 (logit 12), <|eot_id|> at STOP_AT..STOP_AT+3 with 1 - p of ~e^-20
    to e^-23 (float32 rounds p to 1.0 below ~3e-8), the surest at STOP_AT + 1. Once <|eot_id|> is committed
    there, position STOP_AT reads B (logit 16) instead."""

    def forward(self, inputs_embeds, position_ids, attention_mask, logits_index, *cache):
        answer = inputs_embeds[:, self.prompt_length:, 0].round().long()
        logits = torch.zeros(*inputs_embeds.shape[:2], 126349)
        certain = math.log(126349) + 20.0
        at = self.prompt_length
        for b, row in enumerate(answer.tolist()):
            logits[b, at:at + STOP_AT, A] = 12.0
            for offset, extra in enumerate((0.0, 3.0, 1.0, 2.0)):
                logits[b, at + STOP_AT + offset, released_layout.EOT] = certain + extra
            if row[STOP_AT + 1] == released_layout.EOT:
                logits[b, at + STOP_AT, released_layout.EOT] = 0.0
                logits[b, at + STOP_AT, B] = 16.0
        return torch.gather(logits, 1, logits_index[..., None].expand(-1, -1, logits.shape[-1])), (), ()


def test_certain_end_of_text_is_ordered_as_the_official_float64_softmax(released, tokenizer):
    ids = official.tokenizer_image_token(official.prompt_question(tokenizer, QUESTION, 0), tokenizer)
    denoiser = ConfidentEndDenoiser(len(ids))
    embeds = denoiser.embed_tokens(torch.tensor(ids))[None]
    model, settings = SimpleNamespace(denoiser=denoiser), dict(gen_length=8, block_length=8, steps=8)
    expected, nfe = official.generate_with_embeds(model, tokenizer, embeds, **settings)
    assert expected == [A] * STOP_AT + [B] and nfe == 6  # <|eot_id|> first at STOP_AT + 1, then B before it
    tied, _ = official.generate_with_embeds(model, tokenizer, embeds, confidence_dtype=torch.float32, **settings)
    assert tied == [A] * STOP_AT  # float32 ties the run and commits its first position first
    result = Pipeline(ScriptedRunner(denoiser, released)).generate(QUESTION, config=GenerationConfig(**settings))
    assert result.token_ids == expected and result.stats["nfe"] == nfe


def test_a_block_ends_when_its_masks_run_out(released, official_model):
    # 8 steps for 4 masks per block: the official loop leaves each block after its 4th step, so the answer and the
    # denoiser calls are those of steps = gen_length, which GenerationConfig makes the most it takes.
    expected, nfe = official.generate(official_model, QUESTION, gen_length=8, block_length=4, steps=16)
    result = Pipeline.load(released, "torch").generate(QUESTION, config=GenerationConfig(gen_length=8, block_length=4))
    assert nfe == 8 and result.stats["nfe"] == nfe and result.token_ids == expected
    with pytest.raises(ValueError, match="use steps <= gen_length"):
        GenerationConfig(gen_length=8, block_length=4, steps=16)


# ---- 4 and 5. image modes, several images ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
@pytest.mark.parametrize("size", [(100, 80), (300, 120), (50, 70)])
def test_pixels_of_one_image_in_its_own_mode(official_model, mode, size):
    cfg = official_model[1].config
    image = picture(*size, mode=mode)
    expected = official.process_images([image], official.SigLipImageProcessor(cfg.vision.image_size), cfg)[0]
    ours = preprocess(image, cfg).pixel_values
    assert torch.equal(ours, expected)
    if mode != "RGB":  # converting to RGB first is visibly different
        assert (preprocess(image.convert("RGB"), cfg).pixel_values - expected).abs().max() > 0.5


def test_several_images_are_padded_squares_without_tiles(official_model):
    tokenizer, model = official_model
    cfg = model.config
    images = [picture(100, 80, seed=1), picture(50, 120, seed=2, mode="RGBA"), picture(64, 64, seed=3)]
    expected = official.process_images(images, official.SigLipImageProcessor(cfg.vision.image_size), cfg)
    ours = torch.cat([preprocess(image, cfg, "pad").pixel_values for image in images])
    assert torch.equal(ours, expected)
    features = official.image_features(model, expected, [im.size for im in images], cfg)
    assert [len(f) for f in features] == [cfg.vision.tokens_per_tile] * 3  # no grid, no image_newline


# ---- 6. config keys ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, message", [
    ({"mm_patch_merge_type": "flat"}, "unsupported mm_patch_merge_type 'flat'"),
    ({"mm_patch_merge_type": None}, "unsupported mm_patch_merge_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling .* is not implemented"),
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end True is not supported"),
    ({"mm_use_im_patch_token": True}, "mm_use_im_patch_token True is not supported"),
    ({"tokenizer_model_max_length": 0}, "tokenizer_model_max_length should be a positive integer"),
])
def test_config_keys_are_implemented_or_refused(edit, message):
    raw = {**LladaVConfig().to_dict(), **edit}
    with pytest.raises(CheckpointError, match=message):
        LladaVConfig.from_dict(raw)


def test_missing_merge_type_is_the_official_flat_default():
    raw = LladaVConfig().to_dict()
    del raw["mm_patch_merge_type"]
    with pytest.raises(CheckpointError, match="uses 'flat' when the key is absent"):
        LladaVConfig.from_dict(raw)


def test_prompt_longer_than_tokenizer_model_max_length_is_refused(tmp_path, released):
    folder = shutil.copytree(released, tmp_path / "checkpoint")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "tokenizer_model_max_length": 40}))
    pipe = Pipeline.load(folder, "torch")
    with pytest.raises(ValueError, match="more than the model's tokenizer_model_max_length 40"):
        pipe.generate(QUESTION, config=GenerationConfig(gen_length=8, block_length=8))


# ---- whole generations ------------------------------------------------------------------------------------------

CASES = {"text": [], "image": [picture(100, 80)], "images": [picture(100, 80, seed=1), picture(70, 140, seed=2)],
         "rgba": [picture(120, 90, seed=4, mode="RGBA")]}
# The official demo's decoding (one block, one token per step) at 16 tokens, and the same in two blocks.
CONFIGS = {"official": GenerationConfig.official(gen_length=16),
           "two blocks": GenerationConfig(gen_length=16, block_length=8, steps=16)}


@pytest.fixture(scope="module")
def official_tokens(official_model):
    return {(name, config): official.generate(official_model, QUESTION, images, gen_length=cfg.gen_length,
                                              block_length=cfg.block_length, steps=cfg.steps)
            for name, images in CASES.items() for config, cfg in CONFIGS.items()}


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def pipeline(request, released, tmp_path_factory):
    if request.param == "torch":
        return Pipeline.load(released, "torch")
    engines = build_engines(released, tmp_path_factory.mktemp("released-engines") / "fp32", "fp32", progress=False)
    return Pipeline.load(engines, "onnxruntime")


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", list(CASES))
def test_same_tokens_as_the_official_code(pipeline, official_tokens, case, config):
    expected, nfe = official_tokens[case, config]
    result = pipeline.generate(QUESTION, image=CASES[case] or None, config=CONFIGS[config])
    assert result.token_ids == expected and result.stats["nfe"] == nfe
    assert all(token < 126349 for token in expected)  # never a padding row, though those win without the cut
