"""A richer procedural world (pilot of "world v2", issue 12 step 1) and novel concepts outside it.

Why: the shipped base has only ever seen five plain one-colour shapes, so a concept with a new
silhouette and a two-colour pattern is far outside anything it can draw. This world pretrains on
many named silhouettes and on one-, two- and three-colour layouts, so that a novel concept is a
*new combination* of things of the kind the base has learned to draw:

- scenes: 16 named silhouettes x layouts (solid; split, outlined, striped, checkered, dotted,
  ringed in two colours; banded, sectored in three) x the 8 palette colours, captioned like
  "a small red and white split hexagon on a blue background, top left" or
  "a red, white and blue banded heart on a green background";
- novel concepts (`make_novel_concept(seed)`): an unnamed silhouette the world never shows
  (Fourier blob, gear, irregular polygon), a two- or three-colour layout, and off-palette colours;
  so silhouette, layout and colours were never seen together;
- world v2 (`random_v2_scene`, `make_combination_concept`): a smaller rich world (10 silhouettes,
  5 layouts) whose concepts are objects of its own parts kept out of its pretraining: every part
  drawable, the whole new. Pilot V2 asks whether an adapter can teach those.

The held-out (shape, colour, background, position) combinations of share_lab.world are kept
out of the solid scenes, so that evaluation.base_quality still measures held-out prompts.
A pilot (issue 12, step 1): kept beside world.py until tiny base v4 settles the design.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from . import world

TWO_COLOUR = ("split", "outlined", "striped", "checkered", "dotted", "ringed")
THREE_COLOUR = ("banded", "sectored")
LAYOUTS = ("solid",) + TWO_COLOUR + THREE_COLOUR
_PATTERN_OF = {"striped": "stripes", "checkered": "checker", "dotted": "dots", "ringed": "rings"}


def _polar(radius_fn, n: int = 180) -> np.ndarray:
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = radius_fn(theta)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def _star(points: int, inner: float, phase: float = -np.pi / 2) -> np.ndarray:
    radius = np.tile([1.0, inner], points)
    angles = phase + np.arange(2 * points) * np.pi / points
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    return np.stack([x, y], axis=1)


def _crescent() -> np.ndarray:
    outer = np.linspace(0.35 * np.pi, 1.65 * np.pi, 90)
    inner = np.linspace(1.55 * np.pi, 0.45 * np.pi, 90)
    a = np.stack([np.cos(outer), np.sin(outer)], axis=1)
    b = np.stack([0.55 + 0.75 * np.cos(inner), 0.75 * np.sin(inner)], axis=1)
    return np.concatenate([a, b])


def _semicircle() -> np.ndarray:
    t = np.linspace(np.pi, 2 * np.pi, 90)
    return np.stack([np.cos(t), 0.5 + np.sin(t)], axis=1)


SILHOUETTES: dict[str, np.ndarray] = {name: world._normalise_outline(points) for name, points in {
    **{name: world.BASE_OUTLINES[name] for name in world.SHAPES},  # circle square triangle diamond cross
    "pentagon": world._regular(5, -np.pi / 2),
    "hexagon": world._regular(6),
    "octagon": world._regular(8, np.pi / 8),
    "star": _star(5, 0.45),
    "heart": _heart(),
    "crescent": _crescent(),
    "semicircle": _semicircle(),
    "oval": world._regular(96) * [1.0, 0.6],
    "trapezoid": np.array([(-1.0, 0.6), (1.0, 0.6), (0.5, -0.6), (-0.5, -0.6)]),
    "arrow": np.array([(-1, -0.3), (0.2, -0.3), (0.2, -0.8), (1, 0), (0.2, 0.8), (0.2, 0.3), (-1, 0.3)]),
    "tee": np.array([(-1, -1), (1, -1), (1, -0.4), (0.3, -0.4), (0.3, 1), (-0.3, 1), (-0.3, -0.4), (-1, -0.4)]),
}.items()}

CAPTION_WORDS = sorted(set(world.CAPTION_WORDS) | set(SILHOUETTES) | set(LAYOUTS) - {"solid"} | {"and"})


# --------------------------------------------------------------------------- rendering

def layout_index(layout: str, u: np.ndarray, v: np.ndarray, inner: np.ndarray, frequency: float,
                 pattern_angle: float) -> np.ndarray:
    """Colour index (0, 1 or 2) at object coordinates (u, v); `inner` is the eroded mask (for outlines)."""
    c, s = math.cos(pattern_angle), math.sin(pattern_angle)
    a = u * c + v * s  # coordinate across the split / bands
    if layout == "solid":
        return np.zeros(u.shape, dtype=int)
    if layout == "split":
        return (a > 0).astype(int)
    if layout == "outlined":
        return (~inner).astype(int)
    if layout in _PATTERN_OF:
        sprite = world.Sprite(np.zeros((3, 2)), ((0, 0, 0), (0, 0, 0)), _PATTERN_OF[layout], frequency, pattern_angle)
        return sprite.paint(u, v)
    if layout == "banded":
        return np.clip(np.floor((a + 1) * 1.5), 0, 2).astype(int)
    if layout == "sectored":
        return (np.floor(((np.arctan2(v, u) - pattern_angle) % (2 * np.pi)) / (2 * np.pi / 3))).astype(int) % 3
    raise ValueError(f"unknown layout {layout!r}")


OUTLINE_BAND = 0.2  # an outline's width, a fraction of the radius


def render_object(outline: np.ndarray, layout: str, colours, background, centre, diameter: float,
                  angle: float = 0.0, frequency: float = 3.0, pattern_angle: float = 0.0,
                  resolution: int = world.RESOLUTION) -> Image.Image:
    """One object on a plain background (world.render with more layouts); lengths in output pixels."""
    ss = world.SUPERSAMPLE
    side, radius = resolution * ss, diameter / 2 * ss
    cx, cy = (np.asarray(centre) * ss).tolist()
    c, s = math.cos(angle), math.sin(angle)
    rotated = outline @ np.array([[c, s], [-s, c]])
    mask_image = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask_image).polygon([(cx + radius * x, cy + radius * y) for x, y in rotated], fill=255)
    mask = np.asarray(mask_image) > 127
    inner = mask
    if layout == "outlined":  # a band of about 0.2 radius along the edge
        eroded = mask_image
        for _ in range(max(1, round(OUTLINE_BAND * radius))):
            eroded = eroded.filter(ImageFilter.MinFilter(3))
        inner = np.asarray(eroded) > 127
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    dx, dy = (xs - cx) / radius, (ys - cy) / radius
    u, v = dx * c + dy * s, -dx * s + dy * c
    palette = np.array(colours, dtype=np.uint8)
    index = np.clip(layout_index(layout, u, v, inner, frequency, pattern_angle), 0, len(palette) - 1)
    pixels = np.where(mask[..., None], palette[index], np.array(background, dtype=np.uint8))
    return Image.fromarray(pixels.astype(np.uint8)).resize((resolution, resolution), Image.Resampling.BOX)


def n_colours(layout: str) -> int:
    return 1 if layout == "solid" else 3 if layout in THREE_COLOUR else 2


# --------------------------------------------------------------------------- pretraining scenes

@dataclass(frozen=True)
class RichScene:
    """A pretraining image of the rich world; duck-types world.Scene for world.pretraining_caption."""

    shape: str
    layout: str
    colours: tuple[str, ...]
    background: str
    position: str
    size: str

    @property
    def colour(self) -> str:
        return self.colours[0]

    @property
    def subject(self) -> str:
        """"red hexagon", "red and white split hexagon", "red, white and blue banded hexagon"."""
        if self.layout == "solid":
            return f"{self.colour} {self.shape}"
        names = " and ".join(self.colours) if len(self.colours) == 2 else f"{self.colours[0]}, {self.colours[1]} and {self.colours[2]}"
        return f"{names} {self.layout} {self.shape}"

    def caption(self) -> str:
        return f"a {self.size} {self.subject} on a {self.background} background, {self.position}"

    def render(self, rng: np.random.Generator, resolution: int = world.RESOLUTION) -> Image.Image:
        diameter = rng.uniform(*world.SIZES[self.size]) * resolution
        # upright named shapes (a little rotation), patterns at any orientation
        return render_object(SILHOUETTES[self.shape], self.layout, [world.COLOURS[c] for c in self.colours],
                             world.COLOURS[self.background], world.place(self.position, diameter, rng, resolution),
                             diameter, angle=rng.uniform(-0.2, 0.2), frequency=rng.uniform(*world.PATTERN_FREQUENCY),
                             pattern_angle=rng.uniform(0, np.pi), resolution=resolution)


def random_rich_scene(rng: np.random.Generator, silhouettes=tuple(SILHOUETTES), layouts=LAYOUTS,
                      held_out=lambda shape, layout, colours: False) -> RichScene:
    """Uniform over silhouettes and layouts; colours distinct from each other and the background.

    Solid scenes of the five original shapes avoid world.HELDOUT_COMBOS (kept for evaluation), and
    no scene shows a (shape, layout, colours) combination that `held_out` reserves.
    """
    while True:
        shape = str(rng.choice(list(silhouettes)))
        layout = str(rng.choice(list(layouts)))
        names = [str(c) for c in rng.choice(list(world.COLOURS), size=n_colours(layout) + 1, replace=False)]
        background, colours, position = names[-1], tuple(names[:-1]), str(rng.choice(list(world.POSITIONS)))
        if layout == "solid" and (shape, colours[0], background, position) in world.HELDOUT_COMBOS:
            continue
        if held_out(shape, layout, colours):
            continue
        return RichScene(shape, layout, colours, background, position, str(rng.choice(list(world.SIZES))))


def rich_scenes(n: int, seed: int, sample=random_rich_scene) -> tuple[list[Image.Image], list[RichScene]]:
    rng = np.random.default_rng(seed)
    scenes = [sample(rng) for _ in range(n)]
    return [s.render(rng) for s in scenes], scenes


# --------------------------------------------------------------------------- novel concepts

NOVEL_KINDS = ("blob", "gear", "polygon")


def _novel_outline(kind: str, rng: np.random.Generator) -> np.ndarray:
    """An unnamed silhouette, unlike every named one (no regular polygon, no 5-point star)."""
    if kind == "blob":
        phases, amps = rng.uniform(0, 2 * np.pi, 4), rng.uniform(0.08, 0.25, 4)
        points = _polar(lambda t: 1 + sum(a * np.cos(k * t + p) for a, k, p in zip(amps, (2, 3, 4, 5), phases)))
    elif kind == "gear":
        points = _star(int(rng.integers(6, 10)), rng.uniform(0.6, 0.75), rng.uniform(0, np.pi))
    elif kind == "polygon":
        k = int(rng.integers(5, 8))
        angles = np.sort((np.arange(k) + rng.uniform(-0.3, 0.3, k)) * 2 * np.pi / k)
        radii = rng.uniform(0.55, 1.0, k)
        points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    else:
        raise ValueError(kind)
    return world._normalise_outline(points)


def _off_palette_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated colour at least 60 (RGB distance) from every palette colour."""
    while True:
        rgb = world._random_colour(rng)
        if min(world._distance(rgb, c) for c in world.COLOURS.values()) > 60:
            return rgb


