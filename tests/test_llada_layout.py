"""The released layout of the text-only LLaDA models (llada_v/llada_layout.py): every official config key mapped,
refused by name or without effect on inference; the released tensor names loaded strictly, from one file or shards,
eagerly or streamed; logits equal to the transcription of the official modeling code (official_llada.py), which a
tensor read in the wrong place breaks."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import llada_v
import official_llada as official
import released_llada_layout
from llada_v import CheckpointError, LladaVConfig, llada_layout
from llada_v.config import LLADA
from llada_v.weights import checkpoint_config, load_model_streaming, to_checkpoint_key, to_module_key


@pytest.fixture(scope="module")
def official_model(released_llada):
    return official.LLaDAModelLM(released_llada)


def _written(tmp_path, **edit):
    """A one-file checkpoint of the released layout, its config.json edited."""
    return released_llada_layout.write_checkpoint(tmp_path / "checkpoint", max_shard_bytes=None, config_edit=edit)


def _config(**edit):
    """The config of LLaDA-8B-Instruct's config.json (tiny sizes) edited; a key given `...` is removed."""
    raw = {**released_llada_layout.RELEASED_CONFIG, **edit}
    return LladaVConfig.from_dict({key: value for key, value in raw.items() if value is not ...})


# ---- config.json ------------------------------------------------------------------------------------------------

def test_released_config_is_the_llada_family_with_every_vocabulary_row(released_llada):
    cfg = checkpoint_config(released_llada)
    lm = cfg.language
    assert cfg.family == LLADA and cfg.vision is None
    assert (lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads, lm.num_key_value_heads) == (64, 2, 4, 4)
    assert (lm.intermediate_size, lm.rope_theta, lm.rms_norm_eps, lm.max_position_embeddings) == (128, 5e5, 1e-5, 4096)
    assert lm.vocab_size == released_llada_layout.VOCAB_ROWS > len(llada_v.load_tokenizer(released_llada))  # not cut
    assert LladaVConfig.from_dict(cfg.to_dict()) == cfg


# Every field of the official ModelConfig (configuration_llada.py:147-381), a value other than the released one,
# and what that value does here: refused naming the key, mapped onto the LanguageConfig field named, or harmless
# (the same config). n_heads is changed with n_kv_heads, which must follow it.
EVERY_OFFICIAL_KEY = [
    ("d_model", 128, "hidden_size"), ("n_heads", 8, "num_attention_heads"), ("n_kv_heads", 2, "refused"),
    ("n_layers", 3, "num_hidden_layers"), ("mlp_ratio", 8, "harmless"), ("mlp_hidden_size", 256, "intermediate_size"),
    ("activation_type", "swiglu", "refused"), ("block_type", "sequential", "refused"),
    ("block_group_size", 2, "refused"), ("alibi", True, "refused"), ("alibi_bias_max", 2.0, "harmless"),
    ("rope", False, "refused"), ("rope_full_precision", False, "refused"), ("flash_attention", True, "harmless"),
    ("attention_dropout", 0.1, "harmless"), ("multi_query_attention", True, "refused"),
    ("attention_layer_norm", True, "refused"), ("residual_dropout", 0.1, "harmless"),
    ("embedding_dropout", 0.1, "harmless"), ("input_emb_norm", True, "refused"),
    ("layer_norm_type", "gemma_rms", "refused"), ("layer_norm_with_affine", False, "refused"),
    ("rms_norm_eps", 1e-6, "rms_norm_eps"), ("attention_layer_norm_with_affine", False, "harmless"),
    ("max_sequence_length", 2048, "max_position_embeddings"), ("train_max_sequence_length", 8, "harmless"),
    ("rope_theta", 10000.0, "rope_theta"), ("include_qkv_bias", True, "refused"), ("include_bias", True, "refused"),
    ("bias_for_layer_norm", True, "refused"), ("scale_logits", True, "refused"),
    ("vocab_size", 1000, "harmless"), ("embedding_size", 126592, "vocab_size"), ("weight_tying", True, "refused"),
    ("eos_token_id", 1, "harmless"), ("pad_token_id", 1, "harmless"), ("mask_token_id", 1, "harmless"),
    ("init_device", "cpu", "harmless"), ("init_fn", "normal", "harmless"), ("init_std", 0.5, "harmless"),
    ("init_cutoff_factor", 3.0, "harmless"), ("precision", "fp32", "harmless"),
]
MODEL_CONFIG_FIELDS = 42  # configuration_llada.py's ModelConfig has 42 fields


