"""Measure the shipped tiny base model and draw the README grids.

Prints, on this machine:
  - base quality on the 200 (shape, colour, background, position) combinations held out of
    pretraining: shape (classifier), object colour and background colour (analytic), position;
  - what the untrained base draws for each concept's held-out prompts: identity accuracy
    (should be near zero: it has never seen the concept), plus background and position following;
  - the identity reader's accuracy on the concepts' held-out images, as rendered and as VAE round trips;
  - the time to generate 4 images with 25 steps and classifier-free guidance at 64x64.
Writes docs/images/{base_samples,concepts,base_on_concepts}.png.

    python train/evaluate_tiny_base.py          # about 3 minutes on the 2-core CPU
"""

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image

import share_lab
from share_lab import evaluation, world
from share_lab.classifier import round_trip


def timing(pipe, repeats: int = 3) -> float:
    """Median wall time of generating 4 images, 25 steps, guidance on (after one warm-up run)."""
    prompt = world.heldout_scenes(1)[0].caption()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        pipe([prompt] * 4, num_inference_steps=25, guidance_scale=evaluation.DEFAULT_GUIDANCE,
             generator=torch.Generator().manual_seed(0))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def grid(images, columns: int, scale: int = 2) -> Image.Image:
    rows = -(-len(images) // columns)
    images = images + [Image.new("RGB", images[0].size, "white")] * (rows * columns - len(images))
    canvas = make_image_grid(images, rows, columns)
    return canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=share_lab.TINY_BASE)
    parser.add_argument("--concepts", type=Path, default=share_lab.CONCEPTS)
    parser.add_argument("--n", type=int, default=200, help="held-out base prompts")
    parser.add_argument("--images", type=Path, default=Path("docs/images"))
    args = parser.parse_args()

    pipe = StableDiffusionPipeline.from_pretrained(args.base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    classifier = evaluation.load_identity_classifier()
    concepts = world.list_concepts(args.concepts)
    print(f"hardware: {torch.get_num_threads()} CPU threads, no GPU; scheduler "
          f"{type(pipe.scheduler).__name__}, {evaluation.DEFAULT_STEPS} steps, guidance {evaluation.DEFAULT_GUIDANCE}")

    seconds = timing(pipe)
    print(f"time for 4 images x 25 steps with CFG at {world.RESOLUTION}x{world.RESOLUTION}: {seconds:.2f} s")

    quality = evaluation.base_quality(pipe, n=args.n, classifier=classifier)
    print(f"base quality on {args.n} held-out combinations: " + ", ".join(f"{k} {v:.3f}" for k, v in quality.items()))

    heldout = [s.image for c in concepts for s in c.heldout]
    names = [c.name for c in concepts for _ in c.heldout]
    for label, images in (("renders", heldout), ("VAE round trips", round_trip(heldout, pipe.vae))):
        accuracy = np.mean([p == t for p, t in zip(classifier.predict(images), names)])
        print(f"identity reader on the {len(concepts)} concepts' {len(heldout)} held-out {label}: {accuracy:.3f}")

    untrained = {c.name: evaluation.generation_metrics(pipe, c, classifier) for c in concepts}
    for name, metrics in untrained.items():
        print(f"  base on {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k != "identity_interval"))
    mean = {k: np.mean([m[k] for m in untrained.values()]) for k in ("identity", "background", "position")}
    print(f"untrained base on the concepts' held-out prompts: identity {mean['identity']:.3f} (chance: the rate at "
          f"which a random object has every part of the concept), background {mean['background']:.3f}, position {mean['position']:.3f}")

    args.images.mkdir(parents=True, exist_ok=True)
    scenes = world.heldout_scenes(seed=2)[::6][:32]  # spread over the sorted combinations: every shape
    grid(evaluation.generate(pipe, [s.caption() for s in scenes], seed=2), 8).save(args.images / "base_samples.png", optimize=True)
    grid([s.image for c in concepts for s in c.train[:4] + c.heldout[:4]], 8).save(args.images / "concepts.png", optimize=True)
    prompts = [c.heldout[0].caption for c in concepts]
    grid(evaluation.generate(pipe, prompts, seed=3), 6).save(args.images / "base_on_concepts.png", optimize=True)
    print(f"wrote grids to {args.images}/ (base samples: prompts = world.heldout_scenes(seed=2)[::6][:32])")


if __name__ == "__main__":
    main()
