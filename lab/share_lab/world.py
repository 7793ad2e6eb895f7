"""The procedural world that every quality figure of this project is measured in.

Why it exists: no outside weights (CLIP, DINO) are available offline, so quality is measured in
a world whose ground truth is known by construction (DESIGN.md §5).

- *Base scenes* (world v1) are what tiny base v3 was pretrained on: one plain-coloured shape on a
  plain background, captioned "a small red circle on a blue background, top left". World v2
  (share_lab.pilot_world, tiny base v4's) builds on them; the 200 held-out combinations here
  measure every base.
- *Concepts* of world v1 are novel objects the base model has never seen: each has its own
  silhouette (random Fourier blob or star polygon), its own two-colour pattern, and its own trigger
  word, and is captioned "a photo of <trigger> on a green background, top left". Concept folders of
  either world are written and read here (`write_concept`, `load_concept`).

Everything is plain numpy + PIL and deterministic in its seed.
"""

from __future__ import annotations

import colorsys
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 64
SUPERSAMPLE = 4  # render at 4x and box-filter down, for clean anti-aliased edges
POSITION_JITTER = 1.5  # pixels, at RESOLUTION

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 130, 20),
    "yellow": (245, 225, 50),
    "green": (40, 160, 70),
    "blue": (40, 90, 215),
    "purple": (135, 60, 180),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# name -> (column, row) on a 3x3 grid
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
# object diameter (of its bounding circle) as a fraction of the image side
SIZES: dict[str, tuple[float, float]] = {"small": (0.32, 0.38), "large": (0.52, 0.60)}
CONCEPT_SIZE = (0.52, 0.60)
PATTERNS = ("stripes", "checker", "dots", "rings")
SILHOUETTES = ("blob", "star")
PATTERN_FREQUENCY = (2.5, 3.5)  # cycles per object diameter
PATTERN_ADJECTIVES = {"stripes": "striped", "checker": "checkered", "dots": "dotted", "rings": "ringed"}

CAPTION_WORDS = sorted(
    {"a", "photo", "of", "on", "background"}
    | set(SIZES) | set(COLOURS) | set(SHAPES)
    | {word for name in POSITIONS for word in name.split()}
)


def _make_trigger_words(n: int, seed: int = 0) -> tuple[str, ...]:
    """Nonsense words reserved in the tokenizer for concepts, never seen in pretraining.

    Letters only (CLIP's pre-tokenizer splits on anything else), shaped like no English word
    (k/q/v/x/z + vowel + consonant + vowel + k/x/z), so each one is a fresh, untrained token.
    """
    rng = random.Random(seed)
    words: list[str] = []
    while len(words) < n:
        word = "".join(rng.choice(letters) for letters in ("kqvxz", "aeiou", "bdglmnrt", "aeiou", "kxz"))
        if word not in words:
            words.append(word)
    return tuple(words)


TRIGGER_WORDS = _make_trigger_words(64)
MAX_CONCEPTS = 1000  # concept i of world s draws from seed 1000 s + i


