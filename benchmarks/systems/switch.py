"""Concept-switch latency against the number of concepts loaded: Share's ``set_share_concepts`` with
C concepts in one file, against Diffusers' ``set_adapters`` with N LoRAs of rank 4 loaded on the same
layers, and against Diffusers' LoRA hotswap (one resident LoRA overwritten from memory).
"""

from __future__ import annotations

import functools
import random
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.systems.harness import ARCH_NAMES, Bench, K, P, free, load_loras, log, make_pipeline, med, random_lora, target
from share_diffusers.io import save_share
from share_diffusers.targets import pipeline_shapes
from share_lab.tiny_pipelines import synthetic_state


def bench_switch(cfg, bench: Bench) -> dict:
    """``set_share_concepts`` with C concepts loaded vs ``set_adapters`` with N LoRAs loaded."""
    arch, dtype, device = cfg.arch, cfg.dtype, cfg.device
    pipe = make_pipeline(arch, dtype, device)
    shapes = pipeline_shapes(pipe)
    rows, share_ms, tmp = [], {}, Path(tempfile.mkdtemp(prefix="share-bench-"))
    rng = random.Random(0)
    for C in cfg.share_counts:
        t = time.perf_counter()
        save_share(synthetic_state(shapes, C), tmp / f"s{C}.safetensors")
        t_make = time.perf_counter() - t
        t = time.perf_counter()
        pipe.load_share(tmp / f"s{C}.safetensors")
        t_load = time.perf_counter() - t
        names = [f"c{i}" for i in range(C)]
        picks = [rng.choice(names) for _ in range(cfg.switches)]
        ts = [bench.time(functools.partial(pipe.set_share_concepts, name)) for name in picks]
        ts = ts[len(ts) // 10 :]  # the first switches warm up
        share_ms[C] = med(ts) * 1e3
        row = dict(method="Share set_share_concepts", loaded=C, median_ms=share_ms[C], p90_ms=statistics.quantiles(ts, n=10)[-1] * 1e3,
                   max_ms=max(ts) * 1e3, load_s=t_load, file_mb=(tmp / f"s{C}.safetensors").stat().st_size / 2**20, write_s=t_make)
        if C == max(cfg.share_counts) and C >= 8:
            mixes = [{a: 0.6, b: 0.4} for a, b in (rng.sample(names, 2) for _ in range(50))]
            lists = [rng.sample(names, 8) for _ in range(50)]
            row["mix_of_2_ms"] = med([bench.time(functools.partial(pipe.set_share_concepts, m)) for m in mixes]) * 1e3
            row["per_prompt_8_ms"] = med([bench.time(functools.partial(pipe.set_share_concepts, l)) for l in lists]) * 1e3
        rows.append(row)
        log(f"switch: Share, {C} concepts: {share_ms[C]:.3f} ms (load {t_load:.2f} s)")
        pipe.unload_share()
    for f in tmp.iterdir():
        f.unlink()

    lora_ms, loaded, load_times = {}, [], []
    for N in cfg.lora_counts:
        new = [f"lora{i}" for i in range(len(loaded), N)]
        load_times += load_loras(pipe, shapes, new, cfg.lora_rank, ("unet", "text_encoder"), seed0=100 + len(loaded))
        loaded += new
        bench.time(functools.partial(pipe.set_adapters, loaded[0]))
        ts = [bench.time(functools.partial(pipe.set_adapters, rng.choice(loaded))) for _ in range(cfg.lora_switches)]
        lora_ms[N] = med(ts) * 1e3
        rows.append(dict(method=f"Diffusers set_adapters (rank {cfg.lora_rank})", loaded=N, median_ms=lora_ms[N],
                         p90_ms=statistics.quantiles(ts, n=10)[-1] * 1e3 if len(ts) > 1 else lora_ms[N], max_ms=max(ts) * 1e3,
                         load_s=sum(load_times)))
        log(f"switch: set_adapters, {N} LoRAs: {lora_ms[N]:.2f} ms (loading took {sum(load_times):.1f} s)")
    pipe.unload_lora_weights()

    hotswap = None
    try:  # Diffusers' compile-friendly path: one resident LoRA whose weights are overwritten in place
        pipe.enable_lora_hotswap(target_rank=cfg.lora_rank)
        sds = [random_lora(shapes, cfg.lora_rank, 500 + i, ("unet",)) for i in range(4)]
        pipe.load_lora_weights(sds[0], adapter_name="hot")
        swaps = [functools.partial(pipe.load_lora_weights, sds[1 + i % 3], adapter_name="hot", hotswap=True) for i in range(cfg.lora_switches)]
        ts = [bench.time(swap) for swap in swaps]
        hotswap = med(ts) * 1e3
        rows.append(dict(method=f"Diffusers hotswap from memory (UNet only, rank {cfg.lora_rank})", loaded=1, median_ms=hotswap,
                         p90_ms=statistics.quantiles(ts, n=10)[-1] * 1e3 if len(ts) > 1 else hotswap, max_ms=max(ts) * 1e3))
        log(f"switch: LoRA hotswap: {hotswap:.2f} ms")
    except Exception as e:  # report, do not hide
        rows.append(dict(method="Diffusers hotswap", loaded=1, error=f"{type(e).__name__}: {e}"))
    pipe = None  # free the memory before the next measurement
    free()

    n_max = max(cfg.lora_counts)
    share_at = share_ms.get(n_max, share_ms[min(share_ms, key=lambda c: abs(c - n_max))])
    flat = max(share_ms.values()) / min(share_ms.values())
    speedup = lora_ms[n_max] / share_at
    targets = [
        target("switch", f"Share switch latency, worst over {min(share_ms)}–{max(share_ms)} concepts", max(share_ms.values()),
               "≤ 1 ms", max(share_ms.values()) <= 1.0, share=max(share_ms.values())),
        target("switch", f"flat in concepts: slowest / fastest median over {min(share_ms)}–{max(share_ms)}", flat, "≤ 1.5", flat <= 1.5),
        target("switch", f"set_adapters / Share switch time, {n_max} loaded", speedup, "≥ 100×", speedup >= 100,
               share=share_at, baseline=lora_ms[n_max]),
    ]
    setup = (f"{ARCH_NAMES[arch]} pipeline (UNet + text encoder, {len(shapes)} adapted layers, {cfg.dtype_name}); Share k={K}, "
             f"p={P}; LoRAs rank {cfg.lora_rank} on the same layers, loaded from memory; {cfg.switches} Share switches "
             f"(first 10% dropped), {cfg.lora_switches} set_adapters calls, random concepts; load_s: reading the Share file "
             "with C concepts / loading all N LoRAs (cumulative)")
    return dict(rows=rows, targets=targets, setup=setup, share_ms=share_ms, lora_ms=lora_ms, hotswap_ms=hotswap)
