"""Which LoRA recipe draws a concept: generated identity per recipe (rank, layers, steps, lr) and guidance scale.

Why: the reference LoRA is the yardstick of every identity figure, and Share is trained with the same
steps and layers. Before changing the shipped recipe, this trains each candidate on the same concepts
with the same seed and data (`share_lab.baselines.train_lora_baseline`) and generates the same
held-out prompts and seeds at each guidance scale. Results go to --out after every (recipe, concept),
and a re-run skips what is there, so an interrupted sweep continues.

A recipe is RANK:LAYERS:STEPS:LR[:SCHEDULE], LAYERS a '+'-joined list of groups: attn (to_q/k/v/out.0), proj
(proj_in/out), ff (the feed-forward), conv (the ResNet blocks' conv1/conv2, LoCon-style), SCHEDULE a
Diffusers learning-rate schedule (default constant, as learn_concept.py's). The shipped
recipe (share_lab.baselines.LORA_TARGETS, RECIPE_STEPS) is 4:attn+conv:800:3e-3.

    python benchmarks/recipe.py --recipes 4:attn:400:3e-3 4:attn+conv:400:3e-3 --every 2 \
        --scales 1.5 2.5 5 --images 24 --out docs/results/recipes-v6.json
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.optimization import SchedulerType

import share_lab
from share_diffusers.targets import LORA_EXTRA, PROJECTIONS
from share_diffusers.training import read_instance_images
from share_lab import evaluation, world
from share_lab.baselines import RESNET_CONVS, train_lora_baseline

LAYER_GROUPS = {"attn": PROJECTIONS["unet"], "proj": LORA_EXTRA["unet"][:2], "ff": LORA_EXTRA["unet"][2:],
                "conv": RESNET_CONVS}
SCHEDULES = [s.value for s in SchedulerType]


def parse_recipe(text: str) -> dict:
    """'4:attn+conv:400:3e-3[:cosine]' -> rank, target_modules, steps, lr, lr_scheduler."""
    try:
        rank, layers, steps, lr, *schedule = text.split(":")
        targets = [t for group in layers.split("+") for t in LAYER_GROUPS[group]]
        (schedule,) = schedule or ["constant"]
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
        return {"rank": int(rank), "target_modules": targets, "steps": int(steps), "lr": float(lr), "lr_scheduler": schedule}
    except (ValueError, KeyError) as error:
        raise argparse.ArgumentTypeError(
            f"a recipe is RANK:LAYERS:STEPS:LR[:SCHEDULE] with LAYERS from {sorted(LAYER_GROUPS)} joined by '+', got {text!r} ({error})") from None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=share_lab.TINY_BASE)
    parser.add_argument("--concepts", type=Path, default=share_lab.CONCEPTS)
    parser.add_argument("--every", type=int, default=1, help="take every n-th shipped concept (an unbiased subset)")
    parser.add_argument("--recipes", nargs="+", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 2.5, 5.0])
    parser.add_argument("--images", type=int, default=24, help="generated images per concept and scale")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    recipes = {text: parse_recipe(text) for text in args.recipes}

    summary = json.loads(args.out.read_text()) if args.out.exists() else {"per_recipe": {}}
    summary.update(base=args.base.name, seed=args.seed, images_per_concept=args.images, steps=evaluation.DEFAULT_STEPS,
                   hardware=f"{torch.get_num_threads()} CPU threads, no GPU")
    classifier = evaluation.load_identity_classifier()
    concepts = world.list_concepts(args.concepts)[::args.every]
    for text, recipe in recipes.items():
        rows = summary["per_recipe"].setdefault(text, {"recipe": recipe, "per_concept": {}})
        for concept in concepts:
            if concept.name in rows["per_concept"]:
                continue
            start = time.time()
            pipe = StableDiffusionPipeline.from_pretrained(args.base, local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            train_lora_baseline(pipe, "recipe", read_instance_images(concept.path / "train", None), recipe["steps"],
                                recipe["lr"], rank=recipe["rank"], seed=args.seed, target_modules=recipe["target_modules"],
                                lr_scheduler=recipe["lr_scheduler"])
            trained = time.time() - start
            rows["per_concept"][concept.name] = {
                str(scale): evaluation.generation_metrics(pipe, concept, classifier, n=args.images,
                                                          guidance_scale=scale)["identity"] for scale in args.scales}
            rows["per_concept"][concept.name]["train_seconds"] = round(trained)
            rows["mean_identity"] = {str(s): float(np.mean([r[str(s)] for r in rows["per_concept"].values()]))
                                     for s in args.scales}
            args.out.write_text(json.dumps(summary, indent=1) + "\n")
            print(text, concept.name, rows["per_concept"][concept.name], flush=True)
        print(text, "mean identity per guidance scale:", rows.get("mean_identity"), flush=True)
    return summary


if __name__ == "__main__":
    main()
