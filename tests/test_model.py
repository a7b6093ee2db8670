"""The PyTorch model and its checkpoint I/O: real layout, strict loading, clear errors."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import llada_v
from llada_v import CheckpointError, LladaV, LladaVConfig, load_model, save_model
from llada_v.image_processing import ImageTiles, merge_tile_embeddings, preprocess, select_best_resolution
from llada_v.weights import to_checkpoint_key


def test_real_index_names_are_exactly_the_language_model(reference_dir):
    cfg = LladaVConfig.from_file(reference_dir / "config.json")
    assert cfg.vision is None and cfg.language.num_hidden_layers == 32 and cfg.language.vocab_size == 126464
    with torch.device("meta"):
        model = LladaV(cfg)
    params = {to_checkpoint_key(name, cfg): p for name, p in model.named_parameters()}
    index = json.loads((reference_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(params)
    bf16_bytes = sum(p.numel() * 2 for p in params.values())
    assert bf16_bytes == index["metadata"]["total_size"]


def test_real_multimodal_config_defaults_are_llada_v_sizes():
    cfg = LladaVConfig()
    assert (cfg.vision.hidden_size, cfg.vision.num_hidden_layers, cfg.vision.tokens_per_tile) == (1152, 26, 729)
    assert LladaVConfig.from_dict(cfg.to_dict()) == cfg
    assert LladaVConfig.from_dict({**cfg.to_dict(), "image_grid_pinpoints": "(1x1),...,(6x6)"}) == cfg


@pytest.mark.parametrize("shard_bytes", [None, 2_000_000])
def test_save_load_roundtrip(tmp_path, shipped_model, shipped_model_dir, shard_bytes):
    save_model(shipped_model, tmp_path, tokenizer_folder=shipped_model_dir, max_shard_bytes=shard_bytes)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard_bytes is not None)
    loaded = load_model(tmp_path)
    for (name, a), (_, b) in zip(shipped_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert llada_v.load_tokenizer(tmp_path).get_vocab() == llada_v.load_tokenizer(shipped_model_dir).get_vocab()


def test_special_tokens_come_from_the_tokenizer(shipped_model_dir):
    tokenizer = llada_v.load_tokenizer(shipped_model_dir)
    special = llada_v.SpecialTokens.from_tokenizer(tokenizer)
    assert tokenizer.convert_ids_to_tokens(special.mask) == "<|mdm_mask|>"
    assert tokenizer.convert_ids_to_tokens(special.eot) == "<|eot_id|>"
    ids = llada_v.conversation_ids(tokenizer, [{"role": "user", "content": "<image>\nWhat colour is the circle?"}])
    assert ids.count(llada_v.IMAGE_TOKEN_INDEX) == 1 and ids[0] == special.bos
    assert ids[-2:] == tokenizer("<|end_header_id|>\n\n", add_special_tokens=False)["input_ids"][-2:]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_and_files(tmp_path, shipped_model_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)
    folder = _copy(shipped_model_dir, tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(folder)


@pytest.mark.parametrize("config_text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"hidden_size": "big"}), "hidden_size should be int"),
    (json.dumps({"hidden_size": -4}), "must be positive"),
    (json.dumps({"num_attention_heads": 7, "hidden_size": 64}), "not divisible"),
])
def test_malformed_config(tmp_path, config_text, message):
    (tmp_path / "config.json").write_text(config_text)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path)


def _rewrite_weights(folder, edit):
    from safetensors.torch import load_file
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("lm_head.weight"), r"missing tensors \['lm_head.weight'\]"),
    (lambda t: t.update({"model.extra.weight": torch.zeros(2)}), r"unexpected tensors \['model.extra.weight'\]"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(3)}), r"model.norm.weight .* has shape \(3,\)"),
])
def test_wrong_tensors(tmp_path, shipped_model_dir, edit, message):
    folder = _copy(shipped_model_dir, tmp_path / "ckpt")
    _rewrite_weights(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_dropped_tensors_are_accepted(tmp_path, shipped_model_dir):
    """The released checkpoint keeps SigLIP's post_layernorm; LLaDA-V never runs it."""
    folder = _copy(shipped_model_dir, tmp_path / "ckpt")
    prefix = "model.vision_tower.vision_tower.vision_model."
    _rewrite_weights(folder, lambda t: t.update({prefix + "post_layernorm.weight": torch.ones(4)}))
    load_model(folder)


