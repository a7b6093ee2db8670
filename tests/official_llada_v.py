"""An independent transcription of the official LLaDA-V inference path (ML-GSAI/LLaDA-V at commit 2252769),
the oracle of tests/test_fidelity.py. CI cannot download the official code, so its rules live here, written
from its sources (file:line below, under train/ unless named) and sharing nothing with the project but the
transformer's modules (whose forward the project validates separately) and the checkpoint's tensor names.

Each function keeps the official structure, including where the project deliberately differs
(docs/fidelity.md): here a predicted mask token is committed and stays masked, for instance. Images are
resized as under the official environment's Pillow 10.3.0, whatever Pillow runs the tests (pillow_10_3).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from functools import partial, reduce
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from transformers import PreTrainedTokenizerFast
from transformers.image_transforms import normalize, rescale, resize, to_channel_dimension_format
from transformers.image_utils import ChannelDimension, PILImageResampling, to_numpy_array

from llada_v import LladaV, LladaVConfig
from llada_v.image_processing import bicubic
from llada_v.weights import INDEX_FILE, SINGLE_FILE, to_module_key

IMAGE_TOKEN_INDEX = -200  # llava/constants.py
DEFAULT_IMAGE_TOKEN = "<image>"
SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content that the "
          "user provides, and assist the user with a variety of tasks using natural language.")  # conversation.py:492
MASK_ID = 126336
STOP = "<|eot_id|>"  # conv.sep of llava_llada, the evaluation's stopping criterion


# ---- loading (llava/model/builder.py) ----------------------------------------------------------------------

def load_pretrained_model(folder: Path):
    """The model at the checkpoint's own vocabulary size, then resized to len(tokenizer) (builder.py:303)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    cfg = LladaVConfig.from_file(folder / "config.json")
    model = LladaV(cfg)
    files = [folder / SINGLE_FILE] if (folder / SINGLE_FILE).is_file() else \
        sorted(folder.glob("model-*-of-*.safetensors"))
    assert files and ((folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file())
    state = {}
    for path in files:
        with safe_open(path, "pt") as f:
            for key in f.keys():
                name = to_module_key(key, cfg)
                if name is not None:
                    state[name] = f.get_tensor(key).float()
    model.load_state_dict(state, strict=True)
    rows = len(tokenizer)  # resize_token_embeddings(len(tokenizer)): both tables keep their first rows
    den = model.denoiser
    den.embed_tokens = torch.nn.Embedding.from_pretrained(den.embed_tokens.weight[:rows].clone(), freeze=True)
    head = torch.nn.Linear(den.lm_head.in_features, rows, bias=False)
    head.weight.data = den.lm_head.weight[:rows].clone()
    den.lm_head = head
    return tokenizer, model.eval()


# ---- the prompt (conversation.py:101-114, lmms_eval/models/llava_onevision_llada.py:511-545) ----------------

def prompt_question(tokenizer, context: str, n_images: int) -> str:
    if n_images and DEFAULT_IMAGE_TOKEN not in context:
        context = " ".join([DEFAULT_IMAGE_TOKEN] * n_images) + "\n" + context
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": context}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):  # mm_utils.py:342-355
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


# ---- images (mm_utils.py, multimodal_encoder/siglip_encoder.py) ---------------------------------------------

def convert_to_rgb(image):
    """transformers.image_transforms.convert_to_rgb as the official environment's transformers (4.43, the released
    config's transformers_version) has it: PIL's own conversion, which drops alpha. transformers 5 composites
    transparency onto white instead."""
    return image.convert("RGB") if isinstance(image, Image.Image) and image.mode != "RGB" else image


class SigLipImageProcessor:  # siglip_encoder.py:34-66, at the checkpoint's tile size
    def __init__(self, size: int):
        self.image_mean = self.image_std = (0.5, 0.5, 0.5)
        self.size = (size, size)
        self.crop_size = {"height": size, "width": size}

    def preprocess(self, images):
        images = [images] if isinstance(images, Image.Image) else images
        transforms = [convert_to_rgb, to_numpy_array,
                      partial(resize, size=self.size, resample=PILImageResampling.BICUBIC,
                              data_format=ChannelDimension.FIRST),
                      partial(rescale, scale=1 / 255, data_format=ChannelDimension.FIRST),
                      partial(normalize, mean=self.image_mean, std=self.image_std, data_format=ChannelDimension.FIRST),
                      partial(to_channel_dimension_format, channel_dim=ChannelDimension.FIRST,
                              input_channel_dim=ChannelDimension.FIRST)]
        return torch.from_numpy(reduce(lambda x, f: [*map(f, x)], transforms, images)[0])


def select_best_resolution(original_size, possible_resolutions):  # mm_utils.py:120-150
    original_width, original_height = original_size
    best_fit, max_effective_resolution, min_wasted_resolution = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
                effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution):
            max_effective_resolution, min_wasted_resolution = effective_resolution, wasted_resolution
            best_fit = (width, height)
    return best_fit


