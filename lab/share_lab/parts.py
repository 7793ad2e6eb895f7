"""Name the parts of a world-v2 object — silhouette, layout, colours — so one classifier knows every concept.

Why: a world-v2 concept is a combination of parts (`pilot_world.make_combination_concept`), so a
classifier of parts recognises all 239 of them without retraining, and an image that gets one part
wrong (a near miss) or shows no clear object is not the concept. The network is the identity
classifier's CNN (`evaluation.IdentityClassifier`) with one output unit per part value:

    shape:<silhouette>   (softmax over the 10)     colour:<name>  (sigmoid: which colours are in it)
    layout:<layout>      (softmax over the 5)      first:<name>   (softmax: the body of an outlined or
    object               (sigmoid: a clear object)                 dotted object, the one named first)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from . import pilot_world as pw
from . import world
from .evaluation import IdentityClassifier, to_batch

COLOURS = list(world.COLOURS)
GROUPS = {"shape": list(pw.V2_SILHOUETTES), "layout": list(pw.V2_LAYOUTS), "colour": COLOURS, "first": COLOURS}
UNITS = [f"{group}:{value}" for group, values in GROUPS.items() for value in values] + ["object"]
_SLICES, _start = {}, 0
for _group, _values in GROUPS.items():
    _SLICES[_group] = slice(_start, _start + len(_values))
    _start += len(_values)
NAMED = {rgb: name for name, rgb in world.COLOURS.items()}


def new_classifier(width: int = 24) -> IdentityClassifier:
    return IdentityClassifier(UNITS, width)


# --------------------------------------------------------------------------- training data

def labelled_renders(n: int, seed: int) -> tuple[list[Image.Image], dict[str, torch.Tensor]]:
    """n images with part labels: three in four a world-v2 object (any combination, reserved ones
    included: this is a classifier, not the base), one in four no clear object (a heavily blurred
    one, or a plain background)."""
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
        images.append(image)
        rows.append(scene)
    return images, targets(rows)


def targets(scenes: list) -> dict[str, torch.Tensor]:
    """Each head's target (-1 where it does not apply: no object, or no first colour of a symmetric layout)."""
    t = {"shape": [], "layout": [], "colour": [], "first": [], "object": []}
    for s in scenes:
        t["object"].append(float(s is not None))
        t["shape"].append(GROUPS["shape"].index(s.shape) if s else -1)
        t["layout"].append(GROUPS["layout"].index(s.layout) if s else -1)
        t["colour"].append([float(s is not None and c in s.colours) for c in COLOURS])
        ordered = s is not None and s.layout not in pw.SYMMETRIC_LAYOUTS
        t["first"].append(COLOURS.index(s.colours[0]) if ordered else -1)
    return {k: torch.tensor(v) for k, v in t.items()}


def loss(logits: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    obj = t["object"] > 0
    total = F.binary_cross_entropy_with_logits(logits[:, -1], t["object"])
    for group in ("shape", "layout", "first"):
        total = total + F.cross_entropy(logits[:, _SLICES[group]], t[group], ignore_index=-1)
    if obj.any():
        total = total + F.binary_cross_entropy_with_logits(logits[obj, _SLICES["colour"]], t["colour"][obj])
    return total


# --------------------------------------------------------------------------- reading images

@torch.no_grad()
def read(model: IdentityClassifier, images: list[Image.Image]) -> list[dict | None]:
    """The parts of each image, or None where it shows no clear object."""
    model.eval()
    logits = model(to_batch([im.convert("RGB").resize((world.RESOLUTION,) * 2) for im in images]))
    out = []
    for row in logits:
        if row[-1] < 0:
            out.append(None)
            continue
        shape = GROUPS["shape"][int(row[_SLICES["shape"]].argmax())]
        layout = GROUPS["layout"][int(row[_SLICES["layout"]].argmax())]
        colours = row[_SLICES["colour"]].argsort(descending=True)[:pw.n_colours(layout)].tolist()
        out.append({"shape": shape, "layout": layout, "colours": frozenset(COLOURS[c] for c in colours),
                    "first": COLOURS[int(row[_SLICES["first"]].argmax())]})
    return out


def matches(parts: dict | None, concept: pw.NovelConcept) -> bool:
    """Do these parts make this combination concept? (the first colour counts where the layout orders them)"""
    if parts is None:
        return False
    names = [NAMED[tuple(c)] for c in concept.colours]
    shape = next(name for name, outline in pw.SILHOUETTES.items() if outline is concept.outline)
    same = parts["shape"] == shape and parts["layout"] == concept.layout and parts["colours"] == frozenset(names)
    return same and (concept.layout in pw.SYMMETRIC_LAYOUTS or parts["first"] == names[0])


class ConceptReader:
    """`predict(images) -> names` over a set of combination concepts ("none" where no concept
    matches), the interface of `evaluation.IdentityClassifier`."""

    def __init__(self, model: IdentityClassifier, concepts: list[pw.NovelConcept]):
        self.model, self.concepts = model, concepts

    def predict(self, images) -> list[str]:
        parts = read(self.model, images)
        return [next((c.name for c in self.concepts if matches(p, c)), "none") for p in parts]
