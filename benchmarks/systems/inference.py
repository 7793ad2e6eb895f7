"""Inference: the UNet step with a Share concept (unfused and fused) against the base UNet and a PEFT
LoRA of equal rank, and a batch of 8 images with 8 different concepts against one concept and
against PEFT's mixed-adapter batch (``adapter_names``).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from benchmarks.systems.harness import (
    ARCH_NAMES,
    Bench,
    K,
    P,
    free,
    load_loras,
    log,
    make_pipeline,
    med,
    peft_mixed_batch,
    sibling_pipeline,
    spread,
    target,
    unet_inputs,
)
from share_diffusers.io import save_share
from share_diffusers.targets import pipeline_shapes
from share_lab.tiny_pipelines import synthetic_state


def paired(times: dict[str, list[float]], base="base") -> dict[str, float]:
    """Median over rounds of each variant's time / the base's time in the same round (slow drifts of
    a shared machine cancel in each round's ratio)."""
    return {k: med([a / b for a, b in zip(v, times[base])]) for k, v in times.items()}


def bench_inference(cfg, bench: Bench) -> dict:
    """UNet steps: base / Share / Share fused / PEFT LoRA, and mixed-concept batches vs PEFT's."""
    arch, dtype, device = cfg.arch, cfg.dtype, cfg.device
    pipe = make_pipeline(arch, dtype, device)
    unet_base = copy.deepcopy(pipe.unet)  # a pristine copy: the base UNet, never touched
    pipe_peft = sibling_pipeline(pipe, copy.deepcopy(pipe.unet))
    shapes = {k: v for k, v in pipeline_shapes(pipe).items() if k.startswith("unet.")}
    tmp = Path(tempfile.mkdtemp(prefix="share-bench-"))
    save_share(synthetic_state(shapes, 100), tmp / "s.safetensors")
    pipe.load_share(tmp / "s.safetensors")
    concepts = [f"c{i}" for i in range(8)]
    adapters = [f"l{i}" for i in range(8)]
    load_loras(pipe_peft, shapes, adapters, K, ("unet",))  # equal rank: PEFT r = Share k
    share_unet, peft_unet = pipe.unet, pipe_peft.unet
    select = lambda s: (lambda: pipe.set_share_concepts(s))  # noqa: E731

    def run(model, args, kw):
        def step():
            with torch.no_grad():
                model(*args, **kw)
        return step

    # -- one concept, a CFG batch of 2: Share unfused and PEFT against the base
    args, kw = unet_inputs(share_unet, 2, cfg.size)
    one = bench.interleaved(
        {"base": run(unet_base, args, kw), "share": run(share_unet, args, kw), "share_none": run(share_unet, args, kw),
         "peft": run(peft_unet, args, kw)},
        cfg.repeats, setup={"share": select("c0"), "share_none": select(None), "peft": lambda: pipe_peft.set_adapters("l0")},
    )
    log("inference, batch 2: " + ", ".join(f"{k} {med(v):.3f} s" for k, v in one.items()))
    # -- fused, in its own block (fusing every round would churn memory inside the measurement)
    pipe.set_share_concepts("c0")
    pipe.fuse_share()
    fused = bench.interleaved({"base": run(unet_base, args, kw), "share_fused": run(share_unet, args, kw)}, cfg.repeats)
    pipe.unfuse_share()
    log("inference, batch 2, fused: " + ", ".join(f"{k} {med(v):.3f} s" for k, v in fused.items()))

    # -- a batch of 8 images with 8 different concepts
    args8, kw8 = unet_inputs(share_unet, 8, cfg.mixed_size)
    mixed_ctx = {}

    def enter_mixed():
        mixed_ctx["cm"] = peft_mixed_batch(peft_unet, adapters)
        mixed_ctx["cm"].__enter__()

    def exit_mixed():
        if "cm" in mixed_ctx:
            mixed_ctx.pop("cm").__exit__(None, None, None)

    mixed = bench.interleaved(
        {"base": run(unet_base, args8, kw8), "share_one": run(share_unet, args8, kw8), "share_mixed": run(share_unet, args8, kw8),
         "peft_one": run(peft_unet, args8, kw8), "peft_mixed": run(peft_unet, args8, kw8)},
        cfg.repeats,
        setup={"base": exit_mixed, "share_one": select("c0"), "share_mixed": select(concepts),
               "peft_one": lambda: (exit_mixed(), pipe_peft.set_adapters("l0")), "peft_mixed": enter_mixed},
    )
    exit_mixed()
    log("inference, batch 8: " + ", ".join(f"{k} {med(v):.3f} s" for k, v in mixed.items()))

    # correctness of what was timed: the mixed batch equals eight single-concept runs
    with torch.no_grad():
        pipe.set_share_concepts(concepts)
        mixed_out = share_unet(*args8, **kw8).sample
        singles = []
        for i, c in enumerate(concepts):
            pipe.set_share_concepts(c)
            a = (args8[0][i : i + 1], args8[1], args8[2][i : i + 1])
            k = {"added_cond_kwargs": {n: v[i : i + 1] for n, v in kw8["added_cond_kwargs"].items()}} if kw8 else {}
            singles.append(share_unet(*a, **k).sample)
        mixed_err = ((mixed_out - torch.cat(singles)).abs().max() / mixed_out.abs().max()).item()
    pipe.unload_share()
    pipe = pipe_peft = unet_base = share_unet = peft_unet = None  # free the memory before the next measurement
    free()

    r1, rf, rm = paired(one), paired(fused), paired(mixed)
    rows_o = [dict(variant=k, median_s=med(v), vs_base=r1[k], spread=spread(v)) for k, v in one.items()]
    rows_o.append(dict(variant="share_fused (own block)", median_s=med(fused["share_fused"]), vs_base=rf["share_fused"],
                       spread=spread(fused["share_fused"])))
    rows_m = [dict(variant=k, median_s=med(v), vs_base=rm[k], spread=spread(v)) for k, v in mixed.items()]
    pct = lambda r: f"{100 * (r - 1):+.2f}%"  # noqa: E731
    mixed_ratio = med([a / b for a, b in zip(mixed["share_one"], mixed["share_mixed"])])
    vs_peft = med([a / b for a, b in zip(mixed["peft_mixed"], mixed["share_mixed"])])
    targets = [
        target("mixed", "throughput, 8 concepts in one batch / one concept", mixed_ratio, "≥ 0.9", mixed_ratio >= 0.9,
               share=med(mixed["share_mixed"]), baseline=med(mixed["share_one"])),
        target("mixed", "PEFT mixed-adapter batch time / Share mixed batch time (whole UNet step)", vs_peft, "≥ 1.5×",
               vs_peft >= 1.5, share=med(mixed["share_mixed"]), baseline=med(mixed["peft_mixed"]),
               note=f"above the base step: PEFT mixed {pct(rm['peft_mixed'])}, Share mixed {pct(rm['share_mixed'])}"),
        target("overhead", "Share unfused step / base ≤ PEFT LoRA step / base", r1["share"], f"≤ {r1['peft']:.4f}",
               r1["share"] <= r1["peft"], share=med(one["share"]), baseline=med(one["peft"]),
               note=f"Share {pct(r1['share'])}, PEFT {pct(r1['peft'])}, Share with nothing selected {pct(r1['share_none'])}"),
        target("overhead", "Share fused step / base step", rf["share_fused"], "≤ 1.01", rf["share_fused"] <= 1.01,
               share=med(fused["share_fused"]), baseline=med(fused["base"])),
    ]
    setup = (f"{ARCH_NAMES[arch]} UNet ({len(shapes)} adapted layers, {cfg.dtype_name}), text states of 77 tokens; one concept: "
             f"batch 2 (a CFG pair) at latent {cfg.size}² ({8 * cfg.size} px); mixed: batch 8 at latent {cfg.mixed_size}²; "
             f"{cfg.repeats} interleaved rounds after 1 warm-up; vs_base = median over rounds of the time / the base's time in "
             f"the same round; Share k={K}, p={P}; PEFT LoRAs rank {K} (equal rank: the same width of the two large "
             "products); base = an untouched copy of the UNet; PEFT's mixed batch = its adapter_names hooks")
    return dict(rows_overhead=rows_o, rows_mixed=rows_m, targets=targets, setup=setup, mixed_rel_err=mixed_err,
                raw=dict(one=one, fused=fused, mixed=mixed))
