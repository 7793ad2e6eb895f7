#!/usr/bin/env python
"""Each concept beside what its reference LoRA and a Share file draw: one row per concept.

Row = 2 of the concept's training renders · ``--images`` images its reference LoRA draws from held-out
prompts · the same prompts and seeds with the concept selected in the Share file · one image of the
untrained base (the trigger alone means nothing to it). So a reader sees whether a row is its concept.

    python train/concept_grid.py --share runs/c10s800-lr5e-3/share/share/share.safetensors --out docs/images/concepts_grid.png
    # (benchmarks/continual.py --concepts 10 --methods share --lr share=5e-3 ... --out runs/c10s800-lr5e-3/share wrote the file)
"""

import argparse
from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw

import share_diffusers  # noqa: F401  (adds pipe.load_share)
import share_lab
from share_lab import evaluation, world


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=str(share_lab.TINY_BASE))
    p.add_argument("--concepts_dir", default=str(share_lab.CONCEPTS))
    p.add_argument("--share", required=True, help="a Share file holding the concepts (by name)")
    p.add_argument("--concepts", type=int, default=10, help="the first N concepts of the Share file")
    p.add_argument("--images", type=int, default=4, help="held-out prompts per adapter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    pipe = StableDiffusionPipeline.from_pretrained(args.base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_share(args.share)
    folders = {f.name: f for f in world.list_concepts(args.concepts_dir)}
    names = [c.name for c in pipe.share_concepts][:args.concepts]
    missing = [n for n in names if n not in folders]
    if missing:
        raise SystemExit(f"{args.concepts_dir} has no folder for {', '.join(missing)} (concepts of {args.share}).")
    tiles = []
    for name in names:
        concept = folders[name]
        prompts = [s.caption for s in concept.heldout[:args.images]]
        pipe.set_share_concepts(None)
        untrained = evaluation.generate(pipe, prompts[:1], args.seed)
        pipe.load_lora_weights(concept.reference_lora, adapter_name="reference")
        lora = evaluation.generate(pipe, prompts, args.seed)
        pipe.unload_lora_weights()
        pipe.set_share_concepts(name)
        share = evaluation.generate(pipe, prompts, args.seed)
        row = [s.image for s in concept.train[:2]] + lora + share + untrained
        row = [im.resize((96, 96), Image.Resampling.NEAREST) for im in row]
        ImageDraw.Draw(row[0]).text((2, 2), name[:18], fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
        tiles += row
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(tiles, rows=len(names), cols=len(tiles) // len(names)).save(args.out)
    print(f"Wrote {args.out}: {len(names)} concepts; columns: 2 training renders, {args.images} reference LoRA, "
          f"{args.images} Share, 1 untrained base")


if __name__ == "__main__":
    main()
