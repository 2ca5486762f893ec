"""Synthetic visual question answering: coloured shapes on varied backgrounds, in the LLaVA JSON format.

Every image holds one to four shapes, each of a different colour and a different kind, so that every question
has exactly one right answer. Images come in varied sizes and aspect ratios, so the anyres grid matters. Stage-1
records caption the whole image; stage-2 records ask about colour, shape, count, position and presence.

    llava-next data synth --out DIR --n N --seed S [--turns K]
writes DIR/images/*.png, DIR/captions.json (stage 1) and DIR/qa.json (stage 2, K questions per image).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..outputs import output_directory
from .records import DataError

COLORS = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 180),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = {
    "white": (245, 245, 245),
    "light gray": (200, 200, 200),
    "dark gray": (70, 70, 70),
    "black": (15, 15, 15),
    "beige": (225, 210, 180),
    "pale blue": (200, 220, 240),
}
# half the side of a shape's box, as a share of the image's shorter side, by the number of shapes: large enough
# that a small vision tower tells the kinds apart, small enough that four fit
SHAPE_SCALE = {1: 0.3, 2: 0.26, 3: 0.22, 4: 0.2}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
QUESTION_TYPES = ("color", "shape", "count", "position", "yes/no")


@dataclass
class Shape:
    kind: str
    color: str
    cx: float
    cy: float
    size: float  # half the side of the bounding box


@dataclass
class Scene:
    width: int
    height: int
    background: str
    shapes: list[Shape]
    axis: str | None  # two shapes set apart along "x" or "y", so position questions have one answer


def _draw(scene: Scene, rng: random.Random) -> Image.Image:
    base = BACKGROUNDS[scene.background]
    image = Image.new("RGB", (scene.width, scene.height), base)
    draw = ImageDraw.Draw(image)
    # a faint texture, so that backgrounds are never a single flat value
    for _ in range(scene.width * scene.height // 60):
        x, y = rng.randrange(scene.width), rng.randrange(scene.height)
        jitter = rng.randint(-12, 12)
        draw.point((x, y), tuple(max(0, min(255, c + jitter)) for c in base))
    for s in scene.shapes:
        fill = COLORS[s.color]
        box = (s.cx - s.size, s.cy - s.size, s.cx + s.size, s.cy + s.size)
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(s.cx, s.cy - s.size), (s.cx + s.size, s.cy + s.size), (s.cx - s.size, s.cy + s.size)], fill=fill)
        else:  # cross
            arm = s.size / 2.6
            draw.rectangle((s.cx - arm, s.cy - s.size, s.cx + arm, s.cy + s.size), fill=fill)
            draw.rectangle((s.cx - s.size, s.cy - arm, s.cx + s.size, s.cy + arm), fill=fill)
    return image


def _scene(rng: random.Random) -> Scene:
    count = rng.choice([1, 2, 2, 3, 3, 4])
    kinds = rng.sample(SHAPES, count)
    colors = rng.sample(list(COLORS), count)
    background = rng.choice(list(BACKGROUNDS))
    while True:  # a size the shapes do not fit in: draw another size, keeping the shapes
        # varied aspect ratios, from 1:3 to 3:1, and sizes, 32 to 96 pixels a side, at most 64x64 in area: sizes
        # that the demo model's anyres grid (up to 64x64 or 32x96 pixels) holds without shrinking
        width, height = rng.randint(32, 96), rng.randint(32, 96)
        if not 1 / 3 <= width / height <= 3 or width * height > 64 * 64:
            continue
        size = max(6.0, min(width, height) * SHAPE_SCALE[count])
        axis = None
        if count == 2:
            axis = "x" if width >= height else "y"
        for _ in range(100):
            shapes = []
            for kind, color in zip(kinds, colors):
                s = size * rng.uniform(0.85, 1.15)
                shapes.append(Shape(kind, color, rng.uniform(s + 1, width - s - 1), rng.uniform(s + 1, height - s - 1), s))
            # bounding boxes at least 3 pixels apart: no two shapes touch
            apart = all(
                max(abs(a.cx - b.cx), abs(a.cy - b.cy)) > a.size + b.size + 3
                for i, a in enumerate(shapes)
                for b in shapes[i + 1 :]
            )
            if axis is not None:
                a, b = shapes
                gap = abs(a.cx - b.cx) if axis == "x" else abs(a.cy - b.cy)
                apart = apart and gap > a.size + b.size + 3
            if apart:
                return Scene(width, height, background, shapes, axis)


def _ordered(scene: Scene) -> list[Shape]:
    return sorted(scene.shapes, key=lambda s: (s.cx, s.cy))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """Every shape, left to right, its count and the background; positions when two shapes are set apart."""
    shapes = _ordered(scene) if scene.axis != "y" else sorted(scene.shapes, key=lambda s: s.cy)
    names = [f"{article(s.color)} {s.color} {s.kind}" for s in shapes]
    if scene.axis == "x":
        body = f"{names[0]} on the left and {names[1]} on the right"
    elif scene.axis == "y":
        body = f"{names[0]} at the top and {names[1]} at the bottom"
    elif len(names) == 1:
        body = names[0]
    else:
        body = ", ".join(names[:-1]) + f" and {names[-1]}"
    count = len(shapes)
    return f"{NUMBERS[count]} shape{'s' * (count > 1)}: {body}, on a {scene.background} background."


def question(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    shapes = scene.shapes
    if kind == "color":
        s = rng.choice(shapes)
        return f"What color is the {s.kind}?", s.color
    if kind == "shape":
        s = rng.choice(shapes)
        return rng.choice([f"What shape is {s.color}?", f"Which shape is {s.color}?"]), s.kind
    if kind == "count":
        return "How many shapes are there?", str(len(shapes))
    if kind == "position":
        first, second = sorted(shapes, key=lambda s: s.cx if scene.axis == "x" else s.cy)
        where = rng.choice(["left", "right"] if scene.axis == "x" else ["top", "bottom"])
        s = first if where in ("left", "top") else second
        place = f"on the {where}" if scene.axis == "x" else f"at the {where}"
        if rng.random() < 0.5:
            return f"What shape is {place}?", s.kind
        return f"What color is the shape {place}?", s.color
    # yes/no: half the time a shape that is there, else a near miss (a colour or a kind that is in the image)
    present = {(s.color, s.kind) for s in shapes}
    if rng.random() < 0.5:
        color, kind_ = rng.choice(sorted(present))
        return f"Is there {article(color)} {color} {kind_}?", "yes"
    while True:
        color = rng.choice([s.color for s in shapes] + list(COLORS))
        kind_ = rng.choice([s.kind for s in shapes] + list(SHAPES))
        if (color, kind_) not in present:
            return f"Is there {article(color)} {color} {kind_}?", "no"


def question_kinds(scene: Scene) -> list[str]:
    return [k for k in QUESTION_TYPES if k != "position" or scene.axis is not None]


def generate(out: Path, n: int, seed: int, turns: int = 1) -> dict[str, int]:
    """Write n images with a caption record and a question record each; returns the count of questions by type."""
    if n < 1 or turns < 1:
        raise DataError(f"n (images) and turns (questions per image) must be at least 1, got n={n}, turns={turns}")
    rng = random.Random(seed)
    out = output_directory(out)
    taken = [name for name in ("qa.json", "captions.json") if (out / name).exists()]
    taken += ["images/"] if (out / "images").is_dir() and any((out / "images").iterdir()) else []
    if taken:  # (a user's own qa.json would be replaced, or old images mixed with new ones)
        raise DataError(f"{out} already holds {', '.join(taken)}; give a new or empty --out (nothing in it is "
                        "replaced)")
    (out / "images").mkdir(exist_ok=True)
    captions, qa, counts = [], [], {k: 0 for k in QUESTION_TYPES}
    for i in range(n):
        scene = _scene(rng)
        name = f"images/{seed}-{i:06d}.png"
        _draw(scene, rng).save(out / name)
        captions.append({"id": f"synth-{seed}-{i}-caption", "image": name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(scene)}]})
        conversation, types = [], []
        kinds = question_kinds(scene)
        rng.shuffle(kinds)
        for turn in range(turns):
            kind = kinds[turn % len(kinds)]
            q, a = question(scene, kind, rng)
            conversation += [{"from": "human", "value": ("<image>\n" if turn == 0 else "") + q}, {"from": "gpt", "value": a}]
            types.append(kind)
            counts[kind] += 1
        qa.append({"id": f"synth-{seed}-{i}", "image": name, "conversations": conversation, "types": types})
    (out / "captions.json").write_text(json.dumps(captions, indent=1))
    (out / "qa.json").write_text(json.dumps(qa, indent=1))
    return counts
