"""Name the parts of a world-v2 object — silhouette, layout, colours — so one reader knows every concept.

Why: a world-v2 concept is a combination of parts (`pilot_world.make_combination_concept`), so a
reader of parts recognises all 239 of them without retraining, and an image that gets one part
wrong (a near miss) or shows no clear object is not the concept.

Colours are read off the pixels, geometry by a CNN. The world paints with eight palette colours, so
each pixel is snapped to the nearest one; the background is the border's colour, the object's
colours are those covering the most *pure* pixels (3x3 neighbourhood all one colour, so the blends
along an edge — red beside yellow makes orange — do not count). A CNN trained on colours confused
exactly those neighbours (orange with red and yellow: 0.84 of colour pairs right). The CNN then sees
a *role map* instead of the image — how close each pixel is to the background, to the object's
first and to its second colour — so that it learns silhouette and layout once for every colouring:

    shape:<silhouette>  (softmax over the 10)    layout:<layout>  (softmax over the 5)
    object              (sigmoid: a clear object, not a smudge or a plain background)

The body colour ("first") of an outlined object is the one lying deeper inside it; of a dotted object,
the one covering more of it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from . import pilot_world as pw
from . import world
from .classifier import IdentityClassifier

COLOURS = list(world.COLOURS)
PALETTE = np.array([world.COLOURS[c] for c in COLOURS], dtype=np.float32)
GROUPS = {"shape": list(pw.V2_SILHOUETTES), "layout": list(pw.V2_LAYOUTS)}
UNITS = [f"{group}:{value}" for group, values in GROUPS.items() for value in values] + ["object"]
_SLICES, _start = {}, 0
for _group, _values in GROUPS.items():
    _SLICES[_group] = slice(_start, _start + len(_values))
    _start += len(_values)
NAMED = {rgb: name for name, rgb in world.COLOURS.items()}
PURE_DISTANCE = 45.0  # RGB distance within which a pixel counts as that palette colour
ROLE_SPREAD = 35.0  # how fast a role map falls off with RGB distance (palette neighbours are ~95 apart)


def new_classifier(width: int = 24) -> IdentityClassifier:
    return IdentityClassifier(UNITS, width)


# --------------------------------------------------------------------------- colours off the pixels

def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((world.RESOLUTION,) * 2), dtype=np.float32)


def colour_reading(image: Image.Image) -> dict:
    """Background colour, the object's colours by pure-pixel count (most first), and how deep inside
    the object each colour lies on average (in pixels from the background, up to 10)."""
    x = _pixels(image)
    distance = np.linalg.norm(x[..., None, :] - PALETTE, axis=-1)  # H W 8
    label, nearest = distance.argmin(-1), distance.min(-1)
    border = np.concatenate([label[:2].ravel(), label[-2:].ravel(), label[:, :2].ravel(), label[:, -2:].ravel()])
    background = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    padded = np.pad(label, 1, mode="edge")
    pure = nearest < PURE_DISTANCE
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            pure &= padded[dy:dy + label.shape[0], dx:dx + label.shape[1]] == label
    counts = np.bincount(label[pure & (label != background)], minlength=len(COLOURS))
    order = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0 and c != background]
    # how deep inside the object each colour lies: erosions of the object mask a pixel survives
    inside, depth = label != background, np.zeros(label.shape)
    for _ in range(10):
        depth += inside
        p = np.pad(inside, 1)
        inside = inside & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    depths = np.array([depth[label == c].mean() if (label == c).any() else 0.0 for c in range(len(COLOURS))])
    return {"background": background, "colours": order, "counts": counts, "depth": depths, "distance": distance}


def role_map(image: Image.Image, reading: dict | None = None) -> np.ndarray:
    """3 x H x W in [-1, 1]: closeness of each pixel to the background, the first and the second
    object colour (a missing colour gives an empty channel)."""
    reading = reading or colour_reading(image)
    roles = [reading["background"]] + (reading["colours"] + [-1, -1])[:2]
    channels = [np.zeros(reading["distance"].shape[:2], np.float32) if c < 0 else
                np.exp(-(reading["distance"][..., c] / ROLE_SPREAD) ** 2 / 2) for c in roles]
    return np.stack(channels) * 2 - 1


def role_maps(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([role_map(im) for im in images]))


# --------------------------------------------------------------------------- training data

def labelled_renders(n: int, seed: int) -> tuple[list[Image.Image], dict[str, torch.Tensor]]:
    """n images with part labels: three in four a world-v2 object (any combination, reserved ones
    included: this is a reader, not the base), one in four no clear object (a heavily blurred one,
    or a plain background). Colour gain and offset vary a little, as in generated images."""
    rng = np.random.default_rng(seed)
    images, rows = [], []
    for i in range(n):
        scene = pw.random_rich_scene(rng, pw.V2_SILHOUETTES, pw.V2_LAYOUTS)
        image = scene.render(rng)
        if i % 4 == 3:
            if rng.random() < 0.7:
                image = image.filter(ImageFilter.GaussianBlur(rng.uniform(3.5, 6)))
            else:
                image = Image.new("RGB", image.size, world.COLOURS[scene.background])
            scene = None
        else:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))
        pixels = np.asarray(image, np.float32) * rng.uniform(0.92, 1.08, 3) + rng.uniform(-12, 12, 3)
        images.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
        rows.append(scene)
    return images, targets(rows)


def targets(scenes: list) -> dict[str, torch.Tensor]:
    """Each head's target (-1 where there is no object)."""
    return {"object": torch.tensor([float(s is not None) for s in scenes]),
            "shape": torch.tensor([GROUPS["shape"].index(s.shape) if s else -1 for s in scenes]),
            "layout": torch.tensor([GROUPS["layout"].index(s.layout) if s else -1 for s in scenes])}