def test_corrupt_and_missing_shards(tmp_path, shipped_model, shipped_model_dir):
    folder = _copy(shipped_model_dir, tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(folder)
    sharded = tmp_path / "sharded"
    save_model(shipped_model, sharded, max_shard_bytes=2_000_000)
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lacks shards"):
        load_model(sharded)


def test_cached_pass_equals_full_pass(shipped_model):
    """Attending to cached K/V of the other positions gives the full forward's logits."""
    denoiser, length, start = shipped_model.denoiser, 24, 16
    embeds = torch.randn(2, length, denoiser.config.hidden_size)
    positions = torch.arange(length).expand(2, -1)
    mask = torch.ones(2, length, dtype=torch.long)
    index = torch.arange(start, length).expand(2, -1)
    full, keys, values = denoiser(embeds, positions, mask, index)
    assert len(keys) == len(values) == len(denoiser.layers)
    assert keys[0].shape == (2, denoiser.config.num_attention_heads, length, denoiser.config.head_dim)
    # prefix style: the cache holds the positions before `start`, given per layer
    prefix, fresh_keys, _ = denoiser(embeds[:, start:], positions[:, start:], mask[:, start:], index - start,
                                     [k[..., :start, :] for k in keys], [v[..., :start, :] for v in values],
                                     mask[:, :start])
    # dual style: the cache holds every position, the queried ones hidden, given stacked
    hidden = mask.clone()
    hidden[:, start:] = 0
    dual, _, _ = denoiser(embeds[:, start:], positions[:, start:], mask[:, start:], index - start,
                          torch.stack(keys), torch.stack(values), hidden)
    torch.testing.assert_close(prefix, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dual, full, atol=1e-5, rtol=1e-5)
    for fresh, whole in zip(fresh_keys, keys):
        torch.testing.assert_close(fresh, whole[..., start:, :], atol=1e-5, rtol=1e-5)


def test_fused_full_pass_equals_the_explicit_attention(shipped_model):
    """The eager full pass (PyTorch's fused attention) against the explicit fp32-softmax form the graphs use."""
    denoiser, length = shipped_model.denoiser, 40
    embeds = torch.randn(2, length, denoiser.config.hidden_size)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :7] = 0  # left padding
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    index = torch.arange(length).expand(2, -1)
    fused, fused_keys, fused_values = denoiser(embeds, positions, mask, index)
    denoiser.set_attention("explicit")
    try:
        explicit, keys, values = denoiser(embeds, positions, mask, index)
    finally:
        denoiser.set_attention("sdpa")
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_keys + fused_values, keys + values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_real_positions(shipped_model):
    denoiser = shipped_model.denoiser
    embeds = torch.randn(1, 10, denoiser.config.hidden_size)
    alone, _, _ = denoiser(embeds, torch.arange(10)[None], torch.ones(1, 10, dtype=torch.long), torch.tensor([[9]]))
    padded = torch.cat((torch.randn(1, 3, embeds.shape[-1]), embeds), dim=1)
    positions = torch.tensor([[0, 0, 0, *range(10)]])
    mask = torch.tensor([[0, 0, 0, *[1] * 10]])
    batched, _, _ = denoiser(padded, positions, mask, torch.tensor([[12]]))
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_fp16_model_keeps_statistics_in_fp32(shipped_model):
    """A half-precision copy stays close to fp32: norms, softmax and RoPE run in fp32 inside it."""
    half = LladaV(shipped_model.config)
    half.load_state_dict(shipped_model.state_dict())
    half = half.half()
    length = 40
    embeds = torch.randn(1, length, shipped_model.config.language.hidden_size)
    args = (torch.arange(1000, 1000 + length)[None], torch.ones(1, length, dtype=torch.long), torch.arange(length)[None])
    ref, _, _ = shipped_model.denoiser(embeds, *args)
    out, keys, _ = half.denoiser(embeds.half(), *args)
    assert keys[0].dtype == torch.float16 and out.dtype == torch.float32
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_best_resolution_and_token_count_of_a_1024x768_image():
    """DESIGN §2: a 1024x768 image gives about 3.6k image tokens with the real sizes."""
    cfg = LladaVConfig()
    assert select_best_resolution((1024, 768), cfg.image_grid_pinpoints) == (1152, 768)
    tiles = ImageTiles(torch.empty(0), image_size=(1024, 768), grid=(3, 2))
    merged = merge_tile_embeddings(torch.randn(7, 729, 4), tiles, torch.full((4,), 7.0), cfg)
    assert 3500 < merged.shape[0] < 3700
    newline_rows = (merged[729:] == 7.0).all(-1).sum().item()
    assert newline_rows == 46 and (merged.shape[0] - 729) % newline_rows == 0  # 54 rows shrunk by 1.16


