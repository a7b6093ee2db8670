"""The demo model's task, objective and evaluation helpers (benchmarks/demo_model)."""

import hashlib
import math

import pytest
import torch

from benchmarks.demo_model import data
from benchmarks.demo_model.data import Scene, Shape, draw, make_example
from benchmarks.demo_model.evaluate import accuracy, normalize, token_f1
from benchmarks.demo_model.train import (LONG_RESPONSE_LENGTH, RESPONSE_LENGTH, Encoder, diffusion_loss, init_weights,
                                         make_tokenizer, mask_response, training_step)
from llada_v import LladaV, load_tokenizer
from llada_v.config import tiny_config
from llada_v.image_processing import preprocess
from llada_v.tiny import TOKEN_EMBEDDING_STD, VISION_POSITION_STD
from llada_v.tokenizer import SYSTEM_PROMPT


def _digest(example) -> str:
    return hashlib.sha256(example.image.tobytes() + example.question.encode()).hexdigest()


def test_generator_is_deterministic():
    first = [make_example("train", 3, i) for i in range(20)]
    again = [make_example("train", 3, i) for i in range(20)]
    assert [_digest(e) for e in first] == [_digest(e) for e in again]
    assert [e.answer for e in first] == [e.answer for e in again]
    other_seed = [make_example("train", 4, i) for i in range(20)]
    assert [_digest(e) for e in first] != [_digest(e) for e in other_seed]