@dataclass(frozen=True)
class NovelConcept:
    """A novel object (silhouette, layout, colours never seen together) taught by a trigger word.

    Offers the parts of world.Concept that world.concept_splits uses (seed, contexts, samples).
    """

    name: str
    trigger: str
    seed: int
    outline: np.ndarray
    layout: str
    colours: tuple[tuple[int, int, int], ...]
    frequency: float
    pattern_angle: float
    angle: float
    backgrounds: tuple[str, ...]

    def caption(self, background: str, position: str) -> str:
        return f"a photo of {self.trigger} on a {background} background, {position}"

    def render(self, background: str, position: str, rng: np.random.Generator, outline=None, colours=None,
               resolution: int = world.RESOLUTION) -> Image.Image:
        """The concept in one context (a little random size and rotation); outline/colours swap a part (near misses)."""
        diameter = rng.uniform(*world.CONCEPT_SIZE) * resolution
        return render_object(self.outline if outline is None else outline, self.layout,
                             self.colours if colours is None else colours, world.COLOURS[background],
                             world.place(position, diameter, rng, resolution), diameter,
                             self.angle + rng.uniform(-0.15, 0.15), self.frequency, self.pattern_angle, resolution)

    def contexts(self, n, rng, exclude=frozenset()):
        pool = [(b, p) for b in self.backgrounds for p in world.POSITIONS if (b, p) not in exclude]
        return [pool[i] for i in rng.permutation(len(pool))[:n]]

    def samples(self, contexts, rng) -> list[world.Sample]:
        return [world.Sample(self.render(b, p, rng), self.caption(b, p)) for b, p in contexts]