def test_preprocess_tiles_and_merge(shipped_model):
    # 64 px tiles of 8 px patches: an 8 x 8 map per tile (fixed here, whatever the shipped model uses)
    cfg = dataclasses.replace(shipped_model.config, vision=dataclasses.replace(shipped_model.config.vision, patch_size=8))
    image = np.random.randint(0, 256, (60, 120, 3), dtype=np.uint8)
    tiles = preprocess(image, cfg)
    cols, rows = tiles.grid
    assert tiles.pixel_values.shape == (1 + cols * rows, 3, 64, 64) and (cols, rows) == (2, 1)
    assert -1.0 <= tiles.pixel_values.min() and tiles.pixel_values.max() <= 1.0
    newline = torch.arange(cfg.language.hidden_size, dtype=torch.float32)
    merged = merge_tile_embeddings(torch.randn(3, 64, cfg.language.hidden_size), tiles, newline, cfg)
    side = cfg.vision.patches_per_side
    rows_out = (merged[side * side:] == newline).all(-1).sum().item()
    # the 2x1 grid map (8 x 16) already has the image's 2:1 aspect; a newline ends each of its rows
    assert rows_out == 8 and merged.shape[0] == side * side + 8 * (16 + 1)
    wide = merge_tile_embeddings(torch.randn(3, 64, 4), ImageTiles(torch.empty(0), (120, 40), (2, 1)), torch.zeros(4), cfg)
    assert wide.shape[0] == side * side + 6 * 17  # 120:40 unpads the 8-row map to int(40 * 16 / 120) = 5 -> 8 - 2*1 rows


@pytest.mark.parametrize("bad, message", [
    ("missing.png", "does not exist"),
    (np.zeros((4, 4), dtype=np.uint8), r"shape \[H, W, 3\]"),
    (np.zeros((4, 4, 3), dtype=np.float32), "uint8"),
    (42, "must be a path"),
])
def test_unusable_images(tmp_path, bad, message, shipped_model):
    if isinstance(bad, str):
        bad = tmp_path / bad
    with pytest.raises(ValueError, match=message):
        preprocess(bad, shipped_model.config)


def test_corrupt_image_file(tmp_path, shipped_model):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="cannot read image"):
        preprocess(path, shipped_model.config)


