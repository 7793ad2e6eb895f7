#!/usr/bin/env python
"""One image grid of every concept in a Share file: ``python train/sample_grid.py --share FILE --out grid.png``.

Row 0 is the base model (nothing selected); row i is concept i, all rows with the same seeds
and contexts, all generated from the one Share file in a single batch per column (each image
of the batch uses its own concept).
"""

import argparse
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import ImageDraw

import share_diffusers  # noqa: F401  (adds pipe.load_share)
import share_lab
from share_lab.evaluation import DEFAULT_GUIDANCE, DEFAULT_STEPS

CONTEXTS = [("blue", "center"), ("white", "top left"), ("green", "bottom right"), ("black", "top right")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=str(share_lab.TINY_BASE))
    p.add_argument("--share", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE, help="the tiny base's (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    pipe = StableDiffusionPipeline.from_pretrained(args.base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_share(args.share)
    rows = [(None, "a photo of a red circle", "base model")] + [
        (c.name, f"a photo of {c.trigger}" if c.trigger else (c.prompt or c.name), c.name) for c in pipe.share_concepts
    ]
    images = [[None] * len(CONTEXTS) for _ in rows]
    for j, (background, position) in enumerate(CONTEXTS):  # one batch per column: a different concept per image
        prompts = [f"{prompt} on a {background} background, {position}" for _, prompt, _ in rows]
        pipe.set_share_concepts([name for name, _, _ in rows])
        gens = [torch.Generator().manual_seed(args.seed + j) for _ in rows]
        with torch.no_grad():
            out = pipe(prompts, generator=gens, num_inference_steps=args.steps, guidance_scale=args.guidance_scale).images
        for i, image in enumerate(out):
            images[i][j] = image.resize((128, 128))
    labelled = []
    for (_, _, label), row in zip(rows, images):
        for k, image in enumerate(row):
            if k == 0:
                ImageDraw.Draw(image).text((2, 2), label[:20], fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
            labelled.append(image)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(labelled, rows=len(rows), cols=len(CONTEXTS)).save(args.out)
    print(f"Wrote {args.out}: {len(rows) - 1} concepts + the base model, {len(CONTEXTS)} contexts each")


if __name__ == "__main__":
    main()