def make_novel_concept(index: int, world_seed: int = 12) -> NovelConcept:
    """Concept `index` of a novel-concept world; owns world.TRIGGER_WORDS[index]. Deterministic."""
    seed = world_seed * 1000 + index
    rng = np.random.default_rng(seed)
    kind = NOVEL_KINDS[index % len(NOVEL_KINDS)]
    layout = (TWO_COLOUR + THREE_COLOUR)[(index * 3 + world_seed) % (len(TWO_COLOUR) + len(THREE_COLOUR))]
    outline = _novel_outline(kind, rng)
    while True:  # clearly different colours
        colours = tuple(_off_palette_colour(rng) for _ in range(n_colours(layout)))
        if all(world._distance(a, b) > 120 for i, a in enumerate(colours) for b in colours[i + 1:]):
            break
    backgrounds = tuple(name for name, rgb in world.COLOURS.items() if min(world._distance(rgb, c) for c in colours) > 90)
    return NovelConcept(f"{layout}-{kind}-{index:02d}", world.TRIGGER_WORDS[index], seed, outline, layout, colours,
                        float(rng.uniform(*world.PATTERN_FREQUENCY)), float(rng.uniform(0, np.pi)),
                        float(rng.uniform(0, 2 * np.pi)), backgrounds)


def near_misses(concept: NovelConcept, n: int, rng: np.random.Generator) -> list[Image.Image]:
    """Images that are *not* the concept but share part of it: its colours and layout on a named
    silhouette, or its silhouette in other colours. Negatives for the identity classifier, so that
    the right colours alone (a colour smudge) do not count as the concept."""
    images = []
    for i in range(n):
        background, position = concept.contexts(1, rng)[0]
        if i % 2 == 0:
            outline = SILHOUETTES[str(rng.choice(list(SILHOUETTES)))]
            images.append(concept.render(background, position, rng, outline=outline))
        else:
            others = tuple(_off_palette_colour(rng) for _ in concept.colours)
            images.append(concept.render(background, position, rng, colours=others))
    return images


