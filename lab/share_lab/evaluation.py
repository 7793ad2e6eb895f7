"""Quality metrics in the procedural world (DESIGN.md §5), for any StableDiffusionPipeline.

Every function takes a pipeline and measures whatever adapter is active on it (PEFT LoRA, Share,
a fused model...), so one set of metrics serves the tests, the benchmarks and every baseline.

- Fidelity to a concept: held-out denoising loss on fixed timesteps and noises, normalised so that
  the base model scores 0 and an independent per-concept LoRA scores 1 (`normalized_score`).
- What generated images show: a small CNN trained from scratch on renders names the object
  (`identity_accuracy`, with its `wilson_interval`; base-shape accuracy); analytic checks read the background colour, the
  object's colour and its position.
- Which concept an image shows, without generating: `discriminative_identity` (the argmin of
  the held-out loss over every learned concept's selection and trigger; confusion matrix).
- Continual learning: `continual_metrics` and `continual_curves` of the matrix R[i, j] = score
  on concept j after learning concept i.
- Damage to the base model: `drift` on prompts that mention no concept, and `base_quality`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from share_diffusers.training import heldout_loss, heldout_losses

from . import CLASSIFIER, parts, world
from .classifier import IdentityClassifier, to_batch

DEFAULT_STEPS = 25
# Classifier-free guidance of every generated-image figure. Tiny base v6 (which predicts v) draws
# learned concepts most often at 1.5: reference LoRAs at 1.5 / 2.5 / 5 drew theirs in 0.84 / 0.77 / 0.53
# of images, while the base still follows every prompt part (benchmarks/recipe.py; docs/results/).
DEFAULT_GUIDANCE = 1.5


# --------------------------------------------------------------------------- generation

@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 8, **pipe_kwargs) -> list[Image.Image]:
    """Images for prompts; image i depends only on (prompt i, seed + i), never on the batching."""
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        images += pipe(batch, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                       **pipe_kwargs).images
    return images


# --------------------------------------------------------------------------- held-out denoising loss

def normalized_score(loss: float, base_loss: float, ref_loss: float) -> float:
    """(L_base - L) / (L_base - L_ref): 0 = the untouched base model, 1 = the reference LoRA."""
    return (base_loss - loss) / (base_loss - ref_loss)


def concept_score(pipe, concept: world.ConceptFolder, **loss_kwargs) -> float:
    """Normalised held-out score of the pipeline on a concept, using its stored base/reference losses."""
    stored = concept.metadata["evaluation"]
    loss = heldout_loss(pipe, [s.image for s in concept.heldout], [s.caption for s in concept.heldout],
                        seed=stored["loss_seed"], **loss_kwargs)
    return normalized_score(loss, stored["base_loss"], stored["reference_loss"])


# --------------------------------------------------------------------------- identity classifier

def load_identity_classifier(path=CLASSIFIER):
    """A saved identity classifier in eval mode: the shipped one (train/train_classifier.py), or a
    world-v2 parts reader (`parts.PartsReader`); each has ``predict(images) -> names``."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    model = IdentityClassifier(config["classes"], config["width"])
    model.load_state_dict(load_file(path / "model.safetensors"))
    model.eval()
    return parts.PartsReader(model) if config.get("kind") == "parts" else model


# --------------------------------------------------------------------------- analytic checks

def nearest_colour(rgb) -> str:
    """The palette colour name closest to an RGB triple."""
    names = list(world.COLOURS)
    distances = np.linalg.norm(np.array([world.COLOURS[n] for n in names], float) - np.asarray(rgb, float), axis=1)
    return names[int(distances.argmin())]


def _background_rgb(image) -> np.ndarray:
    # objects cover well under half the image, so the per-channel median is the background
    return np.median(np.asarray(image.convert("RGB"), float).reshape(-1, 3), axis=0)


def object_mask(image, threshold: float = 60.0) -> np.ndarray:
    """Pixels that differ clearly from the background colour."""
    pixels = np.asarray(image.convert("RGB"), float)
    return np.linalg.norm(pixels - _background_rgb(image), axis=2) > threshold


def background_colour(image) -> str:
    return nearest_colour(_background_rgb(image))


def object_colour(image) -> str | None:
    """Palette name of the object's median colour; None when no object is visible."""
    mask = object_mask(image)
    if mask.sum() < 4:
        return None
    return nearest_colour(np.median(np.asarray(image.convert("RGB"), float)[mask], axis=0))


def object_position(image) -> str | None:
    """Named 3x3 grid position of the object's centre of mass; None when no object is visible.

    Objects are placed so that the centre of mass is at 1/2 +- (0.5 - margin) of the side, the
    margin being at most 0.33; thresholds at 1/2 +- 0.1 leave room on both sides.
    """
    mask = object_mask(image)
    if mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    side = mask.shape[0]

    def third(coordinate: float) -> int:
        return 0 if coordinate < 0.4 * side else 2 if coordinate > 0.6 * side else 1

    cell = (third(xs.mean() + 0.5), third(ys.mean() + 0.5))
    return next(name for name, grid in world.POSITIONS.items() if grid == cell)