def test_text_only_model_refuses_images(reference_dir):
    cfg = LladaVConfig.from_file(reference_dir / "config.json")
    tiny_text = dataclasses.replace(cfg, language=dataclasses.replace(cfg.language, hidden_size=32, intermediate_size=64,
                                                                       num_hidden_layers=1, num_attention_heads=2,
                                                                       num_key_value_heads=2, vocab_size=50))
    with pytest.raises(ValueError, match="text-only"):
        LladaV(tiny_text).encode_tiles(torch.zeros(1, 3, 8, 8))


# ---- hardening: malformed configs and checkpoints, images the model must see as a viewer does ----------

@pytest.mark.parametrize("edit, message", [
    ({"image_grid_pinpoints": [[64, 64, 64]]}, "list of \\[width, height\\] integer pairs"),
    ({"image_grid_pinpoints": []}, "non-empty list of positive multiples"),
    ({"image_grid_pinpoints": [[0, 0]]}, "non-empty list of positive multiples"),
    ({"rms_norm_eps": float("inf")}, "rms_norm_eps must be positive and finite"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be positive and finite"),
])
def test_malformed_multimodal_config(tmp_path, shipped_model_dir, edit, message):
    folder = _copy(shipped_model_dir, tmp_path / "ckpt")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **edit}))
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_absurd_layer_count_fails_before_building_anything(tmp_path, shipped_model_dir):
    import time

    folder = _copy(shipped_model_dir, tmp_path / "ckpt")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 3_000_000}))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="num_hidden_layers 3000000, the checkpoint holds 4 language layers"):
        load_model(folder)
    assert time.perf_counter() - start < 30  # building 3M layers, even on the meta device, would take hours


@pytest.mark.parametrize("weight_map, message", [
    ([], "weight_map must map tensor names to shard file names"),
    ({"lm_head.weight": 3}, "weight_map must map tensor names to shard file names"),
    ({"lm_head.weight": "../outside.safetensors"}, "names '../outside.safetensors', which is not a file inside"),
    ({"lm_head.weight": "/tmp/outside.safetensors"}, "which is not a file inside"),
    ({"lm_head.weight": "link.safetensors"}, "names 'link.safetensors', which is not a file inside"),
])
def test_index_must_name_shards_inside_the_folder(tmp_path, shipped_model, weight_map, message):
    folder = tmp_path / "sharded"
    save_model(shipped_model, folder, max_shard_bytes=2_000_000)
    outside = tmp_path / "outside.safetensors"
    shutil.copy2(next(folder.glob("model-00001-*.safetensors")), outside)
    (folder / "link.safetensors").symlink_to(outside)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def _png(path, image):
    image.save(path)
    return path


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path, shipped_model):
    cfg = shipped_model.config
    levels = np.random.default_rng(0).integers(0, 256, (70, 90), dtype=np.uint8)
    eight = _png(tmp_path / "eight.png", Image.fromarray(levels, "L"))
    sixteen = _png(tmp_path / "sixteen.png", Image.fromarray(levels.astype(np.uint16) * 257))
    assert Image.open(sixteen).mode in ("I;16", "I")
    expected = preprocess(eight, cfg).pixel_values
    assert torch.equal(preprocess(sixteen, cfg).pixel_values, expected)
    assert torch.equal(preprocess(Image.fromarray(levels.astype(np.uint16) * 257), cfg).pixel_values, expected)


def test_exif_orientation_is_applied(tmp_path, shipped_model):
    upright = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 100, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    upright_jpeg = np.asarray(Image.open(tmp_path / "rotated.jpg").transpose(Image.Transpose.ROTATE_270))  # no EXIF
    ours = preprocess(tmp_path / "rotated.jpg", shipped_model.config)
    assert ours.image_size == (100, 60)
    assert torch.equal(ours.pixel_values, preprocess(upright_jpeg, shipped_model.config).pixel_values)