# --------------------------------------------------------------------------- world v2

# A smaller rich world (10 silhouettes x 5 layouts x 8 colours) whose base can be pretrained in
# about an hour of 2 CPU threads, and whose concepts are combinations the base never saw together:
# one in seven two-colour objects (silhouette, layout, colour pair) is kept out of pretraining and
# reserved for concepts (239 of 1680), so every part of a concept is drawable and the combination
# is new, as a DreamBooth subject is new to Stable Diffusion.
V2_SILHOUETTES = world.SHAPES + ("hexagon", "star", "heart", "crescent", "arrow")
V2_LAYOUTS = ("solid", "split", "outlined", "striped", "dotted")
V2_CAPTION_WORDS = sorted(set(world.CAPTION_WORDS) | set(V2_SILHOUETTES) | set(V2_LAYOUTS) - {"solid"} | {"and"})
# Swapping the two colours of a split or striped object gives the same kind of object (the split
# turned, the stripes shifted): one object, whichever colour is named first.
SYMMETRIC_LAYOUTS = ("split", "striped")


def _object_key(shape: str, layout: str, colours) -> tuple:
    return (shape, layout) + tuple(sorted(colours) if layout in SYMMETRIC_LAYOUTS else colours)


def is_concept_combination(shape: str, layout: str, colours: tuple[str, ...]) -> bool:
    """Is this object (silhouette, layout, colours) reserved for concepts? (a fixed hash: any seed)"""
    return layout != "solid" and zlib.crc32("|".join(_object_key(shape, layout, colours)).encode()) % 7 == 0