def prompt_following(images, captions: list[str]) -> dict[str, float]:
    """Fraction of images whose background colour and object position match their caption."""
    wanted = [world.parse_caption(c) for c in captions]
    return {
        "background": float(np.mean([background_colour(im) == w["background"] for im, w in zip(images, wanted)])),
        "position": float(np.mean([object_position(im) == w["position"] for im, w in zip(images, wanted)])),
    }


# --------------------------------------------------------------------------- concepts and base quality

def generation_metrics(pipe, concept: world.ConceptFolder, classifier: IdentityClassifier | None = None,
                       n: int = 20, seed: int = 0, **generate_kwargs) -> dict[str, float]:
    """Generate the concept in its held-out contexts; identity, background and position accuracy.

    ``n`` above the number of held-out prompts cycles through them again, each image with its own
    seed: identity rates far from 0 and 1 need many images to be compared within a few points.
    """
    classifier = classifier or load_identity_classifier()
    captions = [concept.heldout[i % len(concept.heldout)].caption for i in range(n)]
    images = generate(pipe, captions, seed, **generate_kwargs)
    hits = sum(label == concept.name for label in classifier.predict(images))
    return {"identity": hits / n, "identity_interval": wilson_interval(hits, n), "images": n,
            **prompt_following(images, captions)}


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) of a rate of ``hits`` in ``n`` images: what the
    sampling alone leaves open, e.g. 0.50 of 24 images is [0.31, 0.69], of 100 [0.40, 0.60]."""
    if n <= 0 or not 0 <= hits <= n:
        raise ValueError(f"need 0 <= hits <= n and n > 0, got {hits} of {n}.")
    rate, spread = hits / n, z * z / n
    centre = (rate + spread / 2) / (1 + spread)
    half = z * np.sqrt(rate * (1 - rate) / n + spread / (4 * n)) / (1 + spread)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def identity_gaps(a, b, n: int) -> str:
    """Per-concept identity differences a − b in points, each with the 95% sampling interval of n images
    each, and how many are within 5 and within 10 points (the reproducibility goal's threshold)."""
    a, b = np.array(a), np.array(b)
    gaps = 100 * (a - b)
    noise = 100 * 1.96 * np.sqrt((a * (1 - a) + b * (1 - b)) / n)  # 95% interval of a difference of two rates
    return (f"{gaps.mean():+.0f} points on average; per concept {(abs(gaps) <= 5).sum()} of {len(gaps)} within 5 points, "
            f"{(abs(gaps) <= 10).sum()} within 10, {(abs(gaps) <= noise).sum()} within their 95% sampling interval at "
            f"{n} images each (differences {', '.join(f'{g:+.0f}±{h:.0f}' for g, h in zip(gaps, noise))}).")


def identity_accuracy(pipe, concept: world.ConceptFolder, **kwargs) -> float:
    """Fraction of generated held-out prompts that the classifier recognises as the concept."""
    return generation_metrics(pipe, concept, **kwargs)["identity"]


def base_quality(pipe, n: int = 200, seed: int = 0, classifier: IdentityClassifier | None = None,
                 **generate_kwargs) -> dict[str, float]:
    """Accuracy on prompts whose (shape, colour, background, position) pretraining never saw.

    `all` counts images where shape, object colour and background colour are all right; `column`
    and `row` split position into its horizontal and vertical halves (chance 1/3 each).
    """
    classifier = classifier or load_identity_classifier()
    scenes = world.heldout_scenes(n, seed)
    images = generate(pipe, [s.caption() for s in scenes], seed, **generate_kwargs)
    read = classifier.shapes if isinstance(classifier, parts.PartsReader) else classifier.predict  # v3's: shape = class
    shape = np.array([label == s.shape for label, s in zip(read(images), scenes)])
    colour = np.array([object_colour(im) == s.colour for im, s in zip(images, scenes)])
    background = np.array([background_colour(im) == s.background for im, s in zip(images, scenes)])
    cells = [(world.POSITIONS.get(object_position(im)), world.POSITIONS[s.position]) for im, s in zip(images, scenes)]
    column, row = (np.array([found is not None and found[axis] == wanted[axis] for found, wanted in cells])
                   for axis in (0, 1))
    return {"shape": shape.mean(), "colour": colour.mean(), "background": background.mean(),
            "position": (column & row).mean(), "column": column.mean(), "row": row.mean(),
            "all": (shape & colour & background).mean()}


# --------------------------------------------------------------------------- continual learning

def continual_metrics(R) -> dict[str, float]:
    """Summary of R[i, j] = score on concept j after learning concepts 0..i (T x T).

    With a_j = R[T-1, j] the final scores (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018):
    - average_score      mean_j a_j
    - plasticity         mean_j R[j, j]: how well each concept is learned when it is new
    - backward_transfer  mean_{j<T-1} (a_j - R[j, j]); negative means forgetting
    - forgetting         mean_{j<T-1} (max_{j<=l<T-1} R[l, j] - a_j); >= 0
    - forward_transfer   mean_{j>0} R[j-1, j], the score on a concept before learning it (the
                         base model scores 0 by construction of the normalised score)
    Entries not measured are NaN (a long run scores every old concept only every few concepts):
    the diagonal and the last row must be measured, the maxima run over what was; forward transfer
    is NaN unless the entries above the diagonal were measured.
    """
    R = np.asarray(R, dtype=float)
    T = len(R)
    if R.shape != (T, T) or T == 0:
        raise ValueError(f"R must be a non-empty square matrix, got shape {R.shape}")
    final, learned = R[-1], np.diag(R)
    if np.isnan(final).any() or np.isnan(learned).any():
        raise ValueError("R's diagonal and last row must be measured (no NaN)")
    old = range(T - 1)
    above = [R[j - 1, j] for j in range(1, T)]
    return {
        "average_score": float(final.mean()),
        "plasticity": float(learned.mean()),
        "backward_transfer": float(np.mean([final[j] - learned[j] for j in old])) if T > 1 else 0.0,
        "forgetting": float(np.mean([np.nanmax(R[j:T - 1, j]) - final[j] for j in old])) if T > 1 else 0.0,
        "forward_transfer": (float(np.mean(above)) if not np.isnan(above).any() else float("nan")) if T > 1 else 0.0,
    }


def continual_curves(R) -> dict[str, list]:
    """Average score and forgetting after each measured row of R (its last entry is
    `continual_metrics`'): how they move as concepts accumulate. Rows with a NaN below the
    diagonal (not measured) are left out."""
    R = np.asarray(R, dtype=float)
    learned, average, forgetting = [], [], []
    for i in range(len(R)):
        if np.isnan(R[i, : i + 1]).any():
            continue
        metrics = continual_metrics(R[: i + 1, : i + 1])
        learned.append(i + 1)
        average.append(metrics["average_score"])
        forgetting.append(metrics["forgetting"])
    return {"concepts_learned": learned, "average_score": average, "forgetting": forgetting}


def discriminative_identity(pipe, concepts: list[world.ConceptFolder], select, images: int = 20) -> dict:
    """Which learned concept explains a held-out image best: identity without generating.

    For each held-out image of concept j and each candidate concept c: the denoising loss with c
    selected (``select(c)``, the method's own way; a no-op for one merged model) and the caption's
    trigger replaced by c's. The image is recognised when the argmin is j. Returns the accuracy,
    the confusion matrix (rows: true concept, columns: argmin; counts of images) and per-concept
    accuracy. A model that ignores triggers and selections scores about 1 / len(concepts).
    """
    samples = [(j, s) for j, c in enumerate(concepts) for s in c.heldout[:images]]
    losses = np.empty((len(concepts), len(samples)))
    for c, candidate in enumerate(concepts):
        select(c)
        captions = [s.caption.replace(concepts[j].trigger, candidate.trigger) for j, s in samples]
        losses[c] = heldout_losses(pipe, [s.image for _, s in samples], captions, seed=0)
    truth = np.array([j for j, _ in samples])
    guess = losses.argmin(axis=0)
    confusion = np.zeros((len(concepts), len(concepts)), dtype=int)
    np.add.at(confusion, (truth, guess), 1)
    return {"accuracy": float((guess == truth).mean()), "confusion": confusion.tolist(),
            "per_concept": (confusion.diagonal() / confusion.sum(axis=1)).tolist()}


# --------------------------------------------------------------------------- damage to the base model

def no_concept_prompts(n: int = 8, seed: int = 0) -> list[str]:
    """Base-world captions (no trigger word) for measuring drift."""
    rng = np.random.default_rng([seed, 7])
    return [world.random_scene(rng).caption() for _ in range(n)]


def drift(pipe, prompts: list[str], reference_images, seed: int = 0, **generate_kwargs) -> float:
    """Mean absolute pixel difference (0..1) from the base model's images, same prompts and seeds.

    Why: an adapter should leave prompts that do not mention its concept alone; the base model
    itself scores 0. Generate `reference_images` with `generate(base_pipe, prompts, seed)`.
    """
    images = generate(pipe, prompts, seed, **generate_kwargs)
    return float(np.mean([np.abs(to_batch([a]) - to_batch([b])).mean().item() / 2
                          for a, b in zip(images, reference_images)]))