def test_the_table_holds_every_official_key():
    assert len({key for key, _, _ in EVERY_OFFICIAL_KEY}) == len(EVERY_OFFICIAL_KEY) == MODEL_CONFIG_FIELDS
    assert set(official.DEFAULTS) <= {key for key, _, _ in EVERY_OFFICIAL_KEY}


@pytest.mark.parametrize("key, value, outcome", EVERY_OFFICIAL_KEY, ids=[k for k, _, _ in EVERY_OFFICIAL_KEY])
def test_every_official_key_is_mapped_refused_by_name_or_harmless(key, value, outcome):
    if outcome == "refused":
        with pytest.raises(CheckpointError, match=key):
            _config(**{key: value})
        return
    edited, baseline = _config(**{key: value}, **({"n_kv_heads": value} if key == "n_heads" else {})), _config()
    if outcome == "harmless":
        assert edited == baseline
    else:
        assert getattr(edited.language, outcome) == value != getattr(baseline.language, outcome)


def test_mlp_ratio_sizes_the_mlp_when_mlp_hidden_size_is_null():
    assert _config(mlp_hidden_size=None, mlp_ratio=3).language.intermediate_size == 3 * 64


@pytest.mark.parametrize("key", ["rope", "weight_tying", "block_type", "activation_type", "layer_norm_type"])
def test_a_missing_key_takes_the_official_default_and_is_refused(key):
    with pytest.raises(CheckpointError, match=rf"{key} .* \(config.json lacks {key}: the official default\) is not "
                                              rf"implemented"):
        _config(**{key: ...})


def test_a_missing_embedding_size_takes_the_official_default_rows(tmp_path):
    with pytest.raises(CheckpointError, match=r"embedding_size 50304 \(config.json lacks embedding_size: the official "
                                              r"default\) is smaller than vocab_size 126464"):
        _config(embedding_size=...)
    folder = _written(tmp_path, vocab_size=50000)
    raw = json.loads((folder / "config.json").read_text())
    del raw["embedding_size"]
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "tokenizer.json").unlink()  # 126,349 tokens: more than 50,304 rows
    with pytest.raises(CheckpointError, match=r"model.transformer.(wte|ff_out).weight in .* has shape \(126464, 64\), "
                                              r"the config implies \(50304, 64\)"):
        llada_v.load_model(folder)