def random_v2_scene(rng: np.random.Generator) -> RichScene:
    return random_rich_scene(rng, V2_SILHOUETTES, V2_LAYOUTS, is_concept_combination)


def concept_combinations(world_seed: int = 0) -> list[tuple[str, str, tuple[str, str]]]:
    """The reserved (silhouette, layout, colours) combinations in a seeded order: concept i is entry i."""
    combos = [(shape, layout, (a, b)) for shape in V2_SILHOUETTES for layout in V2_LAYOUTS[1:]
              for a in world.COLOURS for b in world.COLOURS
              if a != b and (a < b or layout not in SYMMETRIC_LAYOUTS) and is_concept_combination(shape, layout, (a, b))]
    return [combos[i] for i in np.random.default_rng(world_seed).permutation(len(combos))]


@dataclass(frozen=True)
class CombinationConcept(NovelConcept):
    """A world-v2 concept: what a concept folder records (`world.write_concept`) besides the renders."""

    index: int = 0
    world_seed: int = 0
    shape: str = ""

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.trigger}"

    @property
    def description(self) -> str:
        first, second = self.name.split("-")[:2]
        return f"{'an' if first[0] in 'aeiou' else 'a'} {first} and {second} {self.layout} {self.shape}"

    def metadata(self) -> dict:
        return {"name": self.name, "trigger": self.trigger, "instance_prompt": self.instance_prompt,
                "seed": self.seed, "index": self.index, "world": "v2", "world_seed": self.world_seed,
                "description": self.description,
                "parts": {"shape": self.shape, "layout": self.layout, "colours": self.name.split("-")[:2]},
                "backgrounds": list(self.backgrounds)}


def make_combination_concept(index: int, world_seed: int = 0) -> CombinationConcept:
    """Concept `index` of world v2: a reserved combination, with its own pattern frequency and angle."""
    combos = concept_combinations(world_seed)
    if not 0 <= index < len(combos):
        raise ValueError(f"world v2 has {len(combos)} concepts, got index {index}")
    shape, layout, colours = combos[index]
    seed = world_seed * 1000 + index
    rng = np.random.default_rng(seed)
    backgrounds = tuple(name for name in world.COLOURS if name not in colours)
    return CombinationConcept(f"{colours[0]}-{colours[1]}-{layout}-{shape}", world.trigger_word(index), seed,
                              SILHOUETTES[shape], layout, tuple(world.COLOURS[c] for c in colours),
                              float(rng.uniform(*world.PATTERN_FREQUENCY)), float(rng.uniform(0, np.pi)), 0.0,
                              backgrounds, index, world_seed, shape)


def combination_near_misses(concept: NovelConcept, n: int, rng: np.random.Generator) -> list[Image.Image]:
    """Images that share all but one part of a combination concept: another silhouette, another
    layout, or other palette colours — so that only the whole combination counts as the concept."""
    images = []
    own = next(name for name, outline in SILHOUETTES.items() if outline is concept.outline)
    for i in range(n):
        background, position = concept.contexts(1, rng)[0]
        part = i % 3
        if part == 0:
            shape = str(rng.choice([s for s in V2_SILHOUETTES if s != own]))
            images.append(concept.render(background, position, rng, outline=SILHOUETTES[shape]))
        elif part == 1:
            layout = str(rng.choice([x for x in V2_LAYOUTS[1:] if x != concept.layout]))
            other = NovelConcept(concept.name, concept.trigger, concept.seed, concept.outline, layout, concept.colours,
                                 concept.frequency, concept.pattern_angle, concept.angle, concept.backgrounds)
            images.append(other.render(background, position, rng))
        else:
            names = [c for c in world.COLOURS if c != background]
            named = {rgb: name for name, rgb in world.COLOURS.items()}
            own_colours = _object_key(own, concept.layout, [named[tuple(c)] for c in concept.colours])
            while True:
                pick = tuple(str(c) for c in rng.choice(names, size=2, replace=False))
                if _object_key(own, concept.layout, pick) != own_colours:  # not the same object named the other way
                    break
            images.append(concept.render(background, position, rng, colours=tuple(world.COLOURS[c] for c in pick)))
    return images
