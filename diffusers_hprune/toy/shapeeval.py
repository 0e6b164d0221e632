"""ShapeEval: GenEval-style prompt adherence for the toy shapes, by classical image analysis.

Each image is segmented from its plain background (an image that is mostly not background, such as a
uniform image of one colour or noise, holds no object); foreground pixels take the
nearest palette colour; connected regions of one colour are objects; an object's
shape comes from how it fills its bounding box and how its width changes from top
to bottom. An image passes its prompt only if the detected objects are exactly
what the prompt asks for: count, shapes, colours where named, and the relation of
position prompts. Scores are averaged per category; ``overall`` is the mean of the
category scores (as GenEval does). Per-attribute accuracies (colour, shape, count,
position) tell damage to fine detail from damage to layout.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import numpy as np

from diffusers_hprune.toy.dataset import BACKGROUND, CATEGORIES, COLORS, parse_prompt, relation_holds, to_array

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32) / 255.0
_BG = np.array(BACKGROUND, dtype=np.float32) / 255.0
FOREGROUND_THRESHOLD = 0.3  # max channel distance from the background
MIN_AREA = 12  # pixels; smaller regions are speckle
#: The least share of an image that must be the toy's background for it to hold a drawing. The toy draws at most
#: 35 % of the canvas (one 19x19 shape on 32x32); an image of one colour, or of noise, is no drawing and holds no
#: object (it scored up to 35 % on colour prompts before: a uniform white image passed "a white square").
MIN_BACKGROUND = 0.4
ATTRIBUTES = ("color", "shape", "count", "position")


@dataclass
class Detection:
    color: str
    shape: str
    area: int
    center: tuple[float, float]  # x, y of the bounding-box centre
    box: tuple[int, int, int, int]


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of a boolean mask, as lists of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        out.append(pixels)
    return out


def _classify_shape(region: np.ndarray) -> str:
    """Shape of a binary region cropped to its bounding box."""
    h, w = region.shape
    fill = region.sum() / float(h * w)
    widths = region.sum(axis=1).astype(np.float32)
    third = max(1, h // 3)
    top, bottom = widths[:third].mean(), widths[-third:].mean()
    if top < 0.6 * bottom:
        return "triangle"
    return "square" if fill > 0.88 else "circle"


def detect_objects(image) -> list[Detection]:
    """The objects in one image (PIL image or HxWx3 array), largest first; none when less than
    :data:`MIN_BACKGROUND` of it is the background (a uniform image of any colour, noise)."""
    arr = to_array(image)[..., :3]
    foreground = np.abs(arr - _BG).max(axis=-1) > FOREGROUND_THRESHOLD
    if 1.0 - foreground.mean() < MIN_BACKGROUND:
        return []
    nearest = np.argmin(((arr[..., None, :] - _PALETTE) ** 2).sum(-1), axis=-1)
    found = []
    for k, name in enumerate(_PALETTE_NAMES):
        for pixels in _components(foreground & (nearest == k)):
            if len(pixels) < MIN_AREA:
                continue
            ys, xs = np.array(pixels).T
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            region = np.zeros((y1 - y0, x1 - x0), dtype=bool)
            region[ys - y0, xs - x0] = True
            found.append(
                Detection(name, _classify_shape(region), len(pixels), ((x0 + x1) / 2, (y0 + y1) / 2), (x0, y0, x1, y1))
            )
    return sorted(found, key=lambda d: -d.area)


def _matches(obj, det: Detection) -> int:
    return (obj.shape == det.shape) + (obj.color is None or obj.color == det.color)


def score_image(image, prompt: str) -> dict:
    """Judge one image against one prompt: ``strict`` plus each applicable attribute (True/False)."""
    spec = parse_prompt(prompt)
    dets = detect_objects(image)
    want = spec.objects
    result = {"category": spec.category, "detected": [(d.color, d.shape) for d in dets]}
    result["count"] = bool(len(dets) == len(want))
    # Best assignment of detections to the requested objects: most matched attributes, then
    # (for position prompts) one that satisfies the relation, e.g. for "a circle left of a circle".
    best = None
    if len(dets) >= len(want):
        for perm in itertools.permutations(range(len(dets)), len(want)):
            score = sum(_matches(o, dets[i]) for o, i in zip(want, perm))
            if spec.relation:
                score += 0.5 * relation_holds(spec.relation, dets[perm[0]].center, dets[perm[1]].center)
            if best is None or score > best[0]:
                best = (score, perm)
    assigned = [dets[i] for i in best[1]] if best else []
    result["shape"] = bool(assigned) and sorted(o.shape for o in want) == sorted(d.shape for d in assigned)
    if any(o.color for o in want):
        result["color"] = bool(assigned) and all(o.color is None or o.color == d.color for o, d in zip(want, assigned))
    if spec.relation:
        result["position"] = len(assigned) == 2 and bool(relation_holds(spec.relation, assigned[0].center, assigned[1].center))
    exact = bool(assigned) and all(_matches(o, d) == 2 for o, d in zip(want, assigned))
    result["strict"] = bool(result["count"] and exact and result.get("position", True))
    return result


def shapeeval(images, prompts, details: bool = False) -> dict:
    """Score images against their prompts, GenEval-style.

    Returns ``overall`` (mean of the category scores), one entry per category
    present (fraction of its images that pass strictly), and ``attribute_color``,
    ``attribute_shape``, ``attribute_count``, ``attribute_position`` (accuracy of
    each attribute over the prompts that ask for it); all in [0, 1]. With
    ``details=True`` also ``per_image``: the judgement of every image.
    """
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"shapeeval got {len(images)} images for {len(prompts)} prompts; pass one prompt per image.")
    if not images:
        raise ValueError("shapeeval needs at least one image.")
    judged = [score_image(im, p) for im, p in zip(images, prompts)]
    out: dict = {}
    per_category = {c: [j["strict"] for j in judged if j["category"] == c] for c in CATEGORIES}
    per_category = {c: v for c, v in per_category.items() if v}
    out["overall"] = float(np.mean([np.mean(v) for v in per_category.values()]))
    for c, v in per_category.items():
        out[c] = float(np.mean(v))
    for a in ATTRIBUTES:
        values = [j[a] for j in judged if a in j]
        if values:
            out[f"attribute_{a}"] = float(np.mean(values))
    if details:
        out["per_image"] = [dict(j, prompt=p) for j, p in zip(judged, prompts)]
    return out
