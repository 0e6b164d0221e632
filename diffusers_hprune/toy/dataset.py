"""A procedural, seeded, captioned dataset of coloured shapes with GenEval-like prompts.

32x32 RGB images of circles, squares and (upright) triangles in four colours on a
dark plain background. Six prompt categories, as in GenEval:

| category | example |
| --- | --- |
| ``single_object`` | ``a circle`` |
| ``two_object`` | ``a circle and a square`` |
| ``counting`` | ``three triangles``, ``two red squares`` |
| ``colors`` | ``a blue square`` |
| ``position`` | ``a circle left of a square`` (left of / right of / above / below) |
| ``color_attr`` | ``a red circle and a blue square`` |

Every prompt of every category is enumerated; about a fifth of the prompts of each
category with ten or more prompts is held out of training (chosen by a stable hash
of the text), so the held-out split measures composition, not memory. The two
single-object-like categories with few prompts are shared by both splits.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
BACKGROUND = (24, 24, 24)
COLORS = {
    "red": (225, 45, 45),
    "green": (45, 185, 70),
    "blue": (50, 100, 235),
    "yellow": (235, 205, 45),
}
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBERS = {1: "one", 2: "two", 3: "three"}
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
HELDOUT_FRACTION = 0.2

# Object sizes (px) by number of objects in the scene: big enough that shapes stay shapes.
_SIZES = {1: (14, 19), 2: (11, 15), 3: (9, 12)}
_GAP = 2  # minimum free pixels between objects
_MIN_SEPARATION = 6  # position prompts: the relation axis must separate the centres by this much


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str | None = None  # None: any colour


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: the objects (in prompt order) and, for position prompts, how obj 0 relates to obj 1."""

    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    text: str = field(default="", compare=False)


def _article_phrase(o: ObjectSpec) -> str:
    return f"a {o.color + ' ' if o.color else ''}{o.shape}"


def prompt_text(spec: PromptSpec) -> str:
    """The caption of a spec (the inverse of :func:`parse_prompt`)."""
    objs = spec.objects
    if spec.category == "counting":
        o = objs[0]
        noun = o.shape if len(objs) == 1 else PLURALS[o.shape]
        return f"{NUMBERS[len(objs)]} {o.color + ' ' if o.color else ''}{noun}"
    if spec.category == "position":
        return f"{_article_phrase(objs[0])} {spec.relation} {_article_phrase(objs[1])}"
    return " and ".join(_article_phrase(o) for o in objs)


def _spec(category, objects, relation=None) -> PromptSpec:
    spec = PromptSpec(category, tuple(objects), relation)
    return PromptSpec(category, spec.objects, relation, prompt_text(spec))


@cache
def all_prompts() -> dict[str, tuple[PromptSpec, ...]]:
    """Every prompt of every category."""
    out: dict[str, list[PromptSpec]] = {c: [] for c in CATEGORIES}
    for s in SHAPES:
        out["single_object"].append(_spec("single_object", [ObjectSpec(s)]))
        for c in COLORS:
            out["colors"].append(_spec("colors", [ObjectSpec(s, c)]))
        for n in NUMBERS:
            out["counting"].append(_spec("counting", [ObjectSpec(s)] * n))
            for c in COLORS:
                out["counting"].append(_spec("counting", [ObjectSpec(s, c)] * n))
    for s1 in SHAPES:
        for s2 in SHAPES:
            if s1 != s2:
                out["two_object"].append(_spec("two_object", [ObjectSpec(s1), ObjectSpec(s2)]))
            for rel in RELATIONS:
                out["position"].append(_spec("position", [ObjectSpec(s1), ObjectSpec(s2)], rel))
            for c1 in COLORS:
                for c2 in COLORS:
                    if c1 != c2:
                        out["color_attr"].append(_spec("color_attr", [ObjectSpec(s1, c1), ObjectSpec(s2, c2)]))
    return {k: tuple(v) for k, v in out.items()}


def _is_heldout(spec: PromptSpec) -> bool:
    digest = hashlib.sha256(spec.text.encode()).digest()
    return digest[0] / 256 < HELDOUT_FRACTION


@cache
def split_prompts(split: str) -> dict[str, tuple[PromptSpec, ...]]:
    """Prompts of ``split`` (``"train"`` or ``"heldout"``) by category."""
    if split not in ("train", "heldout"):
        raise ValueError(f"Unknown split {split!r}; use 'train' or 'heldout'.")
    out = {}
    for category, specs in all_prompts().items():
        if len(specs) < 10:
            out[category] = specs  # too few to hold any out: shared by both splits
        else:
            out[category] = tuple(s for s in specs if _is_heldout(s) == (split == "heldout"))
    return out


def prompts(split: str = "heldout", n: int = 200, seed: int = 0) -> list[str]:
    """``n`` prompt strings of ``split``, balanced across the six categories, deterministic for ``seed``."""
    return [s.text for s in prompt_specs(split, n, seed)]


