"""Write concept folders (assets/concepts/<name>/) from the procedural world; deterministic.

Each folder holds concept.json (name, trigger, instance_prompt, generator seed, description),
train/NNN.png + train/NNN.txt (the few images a concept is taught from, caption beside each
image, kohya-style) and heldout/NNN.png + .txt (other contexts, for evaluation only).
Evaluation numbers already in a concept.json (written by train_reference_loras.py) are kept.

    python train/make_concepts.py                       # the 12 shipped concepts
    python train/make_concepts.py --count 40 --output runs/concepts --world-seed 3
"""

import argparse
from pathlib import Path

import share_lab
from share_lab import world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=share_lab.CONCEPTS)
    parser.add_argument("--count", type=int, default=12,
                        help=f"at most {world.MAX_CONCEPTS}; the first {len(world.TRIGGER_WORDS)} have one-token trigger words")
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=5, help="training images per concept")
    parser.add_argument("--heldout", type=int, default=20, help="held-out images per concept")
    args = parser.parse_args()
    for concept in world.make_concepts(args.count, args.world_seed):
        folder = world.write_concept(concept, args.output, args.train, args.heldout)
        print(f"{folder}  {concept.trigger:6s}  {concept.description}")


if __name__ == "__main__":
    main()
