"""A synthetic visual QA task for the shipped demo model, generated deterministically from a seed.

Each example is one image of 1 to 4 flat shapes on a plain background, one question and its answer: one
word, or for "Describe the picture." every object with its colour, shape and cell in reading order (16 to 32
tokens). Objects sit centred in distinct cells of a 2x2 layout grid, at 70-90% of the cell, so "left
of" / "above" compare cell columns / rows and are never ambiguous; in a scene every object has its own
shape and its own colour, so "the square" or "the red shape" names exactly one object. (Objects
placed anywhere inside their cell left shape at chance after 176k training examples: a 32 px patch
then sees each shape at many offsets; centred, one-object scenes learn shape in ~10k examples.)
Image sizes (48 to 192 px, aspect ratios up to 2) make the anyres grid pick 1x1 up to 3x3 tiles of
64 px; in the 64 px overview tile every layout cell is one 32 px patch of the shipped model.

Question types: colour, shape, count, relation (left/right, above/below), two_step ("What colour is the
shape left of the square?") and describe (scenes of 2 or more objects: "a red circle at the top left, a blue
square at the bottom right"); training adds position ("Is the square left or right?"). Example `i` of a split
depends only on (split, seed, i) and, for training, the curriculum's `perception` stage and `long` batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 70, 230),
           "yellow": (240, 220, 20), "purple": (150, 40, 190), "orange": (250, 140, 10)}
SHAPES = ("circle", "square", "triangle", "diamond")
QUESTION_TYPES = ("colour", "shape", "count", "relation", "two_step", "describe")  # the held-out split's
LONG_TYPES = ("describe",)  # answers of 16 to 32 tokens; the others are one word
# Training also asks which half of the image one object is in ("position"), the one question whose answer is an
# object's place alone. On a multi-tile image an object's zoomed-in grid tokens carry vision positions inside their
# tile; only its overview token knows its layout cell. (An earlier shipped model answered it at 87% on fresh scenes.)
TRAINING_TYPES = QUESTION_TYPES + ("position",)
# How often training asks each one-word type. Two-step questions (find the named object, then read its neighbour)
# are learnt last and were the type that answering at length cost most (100% -> 72.5%), so they are asked twice as
# often. Measured (9,000 steps, 2,400 fresh questions): two-step 100%, relation 69.8%, against 80.3% and 50.3% for
# the 10,000-step model with equal weights; relation at 2x and two-step at 3x (6,400 steps) cost colour and
# descriptions too much.
TRAINING_WEIGHTS = {"colour": 1, "shape": 1, "count": 1, "relation": 1, "two_step": 2, "position": 1}
SHORT_TRAINING_TYPES = tuple(k for k in TRAINING_TYPES if k not in LONG_TYPES)
PERCEPTION_TYPES = ("shape", "position")
SPLITS = ("train", "eval")
EVAL_SIZE = 240  # 40 per question type
LAYOUT = 2  # every scene is a 2x2 grid of cells, one object at most per cell
MAX_OBJECTS = LAYOUT * LAYOUT
# "left of" a cell = a smaller column; "above" = a smaller row.
DIRECTIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
CELL_NAMES = {(0, 0): "top left", (1, 0): "top right", (0, 1): "bottom left", (1, 1): "bottom right"}


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    cell: tuple[int, int]  # (column, row) in the layout grid
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels


@dataclass(frozen=True)
class Scene:
    size: tuple[int, int]  # (width, height)
    background: tuple[int, int, int]
    objects: tuple[Shape, ...]


@dataclass(frozen=True)
class Example:
    image: Image.Image = field(compare=False)
    question: str
    answer: str
    kind: str  # one of QUESTION_TYPES
    scene: Scene


def _random_size(rng: random.Random, single_tile: bool = False) -> tuple[int, int]:
    if single_tile or rng.random() < 0.2:  # a single 64 px tile
        return rng.randint(48, 64), rng.randint(48, 64)
    width = rng.randint(64, 192)
    height = rng.randint(max(64, width // 2), min(192, 2 * width))  # aspect ratio at most 2
    return width, height


def random_scene(rng: random.Random, perception: bool = False) -> Scene:
    """1 to MAX_OBJECTS objects; `perception`: exactly one, on a single 64 px tile."""
    width, height = _random_size(rng, single_tile=perception)
    cell_w, cell_h = width / LAYOUT, height / LAYOUT
    n = 1 if perception else rng.randint(1, MAX_OBJECTS)
    cells = rng.sample([(c, r) for r in range(LAYOUT) for c in range(LAYOUT)], n)
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(sorted(COLOURS), n)
    objects = []
    for (c, r), shape, colour in zip(cells, shapes, colours):
        side = rng.uniform(0.7, 0.9) * min(cell_w, cell_h)
        x0 = c * cell_w + (cell_w - side) / 2
        y0 = r * cell_h + (cell_h - side) / 2
        objects.append(Shape(shape, colour, (c, r), (round(x0), round(y0), round(x0 + side), round(y0 + side))))
    grey = rng.randint(190, 245)
    return Scene((width, height), (grey, grey, grey), tuple(objects))


def draw(scene: Scene) -> Image.Image:
    image = Image.new("RGB", scene.size, scene.background)
    pen = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "triangle":
            pen.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # diamond
            xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
            pen.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=fill)
    return image


def _name(obj: Shape, rng: random.Random) -> str:
    """A phrase naming exactly one object of the scene: by its shape or by its colour."""
    return f"the {obj.shape}" if rng.random() < 0.5 else f"the {obj.colour} shape"


def in_direction(scene: Scene, ref: Shape, direction: str) -> list[Shape]:
    dc, dr = DIRECTIONS[direction]
    return [o for o in scene.objects if o is not ref
            and (dc and (o.cell[0] - ref.cell[0]) * dc > 0 or dr and (o.cell[1] - ref.cell[1]) * dr > 0)]


def _question(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str] | None:
    objs = scene.objects
    if kind == "colour":
        obj = rng.choice(objs)
        return f"What colour is the {obj.shape}?", obj.colour
    if kind == "shape":
        obj = rng.choice(objs)
        return f"What shape is the {obj.colour} one?", obj.shape
    if kind == "count":
        return "How many shapes are there?", str(len(objs))
    if kind == "describe":
        if len(objs) < 2:
            return None
        ordered = sorted(objs, key=lambda o: (o.cell[1], o.cell[0]))
        phrases = [f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.colour} {o.shape} at the {CELL_NAMES[o.cell]}"
                   for o in ordered]
        return "Describe the picture.", ", ".join(phrases)
    if kind == "position":  # training only: which half of the image one object is in
        obj = rng.choice(objs)
        if rng.random() < 0.5:
            return f"Is {_name(obj, rng)} left or right?", ("left", "right")[obj.cell[0]]
        return f"Is {_name(obj, rng)} above or below?", ("above", "below")[obj.cell[1]]
    if kind == "relation":
        pairs = [(a, b) for a in objs for b in objs if a is not b]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        if a.cell[0] != b.cell[0] and (a.cell[1] == b.cell[1] or rng.random() < 0.5):
            answer = "left" if a.cell[0] < b.cell[0] else "right"
            return f"Is {_name(a, rng)} left or right of {_name(b, rng)}?", answer
        answer = "above" if a.cell[1] < b.cell[1] else "below"
        return f"Is {_name(a, rng)} above or below {_name(b, rng)}?", answer
    # two_step: find the one object in a direction from a reference object, then ask about it
    options = [(ref, d) for ref in objs for d in DIRECTIONS if len(in_direction(scene, ref, d)) == 1]
    if not options:
        return None
    ref, direction = rng.choice(options)
    (target,) = in_direction(scene, ref, direction)
    if rng.random() < 0.5:
        return f"What colour is the shape {direction} {_name(ref, rng)}?", target.colour
    return f"What shape is {direction} {_name(ref, rng)}?", target.shape


def make_example(split: str, seed: int, index: int, perception: bool = False, long: bool = False) -> Example:
    """Example `index` of `split`: a function of (split, seed, index, perception, long) only.

    Training examples (benchmarks/demo_model/train.py): `perception` gives the curriculum's first stage, one
    object on a single tile whose shape or position is asked; otherwise a one-word question, or with `long`
    (a batch trained at the long response length) a description half of the time.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if (perception or long) and split == "eval":
        raise ValueError("the held-out split is the full task: perception and long batches are for training only")
    rng = random.Random(f"{split}:{seed}:{index}")
    if split == "eval":
        kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    elif perception:
        kind = rng.choice(PERCEPTION_TYPES)
    elif long and rng.random() < 0.5:
        kind = rng.choice(LONG_TYPES)
    else:
        kind = rng.choices(SHORT_TRAINING_TYPES, weights=[TRAINING_WEIGHTS[k] for k in SHORT_TRAINING_TYPES])[0]
    while True:  # redraw the scene until the question type has an answer in it
        scene = random_scene(rng, perception)
        qa = _question(scene, kind, rng)
        if qa is not None:
            return Example(draw(scene), qa[0], qa[1], kind, scene)


def load_examples(split: str = "eval", seed: int = 0, limit: int | None = None, start: int = 0) -> list[Example]:
    """The held-out split is `EVAL_SIZE` examples, balanced over question types."""
    count = EVAL_SIZE if limit is None else limit
    return [make_example(split, seed, start + i) for i in range(count)]


def prompt_text(question: str) -> str:
    """The user turn as LLaDA-V writes it: the image placeholder on its own line, then the question."""
    return f"<image>\n{question}"


def corpus(seed: int = 0, count: int = 2000) -> list[str]:
    """Questions and answers of the task, for training the tokenizer."""
    examples = [make_example("train", seed, i, long=i % 2 == 0) for i in range(count)]
    return [text for ex in examples for text in (ex.question, ex.answer)]


def write_examples(folder, indices: tuple[int, ...] = (9, 5, 3, 16), seed: int = 0) -> list[tuple[str, Example]]:
    """Save held-out examples as PNG files in `folder` (docs/examples): [(file name, example)]."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in indices:
        ex = make_example("eval", seed, index)
        name = f"eval_{index:03d}_{ex.kind}.png"
        ex.image.save(folder / name)
        written.append((name, ex))
    return written
