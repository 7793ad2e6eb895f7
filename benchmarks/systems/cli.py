"""The command line of the systems benchmark (``python -m benchmarks.systems``): the sections, the
sizes of a full and a ``--quick`` run, the run in memory-friendly order and its outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

import benchmarks.systems
from benchmarks.systems.archs import bench_archs
from benchmarks.systems.compile import bench_compile
from benchmarks.systems.harness import DTYPES, ROOT, Bench, free, log
from benchmarks.systems.inference import bench_inference
from benchmarks.systems.merge import bench_merge
from benchmarks.systems.report import environment, markdown, plot
from benchmarks.systems.switch import bench_switch
from benchmarks.systems.training import bench_training, train_worker
from benchmarks.systems.transformers import TRANSFORMER_ARCHS, bench_transformers

SECTIONS = {"switch": bench_switch, "compile": bench_compile, "inference": bench_inference, "training": bench_training,
            "merge": bench_merge, "archs": bench_archs, "transformers": bench_transformers}
RUN_ORDER = ["archs", "transformers", "switch", "compile", "inference", "training", "merge"]  # the largest models while memory is fresh


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.systems", description=benchmarks.systems.__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, few repeats: a smoke test of every code path")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds of the inference comparisons")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--archs", nargs="+", default=None, help="architectures of the 'archs' section (default: sd15 sdxl)")
    p.add_argument("--transformer-archs", nargs="+", default=None, choices=list(TRANSFORMER_ARCHS),
                   help="architectures of the 'transformers' section (default: flux1-dev sd35-large)")
    p.add_argument("--arch-dtype", default=None, choices=list(DTYPES), help="dtype of the 'archs' section (default: --dtype)")
    p.add_argument("--train-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the flags, for the report's command line
    cuda = args.device.startswith("cuda")
    args.dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    args.dtype = DTYPES[args.dtype_name]
    args.arch_dtype_name = args.arch_dtype or args.dtype_name
    args.arch_dtype = DTYPES[args.arch_dtype_name]
    q = args.quick
    args.threads = args.threads or (1 if q else None)  # a smoke test must not fight other jobs for cores
    args.arch = "tiny" if q else "sd15"
    args.compile_arch = "tiny"
    args.compile_size = 8
    args.compile_backend = "eager" if q else args.compile_backend
    args.share_counts = (1, 10, 50) if q else (1, 10, 50, 100, 1000)
    args.lora_counts = (1, 3) if q else (1, 10, 50)
    args.lora_rank = 4
    args.switches = 50 if q else 300
    args.lora_switches = 4 if q else 20
    args.lora_compile_switches = 1 if q else 6
    args.size = 8 if q else 32
    args.mixed_size = 8 if q else 16
    args.repeats = args.repeats or (2 if q else 10)
    args.train_batch, args.train_size = (1, 8) if q else (2, 16)
    args.train_repeats = 2 if q else 5
    args.merge_counts = (10, 100) if q else (10, 100, 1000)
    args.merge_repeats = 1 if q else 3
    args.archs = args.archs or (["tiny", "tiny-xl"] if q else ["sd15", "sdxl"])
    args.arch_size = 8 if q else 16
    args.transformer_archs = args.transformer_archs or (["tiny-flux", "tiny-sd3"] if q else ["flux1-dev", "sd35-large"])
    args.transformer_concepts = (1, 10) if q else (1, 100, 1000)
    args.transformer_batch = 2 if q else 4
    args.transformer_tokens, args.transformer_text_tokens = (16, 8) if q else (64, 16)
    return args


def main(argv=None) -> dict:
    warnings.filterwarnings("ignore")  # deprecations of the libraries under test: not this report's business
    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.train_worker:
        print(json.dumps(train_worker(json.loads(cfg.train_worker))))
        return {}
    bench = Bench(cfg.device)
    results = dict(environment=environment(cfg), load_before=[round(x, 2) for x in os.getloadavg()], sections={}, targets=[])
    log(f"systems benchmark: {results['environment']}")
    for name in sorted(cfg.sections, key=RUN_ORDER.index):
        t = time.perf_counter()
        load = [round(x, 2) for x in os.getloadavg()]
        sec = SECTIONS[name](cfg, bench)
        sec["seconds"], sec["load_at_start"] = time.perf_counter() - t, load
        results["sections"][name] = sec
        log(f"section {name} done in {sec['seconds']:.0f} s")
        free()
    results["sections"] = {name: results["sections"][name] for name in SECTIONS if name in results["sections"]}
    results["targets"] = [t for sec in results["sections"].values() for t in sec["targets"]]
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "systems.json").write_text(json.dumps(results, indent=1, default=str))
    md = markdown(results)
    (cfg.out / "systems.md").write_text(md)
    plot(results, cfg.out / "systems.png")
    print(md)
    return results

