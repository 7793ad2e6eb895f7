#!/usr/bin/env bash
# The continual demo on the embedded tiny base: set up, learn 3 concepts one after another into ONE
# Share file (each merge re-expresses the earlier concepts without their data), then generate a grid
# of all of them from the final file. Output: outputs/demo/ (share.safetensors, README.md, grid.png).
# --target_modules: the reference recipe's layers, attention and the ResNet convolutions (the tiny base
# has no attention at its 16x16 level, where a concept's detail is drawn).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=outputs/demo
rm -rf "$out"
for concept in green-orange-outlined-diamond orange-yellow-split-crescent blue-purple-striped-cross; do
  echo "== learning $concept"
  .venv/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train/learn_concept.py --instance_data_dir "assets/concepts/$concept/train" \
    --share_path "$out/share.safetensors" --output_dir "$out/runs/$concept" --report_to tensorboard \
    --target_modules to_q to_k to_v to_out.0 conv1 conv2 \
    --heldout_from_file  # the report's held-out loss of the earlier concepts too
done
.venv/bin/python train/sample_grid.py --share "$out/share.safetensors" --out "$out/grid.png"