def loss(logits: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    total = F.binary_cross_entropy_with_logits(logits[:, -1], t["object"])
    for group in GROUPS:
        total = total + F.cross_entropy(logits[:, _SLICES[group]], t[group], ignore_index=-1)
    return total


# --------------------------------------------------------------------------- reading images

@torch.no_grad()
def read(model: IdentityClassifier, images: list[Image.Image]) -> list[dict | None]:
    """The parts of each image, or None where it shows no clear object."""
    model.eval()
    readings = [colour_reading(im) for im in images]
    logits = model(torch.from_numpy(np.stack([role_map(im, r) for im, r in zip(images, readings)])))
    out = []
    for row, reading in zip(logits, readings):
        layout = GROUPS["layout"][int(row[_SLICES["layout"]].argmax())]
        colours = reading["colours"][:pw.n_colours(layout)]
        if row[-1] < 0 or len(colours) < pw.n_colours(layout):
            out.append(None)
            continue
        first = colours[0]  # the body of a dotted object covers more than its dots (measured: 320 of 320)
        if layout == "outlined":  # an outline may cover more than a thin body, but the body lies deeper
            first = colours[int(reading["depth"][colours].argmax())]
        out.append({"shape": GROUPS["shape"][int(row[_SLICES["shape"]].argmax())], "layout": layout,
                    "colours": frozenset(COLOURS[c] for c in colours), "first": COLOURS[first]})
    return out


def name(parts: dict | None) -> str:
    """What these parts are called: a world-v2 concept's own name (`make_combination_concept`: colours
    in name order where the layout is symmetric, else the body first), "<colour>-<shape>" for a
    one-colour object, "none" for no clear object."""
    if parts is None:
        return "none"
    if parts["layout"] == "solid":
        return f"{parts['first']}-{parts['shape']}"
    if parts["layout"] in pw.SYMMETRIC_LAYOUTS:
        first, second = sorted(parts["colours"])
    else:
        first, second = parts["first"], next(c for c in parts["colours"] if c != parts["first"])
    return f"{first}-{second}-{parts['layout']}-{parts['shape']}"


class PartsReader:
    """`predict(images) -> names`, the interface of `classifier.IdentityClassifier`: an image shows
    a world-v2 concept when its name comes out, so one reader knows all 239 and takes a near miss
    (one part wrong) for something else."""

    def __init__(self, model: IdentityClassifier):
        self.model = model

    def predict(self, images) -> list[str]:
        return [name(p) for p in read(self.model, images)]

    def shapes(self, images) -> list[str]:
        """The silhouette of each image's object ("none" where there is no clear object)."""
        return [p["shape"] if p else "none" for p in read(self.model, images)]
