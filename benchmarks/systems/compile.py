"""torch.compile: new graphs (recompilations) of a compiled UNet over 100 random Share concept
switches, mixes and per-prompt selections, against Diffusers' ``set_adapters`` and LoRA hotswap on a
compiled UNet; also the cold compile time and the compiled against the eager output.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from benchmarks.systems.harness import ARCH_NAMES, Bench, free, load_loras, make_pipeline, med, random_lora, target, unet_inputs
from share_diffusers.io import save_share
from share_diffusers.targets import pipeline_shapes
from share_lab.tiny_pipelines import synthetic_state


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def bench_compile(cfg, bench: Bench) -> dict:
    """Concept switches on a compiled UNet: count new graphs (recompilations) with Dynamo's counters."""
    import torch._dynamo
    import torch._inductor.utils

    arch, dtype, device = cfg.compile_arch, cfg.dtype, cfg.device
    torch._dynamo.reset()
    pipe = make_pipeline(arch, dtype, device)
    shapes = {k: v for k, v in pipeline_shapes(pipe).items() if k.startswith("unet.")}
    tmp = Path(tempfile.mkdtemp(prefix="share-bench-"))
    names = [f"c{i}" for i in range(20)]
    save_share(synthetic_state(shapes, len(names)), tmp / "s.safetensors")
    pipe.load_share(tmp / "s.safetensors")
    unet = pipe.unet
    batch = 4
    args, kw = unet_inputs(unet, batch, cfg.compile_size)
    rng = random.Random(0)
    pipe.set_share_concepts("c0")
    # a fresh inductor cache: the compile time is that of a cold compile, not a hit from an earlier run
    with torch.no_grad(), torch._inductor.utils.fresh_cache():
        eager = bench.time(lambda: unet(*args, **kw))
        unet.compile(backend=cfg.compile_backend)
        t_compile = bench.time(lambda: unet(*args, **kw))
        g0 = _graphs()
        steps = []
        for i in range(100):  # random single concepts and two-concept mixes
            sel = rng.choice(names) if i % 4 else {rng.choice(names): 0.7, rng.choice(names): -0.3}
            pipe.set_share_concepts(sel)
            steps.append(bench.time(lambda: unet(*args, **kw)))
        recompiles_single = _graphs() - g0
        pipe.set_share_concepts("c3")
        out = unet(*args, **kw).sample
        with torch.compiler.set_stance("force_eager"):
            ref = unet(*args, **kw).sample
        err = ((out - ref).abs().max() / ref.abs().max()).item()

        pipe.set_share_concepts(rng.sample(names, batch))
        unet(*args, **kw)  # the per-prompt (index) path is a second graph, compiled once
        g1 = _graphs()
        for _ in range(100):
            sel = [rng.choice(names + [None]) for _ in range(batch)]  # None: that prompt without a concept
            sel[0] = sel[0] or names[0]
            pipe.set_share_concepts(sel)
            unet(*args, **kw)
        recompiles_per_prompt = _graphs() - g1
        g2 = _graphs()
        for i in range(10):  # nothing selected runs the original processors: one more graph, once
            pipe.set_share_concepts(None if i % 2 else rng.choice(names))
            unet(*args, **kw)
        graphs_none = _graphs() - g2
    pipe.unload_share()
    pipe = unet = None  # free the memory before the next measurement
    torch._dynamo.reset()
    free()

    baseline = {"hotswap": "not run (--quick)"} if cfg.quick else {}
    for mode in ("set_adapters",) if cfg.quick else ("set_adapters", "hotswap"):
        torch._dynamo.reset()
        pipe = make_pipeline(arch, dtype, device)
        unet = pipe.unet
        try:
            if mode == "hotswap":
                pipe.enable_lora_hotswap(target_rank=cfg.lora_rank)
                load_loras(pipe, shapes, ["hot"], cfg.lora_rank, ("unet",))
            else:
                load_loras(pipe, shapes, ["l0", "l1", "l2"], cfg.lora_rank, ("unet",))
                pipe.set_adapters("l0")
            unet.compile(backend="eager")
            with torch.no_grad():
                unet(*args, **kw)
                g = _graphs()
                for i in range(cfg.lora_compile_switches):
                    if mode == "hotswap":
                        sd = random_lora(shapes, cfg.lora_rank, 600 + i, ("unet",))
                        pipe.load_lora_weights(sd, adapter_name="hot", hotswap=True)
                    else:
                        pipe.set_adapters(["l0", "l1", "l2"][(i + 1) % 3])
                    unet(*args, **kw)
                baseline[mode] = _graphs() - g
        except Exception as e:
            baseline[mode] = f"{type(e).__name__}: {e}"
        pipe = unet = None  # free the memory before the next measurement
        torch._dynamo.reset()
        free()

    rows = [
        dict(what="Share: 100 random switches (single concepts and 2-concept mixes)", new_graphs=recompiles_single),
        dict(what=f"Share: 100 random per-prompt selections (batch of {batch}), after the first", new_graphs=recompiles_per_prompt),
        dict(what="Share: alternating None / a concept (the base graph, once)", new_graphs=graphs_none),
        dict(what=f"Diffusers set_adapters, {cfg.lora_compile_switches} switches among 3 LoRAs (backend eager)",
             new_graphs=baseline["set_adapters"]),
        dict(what=f"Diffusers hotswap (enable_lora_hotswap), {cfg.lora_compile_switches} swaps (backend eager)",
             new_graphs=baseline["hotswap"]),
    ]
    targets = [target("compile", "recompilations over 100 random concept switches (compiled UNet)", recompiles_single, "0",
                      recompiles_single == 0)]
    setup = (f"{ARCH_NAMES[arch]} UNet, torch.compile backend {cfg.compile_backend!r} (the Diffusers baselines: backend "
             f"'eager', which recompiles exactly as often), batch {batch}, latent {cfg.compile_size}²; new graphs counted "
             f"with torch._dynamo.utils.counters['stats']['unique_graphs']. Cold compile {t_compile:.1f} s; compiled step "
             f"{med(steps) * 1e3:.1f} ms vs eager {eager * 1e3:.1f} ms; compiled vs eager output after the switches: {err:.1e}")
    return dict(rows=rows, targets=targets, setup=setup, compile_s=t_compile, eager_step_s=eager,
                compiled_step_s=med(steps), compiled_vs_eager_rel_err=err)
