"""Train the reference LoRA of every concept and store the numbers that normalise its score.

Why: the held-out score of a concept is (L_base - L) / (L_base - L_ref), where L_ref is the
held-out loss of an independently trained per-concept PEFT LoRA (rank 4, lora_alpha 4, on the
UNet's attention projections and ResNet convolutions, share_lab.baselines.LORA_TARGETS; DreamBooth-
style without prior preservation, trained by share_lab.baselines.train_lora_baseline with
learn_concept.py's data, loss and batch for the recipe's 800 steps, share_lab.baselines.RECIPE_STEPS).
This script trains it, measures L_base and L_ref (share_lab.evaluation.heldout_loss) and how well
each model generates the concept, and writes them into the concept's concept.json under "evaluation",
so that tests and benchmarks never retrain it. Each LoRA is saved with save_lora_weights into
<concept>/reference_lora/ (load it with pipe.load_lora_weights), in fp16 to fit the assets budget;
L_ref is measured on the reloaded file, so it is exactly what the shipped file gives.

    python train/train_reference_loras.py --images 200  # all shipped concepts
    python train/train_reference_loras.py --concepts runs/concepts-s1 --seed 1 --images 200 \
        --summary runs/seed1.json --compare docs/results/reference-loras.json   # on a copy: reproducible?
    python train/train_reference_loras.py --base runs/pilots/V2b/base --concepts runs/concepts-v2 \
        --classifier runs/pilots/reader-v2 --images 100 --summary docs/results/reference-loras-v2.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from diffusers import StableDiffusionPipeline

import share_lab
from share_diffusers.training import LOSS_TIMESTEPS, heldout_loss, read_instance_images
from share_lab import world
from share_lab.baselines import LORA_TARGETS, RECIPE_STEPS, train_lora_baseline
from share_lab.evaluation import generation_metrics, identity_gaps, load_identity_classifier

REFERENCE = dict(steps=RECIPE_STEPS, rank=4, lr=3e-3, batch_size=4, seed=0)  # learn_concept.py's batch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=share_lab.TINY_BASE)
    parser.add_argument("--concepts", type=Path, default=share_lab.CONCEPTS)
    parser.add_argument("--steps", type=int, default=REFERENCE["steps"])
    parser.add_argument("--lr", type=float, default=REFERENCE["lr"])
    parser.add_argument("--seed", type=int, default=REFERENCE["seed"])
    parser.add_argument("--only", nargs="*", help="concept names (default: all)")
    parser.add_argument("--skip-generation", action="store_true", help="store losses only (faster)")
    parser.add_argument("--classifier", type=Path, default=share_lab.CLASSIFIER,
                        help="identity classifier or parts reader folder (world v2: train/pilot_bases.py prepare)")
    parser.add_argument("--images", type=int, default=20, help="generated images per concept, reference LoRA")
    parser.add_argument("--base-images", type=int, default=20, help="generated images per concept, untrained base")
    parser.add_argument("--summary", type=Path, help="also write every concept's stored numbers and their means here (JSON)")
    parser.add_argument("--summary-only", action="store_true", help="train nothing: only write --summary")
    parser.add_argument("--compare", type=Path, metavar="SUMMARY",
                        help="with --summary: each concept's identity against another run's summary (e.g. the same recipe "
                             "with --seed 1), stored in --summary and printed")
    args = parser.parse_args(argv)
    if (args.summary_only or args.compare) and not args.summary:
        parser.error("--summary-only and --compare need --summary PATH")
    if args.compare and not args.compare.is_file():
        parser.error(f"--compare: no summary at {args.compare}")

    classifier = None if args.skip_generation else load_identity_classifier(args.classifier)

    def load_base():
        pipe = StableDiffusionPipeline.from_pretrained(args.base, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    concepts = world.list_concepts(args.concepts)
    for concept in concepts:
        if args.summary_only or (args.only and concept.name not in args.only):
            continue
        start = time.time()
        pipe = load_base()
        heldout = ([s.image for s in concept.heldout], [s.caption for s in concept.heldout])
        evaluation = {"loss_seed": 0, "loss_timesteps": list(LOSS_TIMESTEPS), "base_loss": heldout_loss(pipe, *heldout)}
        if classifier:
            evaluation["base_generation"] = generation_metrics(pipe, concept, classifier, n=args.base_images)
        lora = train_lora_baseline(pipe, "reference", read_instance_images(concept.path / "train", None), args.steps,
                                   args.lr, REFERENCE["batch_size"], REFERENCE["rank"], args.seed)
        StableDiffusionPipeline.save_lora_weights(concept.reference_lora, unet_lora_layers={k: v.half() for k, v in lora.items()})
        pipe = load_base()
        pipe.load_lora_weights(concept.reference_lora)
        evaluation["reference_loss"] = heldout_loss(pipe, *heldout)
        if classifier:
            evaluation["reference_generation"] = generation_metrics(pipe, concept, classifier, n=args.images)
        evaluation["reference_lora"] = {"rank": REFERENCE["rank"], "lora_alpha": REFERENCE["rank"], "steps": args.steps,
                                        "lr": args.lr, "batch_size": REFERENCE["batch_size"], "seed": args.seed,
                                        "target_modules": LORA_TARGETS}
        concept.metadata["evaluation"] = evaluation
        concept.save_metadata()
        print(f"{concept.name}: {json.dumps(evaluation)} ({time.time() - start:.0f} s)", flush=True)
    if args.summary:
        write_summary(args, concepts)  # their metadata, updated in place by save_metadata


def write_summary(args, concepts) -> None:
    """Generated identity of the untrained base and of each reference LoRA (with its 95 % interval)."""
    rows = {c.name: {k: c.metadata["evaluation"][k] for k in ("base_generation", "reference_generation", "reference_lora")
                     if k in c.metadata.get("evaluation", {})} for c in concepts}
    measured = [r for r in rows.values() if "reference_generation" in r]
    identity = [r["reference_generation"]["identity"] for r in measured]
    here = lambda path: os.path.relpath(path, share_lab.ROOT)  # noqa: E731  (no machine paths in results)
    summary = {"base": here(args.base), "classifier": here(args.classifier), "concepts": len(rows),
               "reference_identity_mean": float(sum(identity) / len(identity)) if identity else None,
               "reference_identity_min": min(identity, default=None),
               "base_identity_mean": (sum(r["base_generation"]["identity"] for r in measured) / len(measured)
                                      if measured else None),
               "per_concept": rows}
    if args.compare:
        summary["compared_to"] = compare(rows, json.loads(args.compare.read_text()), here(args.compare), args.images)
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{args.summary}: reference identity mean {summary['reference_identity_mean']} over {len(measured)} concepts")
    if args.compare:
        print(f"against {here(args.compare)}: {summary['compared_to']['text']}")


def compare(rows: dict, other: dict, other_path: str, images: int) -> dict:
    """Reproducibility: per concept, this run's identity minus the other run's (in points)."""
    names = [n for n in rows if "reference_generation" in rows[n] and "reference_generation" in other["per_concept"].get(n, {})]
    if not names:
        raise SystemExit(f"--compare: {other_path} measured none of these concepts")
    ours, theirs = ([r[n]["reference_generation"] for n in names] for r in (rows, other["per_concept"]))
    n = min(g.get("images", images) for g in ours + theirs)
    a, b = [g["identity"] for g in ours], [g["identity"] for g in theirs]
    gaps = {name: round(100 * (x - y), 1) for name, x, y in zip(names, a, b)}
    return {"summary": other_path, "images": n, "gaps_in_points": gaps,
            "within_10_points": sum(abs(g) <= 10 for g in gaps.values()), "concepts": len(names),
            "text": identity_gaps(a, b, n)}


if __name__ == "__main__":
    main()