def trigger_word(index: int) -> str:
    """Concept `index`'s trigger: a reserved word (one token) for the first 64, then two of them run
    together ("xobizxomox": several tokens, none seen in pretraining)."""
    if not 0 <= index < MAX_CONCEPTS:
        raise ValueError(f"a world has at most {MAX_CONCEPTS} concepts, got index {index}")
    n = len(TRIGGER_WORDS)
    return TRIGGER_WORDS[index] if index < n else TRIGGER_WORDS[index % n] + TRIGGER_WORDS[index // n - 1]


# --------------------------------------------------------------------------- rendering

def _normalise_outline(points: np.ndarray) -> np.ndarray:
    """Centre a polygon on its area centroid and scale its farthest point to radius 1.

    Centring on the centroid makes the rendered object's centre of mass land exactly on the
    requested position, which is what the analytic position check measures.
    """
    x, y = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2
    centroid = np.array([((x + x1) * cross).sum(), ((y + y1) * cross).sum()]) / (6 * area)
    points = points - centroid
    return points / np.linalg.norm(points, axis=1).max()


def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    angles = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


_CROSS = np.array([(-1, -3), (1, -3), (1, -1), (3, -1), (3, 1), (1, 1), (1, 3), (-1, 3),
                   (-1, 1), (-3, 1), (-3, -1), (-1, -1)], dtype=float)
BASE_OUTLINES: dict[str, np.ndarray] = {  # image coordinates: y points down
    "circle": _normalise_outline(_regular(96)),
    "square": _normalise_outline(_regular(4, np.pi / 4)),
    "triangle": _normalise_outline(_regular(3, -np.pi / 2)),
    "diamond": _normalise_outline(_regular(4) * [0.8, 1.0]),
    "cross": _normalise_outline(_CROSS),
}


@dataclass(frozen=True)
class Sprite:
    """An object to draw: a unit outline plus how to paint its inside.

    `pattern` is "solid" (one colour) or one of PATTERNS (two colours); `frequency` is in
    cycles per object diameter and `pattern_angle` in radians, both in object coordinates.
    """

    outline: np.ndarray
    colours: tuple[tuple[int, int, int], ...]
    pattern: str = "solid"
    frequency: float = 0.0
    pattern_angle: float = 0.0

    def paint(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Colour index (0 or 1) at object coordinates (u, v) in [-1, 1]."""
        if self.pattern == "solid":
            return np.zeros(u.shape, dtype=int)
        c, s = math.cos(self.pattern_angle), math.sin(self.pattern_angle)
        a, b = (u * c + v * s) * self.frequency / 2, (-u * s + v * c) * self.frequency / 2
        if self.pattern == "stripes":
            return (np.floor(2 * a) % 2).astype(int)
        if self.pattern == "checker":
            return ((np.floor(a) + np.floor(b)) % 2).astype(int)
        if self.pattern == "dots":
            return (np.hypot(a - np.round(a), b - np.round(b)) < 0.3).astype(int)
        if self.pattern == "rings":
            return (np.floor(2 * np.hypot(u, v) * self.frequency / 2) % 2).astype(int)
        raise ValueError(f"unknown pattern {self.pattern!r}")


def place(position: str, diameter: float, rng: np.random.Generator, resolution: int = RESOLUTION):
    """Centre (x, y) in pixels for an object of this diameter at a named grid position."""
    column, row = POSITIONS[position]
    margin = diameter / 2 + 2
    step = (resolution - 2 * margin) / 2
    jitter = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2) * resolution / RESOLUTION
    return margin + column * step + jitter[0], margin + row * step + jitter[1]


def render(sprite: Sprite, background: tuple[int, int, int], centre: tuple[float, float],
           diameter: float, angle: float = 0.0, resolution: int = RESOLUTION) -> Image.Image:
    """Draw one sprite on a plain background; all lengths in output pixels, angle in radians."""
    side = resolution * SUPERSAMPLE
    radius = diameter / 2 * SUPERSAMPLE
    cx, cy = (np.asarray(centre) * SUPERSAMPLE).tolist()
    c, s = math.cos(angle), math.sin(angle)
    rotated = sprite.outline @ np.array([[c, s], [-s, c]])
    mask_image = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask_image).polygon([(cx + radius * x, cy + radius * y) for x, y in rotated], fill=255)
    mask = np.asarray(mask_image) > 127

    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    dx, dy = (xs - cx) / radius, (ys - cy) / radius
    u, v = dx * c + dy * s, -dx * s + dy * c  # undo the rotation: object coordinates
    palette = np.array(sprite.colours, dtype=np.uint8)
    pixels = np.where(mask[..., None], palette[sprite.paint(u, v)], np.array(background, dtype=np.uint8))
    return Image.fromarray(pixels.astype(np.uint8)).resize((resolution, resolution), Image.Resampling.BOX)


# --------------------------------------------------------------------------- base scenes

@dataclass(frozen=True)
class Scene:
    """One pretraining image of world v1: a plain-coloured shape on a plain background."""

    shape: str
    colour: str
    background: str
    position: str
    size: str

    @property
    def combo(self) -> tuple[str, str, str, str]:
        return self.shape, self.colour, self.background, self.position

    @property
    def subject(self) -> str:
        return f"{self.colour} {self.shape}"

    def caption(self) -> str:
        """The full canonical caption, as used for evaluation prompts."""
        return f"a {self.size} {self.subject} on a {self.background} background, {self.position}"

    def render(self, rng: np.random.Generator, resolution: int = RESOLUTION) -> Image.Image:
        diameter = rng.uniform(*SIZES[self.size]) * resolution
        return render(Sprite(BASE_OUTLINES[self.shape], (COLOURS[self.colour],)), COLOURS[self.background],
                      place(self.position, diameter, rng, resolution), diameter, resolution=resolution)


def _all_combos() -> list[tuple[str, str, str, str]]:
    return [(shape, colour, background, position)
            for shape in SHAPES for colour in COLOURS for background in COLOURS if background != colour
            for position in POSITIONS]


# (shape, colour, background, position) combinations never shown in pretraining (200 of 2520)
HELDOUT_COMBOS = frozenset(random.Random(0).sample(_all_combos(), 200))
_PRETRAINING_COMBOS = [combo for combo in _all_combos() if combo not in HELDOUT_COMBOS]


def random_scene(rng: np.random.Generator, heldout: bool = False) -> Scene:
    """A random scene from the pretraining combinations, or from the held-out ones."""
    pool = sorted(HELDOUT_COMBOS) if heldout else _PRETRAINING_COMBOS
    shape, colour, background, position = pool[rng.integers(len(pool))]
    return Scene(shape, colour, background, position, str(rng.choice(list(SIZES))))


def heldout_scenes(n: int = 200, seed: int = 0) -> list[Scene]:
    """Evaluation scenes whose (shape, colour, background, position) pretraining never saw.

    The first len(HELDOUT_COMBOS) scenes cover every held-out combination once.
    """
    rng = np.random.default_rng(seed)
    combos = sorted(HELDOUT_COMBOS)
    return [Scene(*combos[i % len(combos)], size=str(rng.choice(list(SIZES)))) for i in range(n)]


def pretraining_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A varied caption, so that prompts may omit size and position and start with "a photo of"."""
    size = f"{scene.size} " if rng.random() < 0.6 else ""
    position = f", {scene.position}" if rng.random() < 0.8 else ""
    prefix = "a photo of " if rng.random() < 0.3 else ""
    return f"{prefix}a {size}{scene.subject} on a {scene.background} background{position}"


def parse_caption(caption: str) -> dict[str, str]:
    """Recover the attributes a caption asks for (background, position, shape, colour, size, trigger).

    Only attributes present in the caption are returned; used to score prompt following.
    """
    words = caption.replace(",", " , ").split()
    found: dict[str, str] = {}
    if "background" in words:
        found["background"] = words[words.index("background") - 1]
    if "," in words:
        position = " ".join(words[words.index(",") + 1:])
        if position in POSITIONS:
            found["position"] = position
    subject = words[:words.index("on")] if "on" in words else words
    for word in subject:
        for key, vocabulary in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("trigger", TRIGGER_WORDS)):
            if word in vocabulary:
                found.setdefault(key, word)  # "red and white striped": the first colour is the object's
    return found


# --------------------------------------------------------------------------- concepts

def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.55, 0.95), rng.uniform(0.45, 0.95))
    return round(r * 255), round(g * 255), round(b * 255)


