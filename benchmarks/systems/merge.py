"""Merge scaling: merging one new concept into a Share state holding 10 / 100 / 1000 concepts
(``ShareState.merge``); the time against the goal of 2 s, and its growth exponent against linear.
"""

from __future__ import annotations

import math
import time

import torch

from benchmarks.systems.harness import ARCH_NAMES, Bench, K, P, log, med, meta_shapes, target
from share_lab.tiny_pipelines import synthetic_state


def bench_merge(cfg, bench: Bench) -> dict:
    """Merging one new concept (dense n×p, d×p factors) into a state holding C concepts."""
    shapes = meta_shapes(cfg.arch)
    g = torch.Generator().manual_seed(1)
    new = {"new": {name: (torch.randn(n, P, generator=g) * 0.05, torch.randn(d, P, generator=g) * 0.05) for name, (n, d) in shapes.items()}}
    rows, times = [], {}
    for C in cfg.merge_counts:
        state = synthetic_state(shapes, C)
        ts = []
        for _ in range(cfg.merge_repeats):
            t = time.perf_counter()
            merged, report = state.merge(new, k_max=K)
            ts.append(time.perf_counter() - t)
        times[C] = med(ts)
        rows.append(dict(concepts=C, median_s=times[C], runs=ts, merge_error_new=report["new"]["overall"],
                         max_merge_error_old=max(r["overall"] for n, r in report.items() if n != "new")))
        log(f"merge: {C} concepts: {times[C]:.3f} s")
        state = report = None  # free the memory before the next measurement
    cs = sorted(times)
    slope = math.log(times[cs[-1]] / times[cs[-2]]) / math.log(cs[-1] / cs[-2])
    targets = [
        target("merge", f"merge time with {cs[-1]} concepts", times[cs[-1]], "≤ 2 s", times[cs[-1]] <= 2.0),
        target("merge", f"growth exponent {cs[-2]}→{cs[-1]} concepts (1 = linear)", slope, "≤ 1", slope <= 1.0),
    ]
    setup = (f"{ARCH_NAMES[cfg.arch]} layer shapes ({len(shapes)} layers: UNet + text encoder), k_max={K}, p={P}: one new "
             f"concept merged into a state of C concepts (ShareState.merge: refit of the basis, re-projection of every "
             f"concept, per-concept merge errors), median of {cfg.merge_repeats}; one process, {torch.get_num_threads()} threads. "
             f"The synthetic concepts fill all k={K} directions evenly, so from 100 concepts on the new one loses its own "
             "direction at this k_max (merge error 1): the errors say nothing about real concepts, the times are the point")
    return dict(rows=rows, targets=targets, setup=setup, times=times)
