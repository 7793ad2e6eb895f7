#!/usr/bin/env python
"""Make ``assets/demo.share.safetensors``, the Share file the web UI starts with.

Learns ``--concepts`` (four concepts of world v2, one per layout: outlined, split, striped, dotted) one after another with
``train/learn_concept.py`` (default settings, on the reference recipe's layers: attention projections
and ResNet convolutions, `share_lab.baselines.LORA_TARGETS`) into a work folder, then copies the final
file into ``assets/``; concepts learned into it later (the web UI) keep those layers, which the file
stores. Deterministic given the same base model, seed and software versions.

    python train/make_demo_share.py            # 4 concepts, about 2 min per concept on 1 CPU thread beside other jobs
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import share_lab
from share_diffusers import read_share
from share_lab import world
from share_lab.baselines import LORA_TARGETS

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=str(share_lab.TINY_BASE))
    p.add_argument("--concepts", nargs="+", default=["green-orange-outlined-diamond", "orange-yellow-split-crescent",
                                                    "blue-purple-striped-cross", "white-blue-dotted-square"])
    p.add_argument("--work_dir", default=str(ROOT / "outputs" / "demo-share"))
    p.add_argument("--out", default=str(share_lab.ASSETS / "demo.share.safetensors"))
    args, learn_args = p.parse_known_args(argv)

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    share = work / "share.safetensors"
    for concept in [world.load_concept(share_lab.CONCEPTS / name) for name in args.concepts]:
        print(f"== learning {concept.name} ({concept.trigger})", flush=True)
        subprocess.run([sys.executable, str(ROOT / "train" / "learn_concept.py"), "--pretrained_model_name_or_path", args.base,
                        "--instance_data_dir", str(concept.path / "train"), "--share_path", str(share),
                        "--output_dir", str(work / "runs" / concept.name), "--report_to", "none",
                        "--target_modules", *LORA_TARGETS, *learn_args], check=True)
    shutil.copyfile(share, args.out)
    state, _ = read_share(args.out)
    print(f"Wrote {args.out}: {', '.join(state.names)} ({Path(args.out).stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
