"""Reference-LoRA identity against the guidance scale: which classifier-free guidance draws the concepts.

Why: every identity figure samples with one setting (share_lab.evaluation.DEFAULT_GUIDANCE). A base that
predicts v (tiny base v6) may want another than the noise-predicting bases it was chosen on; this
measures each shipped concept's reference LoRA at several scales (and, optionally, with Diffusers'
`guidance_rescale`, Lin et al. 2023's fix for over-exposed v-prediction samples), on the same held-out
prompts and seeds, and writes the table as JSON.

    python benchmarks/guidance.py --scales 2.5 3.5 5 --images 24 --out docs/results/guidance-v6.json
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

import share_lab
from share_lab import evaluation, world


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=share_lab.TINY_BASE)
    parser.add_argument("--concepts", type=Path, default=share_lab.CONCEPTS)
    parser.add_argument("--scales", type=float, nargs="+", default=[2.5, 3.5, 5.0])
    parser.add_argument("--rescale", type=float, default=0.0, help="guidance_rescale for every scale (0: none)")
    parser.add_argument("--images", type=int, default=24, help="generated images per concept and scale")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    pipe = StableDiffusionPipeline.from_pretrained(args.base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    classifier = evaluation.load_identity_classifier()
    start, rows = time.time(), {}
    for concept in world.list_concepts(args.concepts):
        pipe.load_lora_weights(concept.reference_lora)
        rows[concept.name] = {str(scale): evaluation.generation_metrics(
            pipe, concept, classifier, n=args.images, guidance_scale=scale, guidance_rescale=args.rescale)["identity"]
            for scale in args.scales}
        pipe.unload_lora_weights()
        print(concept.name, rows[concept.name], flush=True)
    means = {str(s): float(np.mean([r[str(s)] for r in rows.values()])) for s in args.scales}
    summary = {"base": args.base.name, "scheduler": type(pipe.scheduler).__name__, "steps": evaluation.DEFAULT_STEPS,
               "rescale": args.rescale, "images_per_concept": args.images, "mean_identity": means, "per_concept": rows,
               "hardware": f"{torch.get_num_threads()} CPU threads, no GPU", "seconds": round(time.time() - start)}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print("mean identity per guidance scale:", means)
    return summary


if __name__ == "__main__":
    main()