def test_images_over_the_pixel_budget_are_refused_before_decoding(tmp_path, shipped_model, monkeypatch):
    from llada_v import image_processing

    path = _png(tmp_path / "big.png", Image.new("RGB", (40, 30)))
    monkeypatch.setattr(image_processing, "MAX_IMAGE_PIXELS", 1000)
    for image in (path, path.read_bytes(), Image.new("RGB", (40, 30)), np.zeros((30, 40, 3), np.uint8)):
        with pytest.raises(ValueError, match="40x30 = 1200 pixels, more than the 1000 allowed"):
            preprocess(image, shipped_model.config)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own bomb check: twice this raises
    with pytest.raises(ValueError, match="too large to decode"):
        preprocess(path, shipped_model.config)


def test_empty_images_and_encoded_bytes(tmp_path, shipped_model):
    cfg = shipped_model.config
    with pytest.raises(ValueError, match="has no pixels \\(0x0\\)"):
        preprocess(Image.new("RGB", (0, 0)), cfg)
    path = _png(tmp_path / "a.png", Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 70, 3), np.uint8)))
    assert torch.equal(preprocess(path.read_bytes(), cfg).pixel_values, preprocess(path, cfg).pixel_values)
    with pytest.raises(ValueError, match="cannot read the 5 bytes given as an image"):
        preprocess(b"\x89PNG!", cfg)


def test_streaming_model_computes_what_the_loaded_one_does_one_layer_at_a_time(shipped_model_dir):
    from llada_v.weights import load_model_streaming

    loaded = llada_v.load_model(shipped_model_dir)
    streamed = load_model_streaming(shipped_model_dir)
    streamed_modules = (streamed.denoiser.layers, streamed.denoiser.lm_head, streamed.denoiser.embed_tokens)
    assert all(p.is_meta for module in streamed_modules for p in module.parameters())
    assert not any(p.is_meta for p in streamed.denoiser.norm.parameters())
    ids = torch.tensor([[5, 3, 5], [0, 3, loaded.config.language.vocab_size - 1]])
    with torch.no_grad():
        torch.testing.assert_close(streamed.denoiser.embed_tokens(ids), loaded.denoiser.embed_tokens(ids), rtol=0, atol=0)
    assert streamed.denoiser.embed_tokens.weight.is_meta
    assert streamed.denoiser.embed_tokens.weight.shape == loaded.denoiser.embed_tokens.weight.shape
    seen = []
    streamed.denoiser.layers[1].register_forward_pre_hook(  # runs after the layer's own loading hook
        lambda module, args: seen.append([p.is_meta for p in streamed.denoiser.layers.parameters()]))
    lm = loaded.config.language
    x = torch.randn(2, 7, lm.hidden_size)
    positions = torch.arange(7).expand(2, 7)
    mask = torch.ones(2, 7, dtype=torch.int64)
    index = torch.tensor([[0, 6], [3, 4]])
    with torch.no_grad():
        want, keys, values = loaded.denoiser(x, positions, mask, index)
        got, got_keys, got_values = streamed.denoiser(x, positions, mask, index)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(streamed.denoiser(x[:, 5:], positions[:, 5:] + 2, mask[:, 5:], index[:, :1] * 0,
                                                     keys, values, mask)[0],
                                   loaded.denoiser(x[:, 5:], positions[:, 5:] + 2, mask[:, 5:], index[:, :1] * 0,
                                                   keys, values, mask)[0], rtol=0, atol=0)
        pixels = torch.randn(1, 3, loaded.config.vision.image_size, loaded.config.vision.image_size)
        torch.testing.assert_close(streamed.vision_tower(pixels), loaded.vision_tower(pixels), rtol=0, atol=0)
    per_layer = len(list(streamed.denoiser.layers[0].parameters()))
    # when layer 1 ran, layer 0 was already gone and layer 2 not yet read
    assert seen[0] == [True] * per_layer + [False] * per_layer + [True] * (len(seen[0]) - 2 * per_layer)
    assert all(p.is_meta for module in streamed_modules for p in module.parameters())