def prompt_specs(split: str = "heldout", n: int = 200, seed: int = 0) -> list[PromptSpec]:
    rng = random.Random(f"prompts-{split}-{seed}")
    pools = {c: list(v) for c, v in split_prompts(split).items()}
    for pool in pools.values():
        rng.shuffle(pool)
    out = []
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)]
        pool = pools[category]
        out.append(pool[(i // len(CATEGORIES)) % len(pool)])
    return out


_NUM_WORDS = {v: k for k, v in NUMBERS.items()}
_SINGULAR = {v: k for k, v in PLURALS.items()}
_OBJ = r"(?:a )?(?:(red|green|blue|yellow) )?(circle|square|triangle)"


def parse_prompt(text: str) -> PromptSpec:
    """The spec of a prompt of this dataset; raises ValueError for text outside its grammar."""
    t = " ".join(text.lower().strip().rstrip(".").split())
    m = re.fullmatch(r"(one|two|three) (?:(red|green|blue|yellow) )?(circles?|squares?|triangles?)", t)
    if m:
        shape = _SINGULAR.get(m.group(3), m.group(3))
        return _spec("counting", [ObjectSpec(shape, m.group(2))] * _NUM_WORDS[m.group(1)])
    m = re.fullmatch(_OBJ + r" (left of|right of|above|below) " + _OBJ, t)
    if m:
        return _spec("position", [ObjectSpec(m.group(2), m.group(1)), ObjectSpec(m.group(5), m.group(4))], m.group(3))
    m = re.fullmatch(_OBJ + r" and " + _OBJ, t)
    if m:
        objs = [ObjectSpec(m.group(2), m.group(1)), ObjectSpec(m.group(4), m.group(3))]
        return _spec("color_attr" if objs[0].color or objs[1].color else "two_object", objs)
    m = re.fullmatch(_OBJ, t)
    if m:
        return _spec("colors" if m.group(1) else "single_object", [ObjectSpec(m.group(2), m.group(1))])
    raise ValueError(
        f"Prompt {text!r} is outside the toy grammar (e.g. 'a red circle', 'two squares', "
        "'a circle left of a square', 'a red circle and a blue square')."
    )


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], margin: float = 0.0) -> bool:
    """Whether centre ``a`` is ``relation`` centre ``b`` (image coordinates: y grows downwards).

    The relation's axis must dominate: "left of" needs b.x - a.x > |b.y - a.y| and > margin.
    """
    dx, dy = b[0] - a[0], b[1] - a[1]
    if relation == "left of":
        return dx > margin and dx > abs(dy)
    if relation == "right of":
        return -dx > margin and -dx > abs(dy)
    if relation == "above":
        return dy > margin and dy > abs(dx)
    if relation == "below":
        return -dy > margin and -dy > abs(dx)
    raise ValueError(f"Unknown relation {relation!r}")


@dataclass
class PlacedObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


def _place(spec: PromptSpec, rng: random.Random) -> list[PlacedObject]:
    n = len(spec.objects)
    lo, hi = _SIZES[n]
    for _ in range(1000):
        placed = []
        for o in spec.objects:
            size = rng.randint(lo, hi)
            x0, y0 = rng.randint(1, IMAGE_SIZE - size - 1), rng.randint(1, IMAGE_SIZE - size - 1)
            box = (x0, y0, x0 + size, y0 + size)
            if any(
                box[0] < p.box[2] + _GAP and p.box[0] < box[2] + _GAP and box[1] < p.box[3] + _GAP and p.box[1] < box[3] + _GAP
                for p in placed
            ):
                break
            placed.append(PlacedObject(o.shape, o.color or rng.choice(list(COLORS)), box))
        else:
            if spec.relation and not relation_holds(spec.relation, placed[0].center, placed[1].center, _MIN_SEPARATION):
                continue
            return placed
    raise RuntimeError(f"could not place the objects of {spec.text!r}")


def draw(objects: list[PlacedObject], supersample: int = 4) -> Image.Image:
    """Render placed objects, anti-aliased by drawing at ``supersample`` x and downsampling."""
    s = supersample
    image = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for o in objects:
        x0, y0, x1, y1 = (v * s for v in o.box)
        fill = COLORS[o.color]
        if o.shape == "circle":
            pen.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "square":
            pen.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            pen.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def render(prompt: str | PromptSpec, seed: int = 0) -> tuple[Image.Image, list[PlacedObject]]:
    """A ground-truth image for ``prompt`` (deterministic for ``seed``) and the objects in it."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    objects = _place(spec, random.Random(f"render-{spec.text}-{seed}"))
    return draw(objects), objects


def sample(n: int, split: str = "train", seed: int = 0) -> list[tuple[Image.Image, str]]:
    """``n`` (image, caption) pairs of ``split``: categories equally likely, prompts uniform within a category."""
    rng = random.Random(f"sample-{split}-{seed}")
    pools = split_prompts(split)
    out = []
    for _ in range(n):
        spec = rng.choice(pools[rng.choice(CATEGORIES)])
        image, _ = render(spec, seed=rng.getrandbits(32))
        out.append((image, spec.text))
    return out


def vocabulary() -> list[str]:
    """Every word of every prompt (for the tokenizers)."""
    words = set()
    for specs in all_prompts().values():
        for s in specs:
            words.update(s.text.split())
    return sorted(words)


def to_array(image) -> np.ndarray:
    """HxWx3 float array in [0, 1] from a PIL image or an array in [0, 1] / [0, 255]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    return arr / 255.0 if arr.max() > 1.5 else arr
