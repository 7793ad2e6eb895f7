"""Write concept folders (assets/concepts/<name>/) from the procedural world; deterministic.

Each folder holds concept.json (name, trigger, instance_prompt, generator seed, description),
train/NNN.png + train/NNN.txt (the few images a concept is taught from, caption beside each
image, kohya-style) and heldout/NNN.png + .txt (other contexts, for evaluation only).
Evaluation numbers already in a concept.json (written by train_reference_loras.py) are kept.

    python train/make_concepts.py                       # the 20 shipped concepts (world v2)
    python train/make_concepts.py --count 40 --output runs/concepts --world-seed 3
    python train/make_concepts.py --layouts split striped --count 10 --output runs/concepts-two
    # world v1 (tiny base v3's): own silhouettes and patterns, read by a per-concept classifier
    python train/make_concepts.py --world v1 --count 12 --output runs/concepts-v1
"""

import argparse
from pathlib import Path

import share_lab
from share_lab import pilot_world, world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=share_lab.CONCEPTS)
    parser.add_argument("--count", type=int, default=20,
                        help=f"at most {world.MAX_CONCEPTS}; the first {len(world.TRIGGER_WORDS)} have one-token trigger words")
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=5, help="training images per concept")
    parser.add_argument("--heldout", type=int, default=20, help="held-out images per concept")
    parser.add_argument("--world", choices=("v1", "v2"), default="v2",
                        help="v2: world v2's reserved combinations (share_lab.pilot_world), read by share_lab.parts; "
                             "v1: tiny base v3's concepts")
    parser.add_argument("--layouts", nargs="+", choices=pilot_world.V2_LAYOUTS[1:], default=pilot_world.V2_LAYOUTS[1:],
                        help="world v2: only concepts of these layouts (in the world's order)")
    args = parser.parse_args()
    if args.world == "v1":
        concepts = world.make_concepts(args.count, args.world_seed)
    else:
        every = (pilot_world.make_combination_concept(i, args.world_seed)
                 for i in range(len(pilot_world.concept_combinations(args.world_seed))))
        concepts = [c for c in every if c.layout in args.layouts][:args.count]
    for concept in concepts:
        folder = world.write_concept(concept, args.output, args.train, args.heldout)
        print(f"{folder}  {concept.trigger:6s}  {concept.description}")


if __name__ == "__main__":
    main()
