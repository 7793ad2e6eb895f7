"""Systems benchmark: Share against what Diffusers users would otherwise use (PEFT / Diffusers LoRA).

Every figure is a ratio against a baseline measured in the same process and run: timings are
medians over repeats after warm-up, variants of one comparison are interleaved round by round
(so slow drifts of a shared machine hit all of them alike), and nothing is cached across runs.

Sections (``--sections``, default all), one module each:

  switch     concept-switch latency vs concepts loaded: ``set_share_concepts`` against
             ``set_adapters`` with N LoRAs loaded (and Diffusers' LoRA hotswap from memory)
  compile    torch.compile: recompilations over 100 random switches (Share), against
             ``set_adapters`` / hotswap on a compiled UNet
  inference  UNet step: Share unfused / fused vs the base UNet vs a PEFT LoRA of equal rank, and
             a batch of 8 images with 8 different concepts vs one concept vs PEFT's mixed batch
  training   step time, peak memory, optimizer state: a new Share concept vs a PEFT LoRA
  merge      merging one new concept into a Share state holding 10 / 100 / 1000 concepts
  archs      SD 1.5 and SDXL (UNet + text encoders) from the config dicts in
             ``benchmarks/configs``, randomly initialised: inject, train a step, merge, load,
             fuse, export; stored bytes and trainable parameters against LoRA
  transformers  FLUX.1-dev and SD 3.5 Large transformers from their configs: bytes per concept
             against LoRA r16 / r64 and the k = 32 basis, switch latency on the full models' layers,
             unfused / fused / mixed-batch step time on their first blocks at full width

``harness`` holds what the sections share (models and pipelines from the configs, synthetic Share
states and LoRAs, timing, memory), ``report`` the JSON / markdown / plot output, ``cli`` the
command line and the run.

``python -m benchmarks.systems`` (from the repository root) runs everything at full size on the
CPU (about 30 minutes on two cores); ``--quick`` runs every code path on tiny models in well under
a minute (a smoke test, its numbers mean little). Results: ``benchmarks/results/systems.{json,md,png}``
(or ``--out``). ``--device cuda --dtype bf16`` runs the same on a GPU.
"""

import os

# before anything below imports Diffusers or Transformers: offline and quiet
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