def resize_and_pad_image(image, target_resolution):  # mm_utils.py:153-190
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height, new_width = target_height, min(math.ceil(original_width * scale_h), target_width)
    resized_image = image.resize((new_width, new_height))
    new_image = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    new_image.paste(resized_image, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return new_image


def process_anyres_image(image, processor, grid_pinpoints):  # mm_utils.py:244-298
    best_resolution = select_best_resolution(image.size, grid_pinpoints)
    image_padded = resize_and_pad_image(image, best_resolution)
    patch = processor.crop_size["height"]
    width, height = image_padded.size
    patches = [image_padded.crop((j, i, j + patch, i + patch))
               for i in range(0, height, patch) for j in range(0, width, patch)]
    image_original_resize = image.resize((min(processor.size), min(processor.size)))
    return torch.stack([processor.preprocess(p) for p in [image_original_resize] + patches])


def expand2square(pil_img, background_color):  # mm_utils.py:301-313
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


@contextmanager
def pillow_10_3():
    """Image.resize with Pillow's default or bicubic filter as Pillow 10.3.0 computes it. Later Pillows order the
    two passes of some resizes otherwise (docs/fidelity.md); llada_v's `bicubic` is the 10.3 order, checked
    against pixels stored from Pillow 10.3.0 itself (tests/test_pillow_pixels.py)."""
    original = Image.Image.resize

    def resize_as_10_3(self, size, resample=None, box=None, reducing_gap=None):
        one_pass = self.width == size[0] or self.height == size[1]  # the same in every Pillow
        if one_pass or self.mode in ("1", "P") or resample not in (None, Image.Resampling.BICUBIC) or box \
                or reducing_gap:
            return original(self, size, resample, box, reducing_gap)
        return bicubic(self, tuple(size))

    Image.Image.resize = resize_as_10_3
    try:
        yield
    finally:
        Image.Image.resize = original


@pillow_10_3()
def process_images(images, processor, cfg: LladaVConfig):
    """mm_utils.py:315-339; the evaluation sets image_aspect_ratio "pad" for several images (:467-468)."""
    if len(images) > 1:
        background = tuple(int(x * 255) for x in processor.image_mean)
        return torch.stack([processor.preprocess(expand2square(im, background)) for im in images])  # ndim 4
    return [process_anyres_image(images[0], processor, [list(p) for p in cfg.image_grid_pinpoints])]


# ---- splicing (llava/model/llava_arch.py:127-160, 354-600) --------------------------------------------------

def unpad_image(tensor, original_size):
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return tensor[:, padding:current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding:current_width - padding]


def encode_images(model, pixels):
    return model.projector(model.vision_tower(pixels))


def image_features(model, images, image_sizes, cfg: LladaVConfig):
    if not isinstance(images, list):  # several padded views, ndim 4: encode_images alone (:516)
        return list(encode_images(model, images))
    features = []
    for image, size in zip(images, image_sizes):  # anyres, spatial_unpad (:449-505)
        image_feature = encode_images(model, image)
        base_image_feature, image_feature = image_feature[0], image_feature[1:]
        height = width = cfg.vision.patches_per_side
        tile = cfg.vision.image_size
        best_w, best_h = select_best_resolution(size, [list(p) for p in cfg.image_grid_pinpoints])
        num_patch_width, num_patch_height = best_w // tile, best_h // tile
        max_num_patches = int(re.match(r"anyres_max_(\d+)", f"anyres_max_{cfg.max_tiles_before_shrink}").group(1))
        image_feature = image_feature.view(num_patch_height, num_patch_width, height, width, -1)
        unit = image_feature.shape[2]
        image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
        image_feature = unpad_image(image_feature, size)
        c, h, w = image_feature.shape
        times = math.sqrt(h * w / (max_num_patches * unit**2))
        if times > 1.1:
            image_feature = F.interpolate(image_feature[None], [int(h // times), int(w // times)], mode="bilinear")[0]
        newline = model.image_newline[:, None, None].expand(*image_feature.shape[:-1], 1)
        image_feature = torch.cat((image_feature, newline), dim=-1).flatten(1, 2).transpose(0, 1)
        features.append(torch.cat((base_image_feature, image_feature), dim=0))
    return features


def prepare_inputs_embeds(model, input_ids: list[int], features: list[torch.Tensor]):
    ids = torch.tensor(input_ids)
    image_token_indices = [-1] + torch.where(ids == IMAGE_TOKEN_INDEX)[0].tolist() + [ids.shape[0]]
    pieces = [ids[image_token_indices[i] + 1:image_token_indices[i + 1]] for i in range(len(image_token_indices) - 1)]
    embeds = model.denoiser.embed_tokens(torch.cat(pieces)).split([len(p) for p in pieces])
    out = []
    for i, piece in enumerate(embeds):
        out.append(piece)
        if i < len(features):
            out.append(features[i])
    return torch.cat(out)[:model.config.tokenizer_model_max_length][None]  # truncated, silently (:595-598)


# ---- decoding (llava/model/language_model/modeling_llada.py:1193-1216, 1299-1497) --------------------------

def get_num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    num_transfer_tokens = base.expand(-1, steps).clone()
    if remainder.sum() > 0:
        num_transfer_tokens[torch.arange(steps).unsqueeze(0) < remainder] += 1
    return num_transfer_tokens.to(torch.int64)


def forward_logits(model, x_embeds):
    """self.lm_head(self.model(inputs_embeds=x_embeds)[0]): every position, no attention mask."""
    length = x_embeds.shape[1]
    positions = torch.arange(length)[None]
    return model.denoiser(x_embeds, positions, torch.ones_like(positions), positions)[0].float()


@torch.no_grad()
def generate_with_embeds(model, tokenizer, inputs_embeds, steps=128, gen_length=128, block_length=128,
                         stopping_criteria=(STOP,), mask_id=MASK_ID, banned=(126081, 126080, 126346, 126347),
                         confidence_dtype=torch.float64) -> tuple[list[int], int]:
    """Temperature 0, low-confidence remasking, no cfg, no suffix. Returns the answer ids (up to the stop)
    and the number of denoiser calls. `banned`: the ids kept from masked positions (official: these four);
    `confidence_dtype`: the softmax's (official: float64; float32 shows what ranking by float32 would do)."""
    prompt_length = inputs_embeds.shape[1]
    total_length = prompt_length + gen_length
    masked_embed = model.denoiser.embed_tokens(torch.tensor([mask_id]))
    x_embeds = masked_embed.repeat(1, total_length, 1)
    x_embeds[:, :prompt_length] = inputs_embeds.clone()
    x = torch.full((1, total_length), mask_id, dtype=torch.long)
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    stop_position, found_stop_seq, nfe = prompt_length + gen_length, False, 0
    stop_tokens = [tokenizer.encode(s, add_special_tokens=False) for s in stopping_criteria]
    for num_block in range(num_blocks):
        block_start = prompt_length + num_block * block_length
        block_end = prompt_length + (num_block + 1) * block_length
        if found_stop_seq and stop_position <= block_start:
            break
        block_mask_index = torch.all(torch.abs(x_embeds[:, block_start:block_end] - masked_embed) < 1e-5, dim=2)
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = torch.all(torch.abs(x_embeds - masked_embed) < 1e-5, dim=2)
            if found_stop_seq and not mask_index[0, prompt_length:stop_position].any():
                break
            if not mask_index[0, block_start:block_end].any():
                break
            logits = forward_logits(model, x_embeds)
            nfe += 1
            for token_id in banned:
                logits[:, :, token_id] = torch.where(mask_index, -float("inf"), logits[:, :, token_id])
            x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits.to(confidence_dtype), dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            if found_stop_seq:
                x0_p[:, stop_position:] = -np.inf
            else:
                x0_p[:, block_end:] = -np.inf
            x0_embeds = model.denoiser.embed_tokens(x0)
            x0_embeds = torch.where(mask_index.unsqueeze(-1).expand_as(x_embeds), x0_embeds, x_embeds)
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            _, select_index = torch.topk(confidence[0], k=int(num_transfer_tokens[0, i]))
            transfer_index[0, select_index] = True
            x_embeds[transfer_index] = x0_embeds[transfer_index]
            x[transfer_index] = x0[transfer_index]
            generated_part = x[0, prompt_length:prompt_length + gen_length]
            for stop_seq in stop_tokens:
                for start_idx in range(generated_part.size(0) - len(stop_seq) + 1):
                    if torch.all(generated_part[start_idx:start_idx + len(stop_seq)] == torch.tensor(stop_seq)):
                        current_position = prompt_length + start_idx
                        if not found_stop_seq or current_position < stop_position:
                            stop_position, found_stop_seq = current_position, True
                        break
                if found_stop_seq:
                    break
    end = stop_position if found_stop_seq else prompt_length + gen_length
    return x[0, prompt_length:end].tolist(), nfe


def generate(loaded, question: str, images: list[Image.Image] = (), **settings) -> tuple[list[int], int]:
    """What the official evaluation generates for one question about `images` (PIL, as its datasets give
    them), with a model from load_pretrained_model."""
    tokenizer, model = loaded
    input_ids = tokenizer_image_token(prompt_question(tokenizer, question, len(images)), tokenizer)
    with torch.no_grad():
        features = []
        if images:
            processor = SigLipImageProcessor(model.config.vision.image_size)
            features = image_features(model, process_images(list(images), processor, model.config),
                                      [im.size for im in images], model.config)
        inputs_embeds = prepare_inputs_embeds(model, input_ids, features)
    return generate_with_embeds(model, tokenizer, inputs_embeds, **settings)