@pytest.mark.parametrize("edit, message", [
    ({"d_model": "64"}, "d_model should be int, got '64'"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps must be positive and finite"),
    ({"rope": 1}, "rope 1 is not implemented: only rope True"),
    ({"n_heads": 5, "n_kv_heads": 5}, "d_model 64 is not divisible by n_heads 5"),
    ({"n_kv_heads": 4, "multi_query_attention": False, "n_heads": 2}, "contradict each other"),
    ({"embedding_size": 1000}, "embedding_size 1000 is smaller than vocab_size 126464"),
    ({"mm_vision_tower": "siglip"}, "mixes the text-only LLaDA layout .* with the multimodal keys mm_vision_tower"),
])
def test_malformed_configs_name_their_key(edit, message):
    with pytest.raises(CheckpointError, match=message):
        _config(**edit)


@pytest.mark.parametrize("key, message", [
    ("mask_token_id", "says mask_token_id 5, but the tokenizer's <\\|mdm_mask\\|> is 126336"),
    ("eos_token_id", "says eos_token_id 5, but the tokenizer's <\\|endoftext\\|> is 126081"),
    ("pad_token_id", "says pad_token_id 5, but the tokenizer's pad token is 126081"),
])
def test_token_ids_of_the_config_must_be_the_tokenizers(tmp_path, key, message):
    with pytest.raises(CheckpointError, match=message):
        llada_v.load_model(_written(tmp_path, **{key: 5}))


# ---- tensors ------------------------------------------------------------------------------------------------------

def test_every_released_tensor_is_one_parameter_and_back(released_llada):
    cfg = checkpoint_config(released_llada)
    keys = released_llada_layout.tensor_shapes(released_llada_layout.RELEASED_CONFIG)
    names = {key: to_module_key(key, cfg) for key in keys}
    with torch.device("meta"):
        parameters = dict(llada_v.LladaV(cfg).named_parameters())
    assert sorted(names.values()) == sorted(parameters)
    assert all(to_checkpoint_key(name, cfg) == key for key, name in names.items())
    assert names["model.transformer.blocks.1.ff_proj.weight"] == "denoiser.layers.1.mlp.gate_proj.weight"
    assert names["model.transformer.ff_out.weight"] == "denoiser.lm_head.weight"


def test_one_file_and_shards_load_the_same_model(released_llada, tmp_path):
    assert (released_llada / "model.safetensors.index.json").is_file()
    sharded, single = llada_v.load_model(released_llada), llada_v.load_model(_written(tmp_path))
    assert not (tmp_path / "checkpoint" / "model.safetensors.index.json").is_file()
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def _rewrite(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.transformer.blocks.1.up_proj.weight"),
     r"missing tensors \['model.transformer.blocks.1.up_proj.weight'\]"),
    (lambda t: t.update({"model.transformer.blocks.0.att_proj.weight": torch.zeros(192, 64)}),
     r"unexpected tensors \['model.transformer.blocks.0.att_proj.weight'\]"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64)}),
     r"unexpected tensors \['model.layers.0.mlp.up_proj.weight'\]"),
    (lambda t: t.update({"model.transformer.blocks.0.ff_proj.weight": torch.zeros(64, 64)}),
     r"model.transformer.blocks.0.ff_proj.weight in model.safetensors has shape \(64, 64\), the config implies "
     r"\(128, 64\)"),
    (lambda t: t.update({"model.transformer.blocks.2.q_proj.weight": torch.zeros(64, 64)}),
     "config.json says n_layers 2, the checkpoint holds 3 language layers"),
])
def test_wrong_tensors_are_named(tmp_path, edit, message):
    folder = _written(tmp_path)
    _rewrite(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        llada_v.load_model(folder)


def test_save_model_writes_the_released_layout(released_llada, tmp_path):
    model = llada_v.load_model(released_llada)
    llada_v.save_model(model, tmp_path / "saved", tokenizer_folder=released_llada)
    assert set(load_file(tmp_path / "saved" / "model.safetensors")) == set(
        released_llada_layout.tensor_shapes(released_llada_layout.RELEASED_CONFIG))
    assert "d_model" in json.loads((tmp_path / "saved" / "config.json").read_text())
    reloaded = llada_v.load_model(tmp_path / "saved")
    assert reloaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# ---- logits against the official modeling code --------------------------------------------------------------------

def _logits(model, ids, attention_mask):
    """Our denoiser at every position, with the official positions: 0, 1, ... along the row, padding included."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model.denoiser(model.denoiser.embed_tokens(ids), positions, attention_mask, positions)[0]


def _inputs():
    ids = torch.randint(0, released_llada_layout.VOCAB_ROWS, (2, 11), generator=torch.Generator().manual_seed(3))
    padded = torch.ones_like(ids)
    padded[1, :4] = 0  # left padding, as the official generate.py batches prompts
    return ids, padded


@pytest.mark.parametrize("loader", [llada_v.load_model, load_model_streaming], ids=["loaded", "streamed"])
def test_logits_equal_the_official_model(released_llada, official_model, loader):
    model = loader(released_llada)
    ids, padded = _inputs()
    for attention_mask in (torch.ones_like(ids), padded):
        with torch.no_grad():
            want = official_model(ids, attention_mask=attention_mask).logits
        got = _logits(model, ids, attention_mask)
        assert got.shape == (2, 11, released_llada_layout.VOCAB_ROWS)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("table, a, b", [
    ("BLOCK_TENSORS", "ff_proj", "up_proj"), ("BLOCK_TENSORS", "attn_norm", "ff_norm"),
    ("BLOCK_TENSORS", "q_proj", "k_proj"), ("BLOCK_TENSORS", "k_proj", "v_proj"),
    ("MODEL_TENSORS", "model.transformer.wte.weight", "model.transformer.ff_out.weight"),
])
def test_a_tensor_read_in_the_wrong_place_breaks_the_logits(released_llada, official_model, monkeypatch, table, a, b):
    mapping = dict(getattr(llada_layout, table))
    mapping[a], mapping[b] = mapping[b], mapping[a]
    monkeypatch.setattr(llada_layout, table, mapping)
    ids, padded = _inputs()
    with torch.no_grad():
        want = official_model(ids, attention_mask=padded).logits
    got = _logits(llada_v.load_model(released_llada), ids, padded)
    assert (got - want).abs().max() > 0.1 * want.abs().max()