def test_splits_are_disjoint_and_eval_is_balanced():
    evals = data.load_examples("eval", 0, limit=120)
    trains = [make_example("train", 0, i, long=i % 2 == 0) for i in range(300)]
    assert not {_digest(e) for e in evals} & {_digest(e) for e in trains}
    counts = {k: sum(e.kind == k for e in evals) for k in data.QUESTION_TYPES}
    assert set(counts.values()) == {120 // len(data.QUESTION_TYPES)}
    assert {e.kind for e in trains} == set(data.TRAINING_TYPES)  # training adds "position"; the held-out split does not
    assert data.EVAL_SIZE % len(data.QUESTION_TYPES) == 0


def test_descriptions_name_every_object_in_reading_order_and_only_long_batches_ask_them():
    short = [make_example("train", 0, i) for i in range(200)]
    long = [make_example("train", 0, i, long=True) for i in range(200)]
    assert not {e.kind for e in short} & set(data.LONG_TYPES)
    described = [e for e in long if e.kind == "describe"]
    assert 70 < len(described) < 130  # half of a long batch
    for ex in described:
        ordered = sorted(ex.scene.objects, key=lambda o: (o.cell[1], o.cell[0]))
        assert len(ordered) >= 2
        phrases = ex.answer.split(", ")
        assert [p.split(" ")[1:3] for p in phrases] == [[o.colour, o.shape] for o in ordered]
        assert [p.split(" at the ")[1] for p in phrases] == [data.CELL_NAMES[o.cell] for o in ordered]
    scene = _scene()
    question, answer = data._question(scene, "describe", __import__("random").Random(0))
    assert (question, answer) == ("Describe the picture.", "a red square at the top left, a blue circle at the top "
                                  "right, a green triangle at the bottom right")
    with pytest.raises(ValueError, match="held-out split is the full task"):
        make_example("eval", 0, 0, long=True)


def test_images_exercise_several_tile_grids():
    cfg = tiny_config(vocab_size=512)
    grids = {preprocess(make_example("train", 0, i).image, cfg).grid for i in range(60)}
    assert {(1, 1), (2, 2)} <= grids and any(c != r for c, r in grids)


def test_objects_are_centred_in_their_cells():
    for i in range(100):
        scene = make_example("train", 0, i).scene
        cell_w, cell_h = scene.size[0] / data.LAYOUT, scene.size[1] / data.LAYOUT
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            column, row = obj.cell
            assert abs((x0 + x1) / 2 - (column + 0.5) * cell_w) <= 1 and abs((y0 + y1) / 2 - (row + 0.5) * cell_h) <= 1
            assert 0.7 * min(cell_w, cell_h) - 1 <= x1 - x0 <= 0.9 * min(cell_w, cell_h) + 1


def _half(obj: Shape, question: str) -> str:
    """The answer to a position question: the half of the image the object is in, by its layout column or row."""
    column, row = obj.cell
    return ("left", "right")[column] if "left or right" in question else ("above", "below")[row]


def test_perception_examples_ask_about_one_object_on_one_tile():
    cfg = tiny_config(vocab_size=512)
    examples = [make_example("train", 0, i, perception=True) for i in range(40)]
    assert all(len(ex.scene.objects) == 1 for ex in examples)
    assert {ex.kind for ex in examples} == set(data.PERCEPTION_TYPES)
    assert {preprocess(ex.image, cfg).grid for ex in examples} == {(1, 1)}
    for ex in examples:
        (obj,) = ex.scene.objects
        if ex.kind == "shape":
            assert ex.answer == obj.shape
        else:
            assert ex.answer == _half(obj, ex.question)
    with pytest.raises(ValueError, match="held-out split is the full task"):
        make_example("eval", 0, 0, perception=True)


def test_init_weights_scales():
    model = LladaV(tiny_config(vocab_size=512))
    init_weights(model, 0)
    position = model.vision_tower.embeddings.position_embedding.weight
    assert abs(position.std().item() - VISION_POSITION_STD) < 0.1 * VISION_POSITION_STD
    q_proj = model.denoiser.layers[0].self_attn.q_proj.weight  # [out, fan_in]
    assert abs(q_proj.std().item() * q_proj.shape[1] ** 0.5 - 1) < 0.05
    patches = model.vision_tower.embeddings.patch_embedding.weight  # fan_in = 3 * 32 * 32
    assert abs(patches.std().item() * patches[0].numel() ** 0.5 - 1) < 0.05
    assert abs(model.denoiser.embed_tokens.weight.std().item() - TOKEN_EMBEDDING_STD) < 0.1 * TOKEN_EMBEDDING_STD


def _scene() -> Scene:
    # a 128x128 image, layout 2x2: red square top-left, blue circle top-right, green triangle bottom-right
    objects = (Shape("square", "red", (0, 0), (8, 8, 48, 48)),
               Shape("circle", "blue", (1, 0), (72, 10, 118, 56)),
               Shape("triangle", "green", (1, 1), (70, 70, 120, 120)))
    return Scene((128, 128), (220, 220, 220), objects)


def test_drawn_scene_matches_its_description():
    image = draw(_scene())
    assert image.getpixel((28, 28)) == data.COLOURS["red"]
    assert image.getpixel((95, 33)) == data.COLOURS["blue"]
    assert image.getpixel((95, 110)) == data.COLOURS["green"]
    assert image.getpixel((28, 100)) == (220, 220, 220)  # the empty cell
    assert image.getpixel((72, 72)) == (220, 220, 220)  # a triangle's top-left corner is background


def test_answers_follow_the_scene():
    scene = _scene()
    square, circle, triangle = scene.objects
    assert data.in_direction(scene, square, "right of") == [circle, triangle]
    assert data.in_direction(scene, circle, "below") == [triangle]
    assert data.in_direction(scene, triangle, "above") == [square, circle]
    assert data.in_direction(scene, square, "below") == [triangle]
    assert data.in_direction(scene, square, "left of") == []
    # generated examples: every object's centre has its colour; counts and relations agree with cells
    for i in range(100):
        ex = make_example("train", 0, i)
        objs = ex.scene.objects
        for obj in objs:
            x0, y0, x1, y1 = obj.box
            assert ex.image.getpixel(((x0 + x1) // 2, y0 + (y1 - y0) * 3 // 5)) == data.COLOURS[obj.colour]
        if ex.kind == "count":
            assert ex.answer == str(len(objs))
        if ex.kind == "colour":
            assert ex.answer == next(o.colour for o in objs if f"the {o.shape}?" in ex.question)
        if ex.kind == "shape":
            assert ex.answer == next(o.shape for o in objs if f"the {o.colour} one" in ex.question)
        if ex.kind == "position":
            (obj,) = [o for o in objs if f"the {o.shape} " in ex.question or f"the {o.colour} shape" in ex.question]
            assert ex.answer == _half(obj, ex.question)


def test_hand_checked_questions():
    import random

    scene = _scene()
    rng = random.Random(0)
    for _ in range(30):
        question, answer = data._question(scene, "two_step", rng)
        # the only unique-direction facts of this scene
        # square (0, 0), circle (1, 0), triangle (1, 1): the only directions holding exactly one object
        expected = {"below the square": ("green", "triangle"), "below the red shape": ("green", "triangle"),
                    "left of the circle": ("red", "square"), "left of the blue shape": ("red", "square"),
                    "below the circle": ("green", "triangle"), "below the blue shape": ("green", "triangle"),
                    "left of the triangle": ("red", "square"), "left of the green shape": ("red", "square")}
        phrase = question.split(" is ", 1)[1].removeprefix("the shape ").rstrip("?")
        assert phrase in expected, question
        assert answer == expected[phrase][0 if question.startswith("What colour") else 1]
    for _ in range(30):
        question, answer = data._question(scene, "relation", rng)
        assert answer in {"left", "right", "above", "below"}
        if "square" in question.split(" or ")[0] or "red" in question.split(" or ")[0]:
            assert answer in {"left", "above"}


def test_loss_matches_eq1_on_a_hand_computable_case():
    # V = 2 with zero logits: every token's CE is ln 2. Example 0 (t = 0.5) masks 1 of 2 tokens,
    # example 1 (t = 0.25) masks both: loss = (ln2/0.5 + 2 ln2/0.25) / (B * R) = (2 + 8) ln2 / 4.
    logits = torch.zeros(2, 2, 2)
    targets = torch.tensor([[0, 1], [1, 1]])
    masked = torch.tensor([[True, False], [True, True]])
    t = torch.tensor([0.5, 0.25])
    assert diffusion_loss(logits, targets, masked, t).item() == pytest.approx(10 * math.log(2) / 4)
    # a confident right prediction costs ~0, and unmasked tokens never count
    logits = torch.tensor([[[9.0, -9.0], [-9.0, 9.0]]])
    assert diffusion_loss(logits, torch.tensor([[0, 0]]), torch.tensor([[True, False]]), torch.tensor([1.0])).item() < 1e-6


def test_masking_rate_follows_t():
    response = torch.arange(4000).view(1000, 4) % 7 + 1
    generator = torch.Generator().manual_seed(0)
    noisy, masked, t = mask_response(response, mask_id=0, generator=generator)
    assert torch.equal(noisy == 0, masked)
    assert torch.equal(noisy[~masked], response[~masked])
    assert t.min() >= 1e-3 and t.max() <= 1
    # masked fraction per example tracks t: E[masked] = t
    assert abs((masked.float().mean(1) - t).mean().item()) < 0.03


def test_one_training_step(tmp_path):
    torch.manual_seed(0)
    vocab = make_tokenizer(tmp_path, seed=0, vocab_size=1024)
    tokenizer = load_tokenizer(tmp_path)
    model = LladaV(tiny_config(vocab))
    init_weights(model, 0)
    encoder = Encoder(tokenizer, model.config)
    examples = [make_example("train", 0, i) for i in range(4)]
    batch = [encoder.encode(ex.image, ex.question, ex.answer) for ex in examples]
    assert all(len(b.response) == RESPONSE_LENGTH and b.response[-1] == encoder.special.eos for b in batch)
    long = [make_example("train", 0, i, long=True) for i in range(8)]
    assert any(ex.kind == "describe" for ex in long)
    lengths = [len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) + 1  # with <|eot_id|>
               for ex in data.load_examples("eval", 0, limit=120) if ex.kind in data.LONG_TYPES]
    assert 16 <= min(lengths) and max(lengths) <= 48
    long_batch = [encoder.encode(ex.image, ex.question, ex.answer, LONG_RESPONSE_LENGTH) for ex in long]
    assert all(len(b.response) == LONG_RESPONSE_LENGTH for b in long_batch)
    with pytest.raises(ValueError, match="more than the response length 8"):
        encoder.encode(long[0].image, "Describe the picture.", "a red square at the top left, a blue circle at the top right")
    assert math.isfinite(training_step(model, long_batch, encoder.special.mask, torch.Generator().manual_seed(0)).item())
    loss = training_step(model, batch, encoder.special.mask, torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0  # the image path is trained


def test_tokenizer_keeps_the_system_prompt_whole_and_questions_in_words(tmp_path):
    make_tokenizer(tmp_path, seed=0, vocab_size=1024)
    tokenizer = load_tokenizer(tmp_path)
    encoder = Encoder(tokenizer, tiny_config(512))
    ids = encoder.prompt_ids("What colour is the shape left of the red shape?")
    pieces = [tokenizer.decode([i]) for i in ids if i >= 0]
    assert SYSTEM_PROMPT in pieces
    assert pieces[pieces.index("What"):][:4] == ["What", " colour", " is", " the"]
    assert tokenizer.decode(ids[ids.index(-200) + 1:], skip_special_tokens=True).strip().startswith("What colour is")


def test_normalize_and_accuracy():
    assert normalize("  Red. ") == "red"
    assert normalize("3!") == "3"
    examples = data.load_examples("eval", 0, limit=10)
    result = accuracy([ex.answer.upper() + "." for ex in examples], examples)
    assert result["accuracy"] == 1.0 and result["n"] == 10 and result["f1"] == 1.0
    wrong = accuracy(["nope"] * len(examples), examples)
    assert wrong["accuracy"] == 0.0 and wrong["f1"] == 0.0 and set(wrong["f1_per_type"]) == set(wrong["per_type"])


def test_token_f1_counts_shared_words():
    assert token_f1("Red circle, blue square.", "red circle, blue square") == 1.0
    assert token_f1("red circle", "red circle, blue square") == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P 1, R 1/2
    assert token_f1("red red", "red") == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # a word counts as often as it occurs
    assert token_f1("", "") == 1.0 and token_f1("", "red") == 0.0 and token_f1("blue", "red") == 0.0