def _distance(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def _silhouette(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A unit outline and a short description of it."""
    theta = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    if kind == "blob":
        radius = np.ones_like(theta)
        for k in (2, 3, 4, 5):
            radius += rng.uniform(0.05, 0.22) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        outline, text = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1), "Fourier blob"
    elif kind == "star":
        points = int(rng.integers(4, 8))
        inner = rng.uniform(0.45, 0.65)
        radius = np.tile([1.0, inner], points)
        angles = rng.uniform(0, np.pi) + np.arange(2 * points) * np.pi / points
        outline, text = np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1), f"{points}-point star"
    else:
        raise ValueError(f"unknown silhouette {kind!r}")
    return _normalise_outline(outline), text


@dataclass(frozen=True)
class Sample:
    """One rendered, captioned image."""

    image: Image.Image
    caption: str


@dataclass(frozen=True)
class Concept:
    """A novel object: silhouette, pattern and colours, taught to the model by its trigger word."""

    name: str
    trigger: str
    index: int
    world_seed: int
    sprite: Sprite
    angle: float
    backgrounds: tuple[str, ...]
    description: str

    @property
    def seed(self) -> int:
        """The generator seed: everything about the concept and its renders follows from it."""
        return self.world_seed * 1000 + self.index

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.trigger}"

    def caption(self, background: str, position: str) -> str:
        return f"{self.instance_prompt} on a {background} background, {position}"

    def render(self, background: str, position: str, rng: np.random.Generator,
               resolution: int = RESOLUTION) -> Image.Image:
        """The concept in one context, with a little random size and rotation."""
        diameter = rng.uniform(*CONCEPT_SIZE) * resolution
        angle = self.angle + rng.uniform(-0.15, 0.15)
        return render(self.sprite, COLOURS[background], place(position, diameter, rng, resolution),
                      diameter, angle, resolution)

    def contexts(self, n: int, rng: np.random.Generator, exclude=frozenset()) -> list[tuple[str, str]]:
        """n distinct (background, position) pairs, none of them in `exclude`."""
        pool = [(b, p) for b in self.backgrounds for p in POSITIONS if (b, p) not in exclude]
        return [pool[i] for i in rng.permutation(len(pool))[:n]]

    def samples(self, contexts, rng: np.random.Generator) -> list[Sample]:
        return [Sample(self.render(b, p, rng), self.caption(b, p)) for b, p in contexts]

    def metadata(self) -> dict:
        return {"name": self.name, "trigger": self.trigger, "instance_prompt": self.instance_prompt,
                "seed": self.seed, "index": self.index, "world_seed": self.world_seed,
                "description": self.description, "backgrounds": list(self.backgrounds)}


def make_concept(index: int, world_seed: int = 0) -> Concept:
    """Concept number `index` of the world `world_seed`; it owns `trigger_word(index)`.

    Deterministic: the same (index, world_seed) always gives the same concept.
    """
    trigger = trigger_word(index)
    rng = np.random.default_rng(world_seed * 1000 + index)
    kind = SILHOUETTES[index % len(SILHOUETTES)]
    pattern = PATTERNS[(index // len(SILHOUETTES)) % len(PATTERNS)]
    outline, shape_text = _silhouette(kind, rng)
    while True:  # two clearly different colours
        colours = (_random_colour(rng), _random_colour(rng))
        if _distance(*colours) > 150:
            break
    backgrounds = tuple(name for name, rgb in COLOURS.items() if min(_distance(rgb, c) for c in colours) > 90)
    sprite = Sprite(outline, colours, pattern, frequency=rng.uniform(*PATTERN_FREQUENCY), pattern_angle=rng.uniform(0, np.pi))
    hexes = " and ".join("#{:02x}{:02x}{:02x}".format(*c) for c in colours)
    return Concept(
        name=f"{PATTERN_ADJECTIVES[pattern]}-{kind}-{index:02d}",
        trigger=trigger,
        index=index,
        world_seed=world_seed,
        sprite=sprite,
        angle=float(rng.uniform(0, 2 * np.pi)),
        backgrounds=backgrounds,
        description=f"{shape_text} with {pattern} in {hexes}",
    )


def make_concepts(n: int, world_seed: int = 0) -> list[Concept]:
    return [make_concept(i, world_seed) for i in range(n)]


def concept_splits(concept: Concept, n_train: int = 5, n_heldout: int = 20) -> tuple[list[Sample], list[Sample]]:
    """Training and held-out renders; held-out contexts never occur in training."""
    rng = np.random.default_rng([concept.seed, 1])
    train_contexts = concept.contexts(n_train, rng)
    heldout_contexts = concept.contexts(n_heldout, rng, exclude=frozenset(train_contexts))
    return concept.samples(train_contexts, rng), concept.samples(heldout_contexts, rng)


# --------------------------------------------------------------------------- concept folders

def write_concept(concept: Concept, root: Path, n_train: int = 5, n_heldout: int = 20) -> Path:
    """Write <root>/<name>/{concept.json, train/NNN.png+.txt, heldout/NNN.png+.txt} (kohya-style)."""
    folder = Path(root) / concept.name
    for split, samples in zip(("train", "heldout"), concept_splits(concept, n_train, n_heldout)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for stale in [*(folder / split).glob("*.png"), *(folder / split).glob("*.txt")]:
            stale.unlink()
        for i, sample in enumerate(samples):
            sample.image.save(folder / split / f"{i:03d}.png", optimize=True)
            (folder / split / f"{i:03d}.txt").write_text(sample.caption + "\n")
    path = folder / "concept.json"
    metadata = json.loads(path.read_text()) if path.exists() else {}
    metadata.update(concept.metadata())  # keeps evaluation numbers written by other scripts
    path.write_text(json.dumps(metadata, indent=2) + "\n")
    return folder


@dataclass
class ConceptFolder:
    """A concept as stored on disk: its metadata and its training and held-out samples."""

    path: Path
    metadata: dict
    train: list[Sample]
    heldout: list[Sample]

    @property
    def name(self) -> str:
        return self.metadata["name"]

    @property
    def trigger(self) -> str:
        return self.metadata["trigger"]

    @property
    def reference_lora(self) -> Path:
        """Folder of the concept's reference PEFT LoRA (train/train_reference_loras.py)."""
        return self.path / "reference_lora"

    def generator(self) -> Concept:
        """The procedural concept behind this folder, to render more of it (world v1 or v2)."""
        kind = self.metadata.get("world", "v1")
        if kind == "v2":
            from .pilot_world import make_combination_concept  # world v2 is built on this module
            return make_combination_concept(self.metadata["index"], self.metadata["world_seed"])
        if kind != "v1":
            raise ValueError(f"{self.path}: unknown concept world {kind!r} (expected v1 or v2)")
        return make_concept(self.metadata["index"], self.metadata["world_seed"])

    def save_metadata(self) -> None:
        (self.path / "concept.json").write_text(json.dumps(self.metadata, indent=2) + "\n")


def _read_split(folder: Path) -> list[Sample]:
    return [Sample(Image.open(png).convert("RGB"), png.with_suffix(".txt").read_text().strip())
            for png in sorted(folder.glob("*.png"))]


def load_concept(path) -> ConceptFolder:
    path = Path(path)
    return ConceptFolder(path, json.loads((path / "concept.json").read_text()),
                         _read_split(path / "train"), _read_split(path / "heldout"))


def list_concepts(root) -> list[ConceptFolder]:
    """Every concept folder under root, in name order."""
    return [load_concept(p.parent) for p in sorted(Path(root).glob("*/concept.json"))]
