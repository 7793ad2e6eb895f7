"""Transformer pipelines at their real sizes: FLUX.1-dev and Stable Diffusion 3.5 Large (random weights
from the configs in ``benchmarks/configs``), Share at k = 32 (the seed paper's Flux setting).

* bytes per concept against LoRA ranks 16 and 64, and the basis, from the full models' layer shapes
  (built on the meta device: no weights);
* switch latency with C concepts resident on every adapted layer of the full model;
* unfused and fused step overhead and a batch with a different concept per sample, against the base
  model and a PEFT LoRA of rank 16 on the same layers, on the model's first blocks at full width: a
  whole FLUX.1-dev in fp32 is 47.6 GB, twice this machine's memory, and every block has the same shapes.
"""

from __future__ import annotations

import json
import random

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from peft import LoraConfig
from transformers.initialization import no_init_weights

from benchmarks.systems.harness import Bench, config, default_dtype, fill_random_, free, log, med, target
from share_diffusers.processor import ShareAdapter, attach, detach
from share_diffusers.targets import TRANSFORMER_TARGETS, find_targets, layer_shape
from share_lab.tiny_pipelines import FLUX_TRANSFORMER, SD3_TRANSFORMER, synthetic_state

K_T = 32  # the seed paper's k for FLUX.1-dev
# name -> (model class, config (dict or benchmarks/configs name), the blocks kept for the timed forward passes)
TRANSFORMER_ARCHS = {
    "flux1-dev": (FluxTransformer2DModel, "flux1_dev_transformer", {"num_layers": 1, "num_single_layers": 1}),
    "sd35-large": (SD3Transformer2DModel, "sd35_large_transformer", {"num_layers": 2}),
    "tiny-flux": (FluxTransformer2DModel, FLUX_TRANSFORMER, {}),
    "tiny-sd3": (SD3Transformer2DModel, SD3_TRANSFORMER, {}),
}
NAMES = {"flux1-dev": "FLUX.1-dev", "sd35-large": "SD 3.5 Large", "tiny-flux": "tiny Flux", "tiny-sd3": "tiny SD3"}


def build(arch: str, blocks: dict | None = None, dtype=torch.float32, device="cpu", meta=False):
    cls, spec, _ = TRANSFORMER_ARCHS[arch]
    cfg = config(spec) | (blocks or {})
    with torch.device("meta") if meta else torch.device("cpu"), no_init_weights(), default_dtype(dtype):
        model = cls(**cfg)
    if meta:
        return model
    return fill_random_(model, 0).to(device).eval().requires_grad_(False)


def inputs(model, batch: int, tokens: int, text_tokens: int, seed=0) -> dict:
    """Random forward arguments: ``tokens`` image tokens (after patching) and ``text_tokens`` text tokens."""
    g = torch.Generator().manual_seed(seed)
    cfg, device, dtype = model.config, model.device, model.dtype
    rand = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    kw = dict(encoder_hidden_states=rand(batch, text_tokens, cfg.joint_attention_dim), pooled_projections=rand(batch, cfg.pooled_projection_dim),
              timestep=torch.full((batch,), 0.5 if isinstance(model, FluxTransformer2DModel) else 500.0, device=device, dtype=dtype),
              return_dict=False)
    if isinstance(model, FluxTransformer2DModel):
        side = int(tokens**0.5)
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)  # (0, row, column) as FluxPipeline
        kw |= dict(hidden_states=rand(batch, side * side, cfg.in_channels), img_ids=img_ids.to(device, dtype),
                   txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype))
        if cfg.guidance_embeds:
            kw["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    else:
        side = int(tokens**0.5) * cfg.patch_size
        kw["hidden_states"] = rand(batch, cfg.in_channels, side, side)
    return kw


def storage(shapes: dict, k: int = K_T, p: int = 1) -> dict:
    """Bytes (fp32) per concept, of the basis, and of LoRAs of rank 16 and 64 on the same layers."""
    nd = list(shapes.values())
    out = dict(layers=len(nd), share_bytes_per_concept=sum(2 * min(k, n, d) * p for n, d in nd) * 4,
               basis_bytes=sum((n + d) * min(k, n, d) for n, d in nd) * 4)
    for r in (16, 64):
        out[f"lora_r{r}_bytes"] = sum(r * (n + d) for n, d in nd) * 4
        out[f"lora_r{r}_over_share"] = out[f"lora_r{r}_bytes"] / out["share_bytes_per_concept"]
    return out


def switch_latency(bench: Bench, shapes: dict, concepts: int, switches: int, device) -> float:
    """Median seconds of one switch (``ShareAdapter.select``, what ``set_share_concepts`` does per model)."""
    state = synthetic_state(shapes, concepts, k=K_T)
    adapter = ShareAdapter(list(state.layers.values()), device=device)
    del state
    rng = random.Random(0)
    picks = torch.eye(concepts)[[rng.randrange(concepts) for _ in range(switches)]]
    times = [bench.time(lambda w=w: adapter.select(w[None])) for w in picks]
    return med(times[len(times) // 10 :])


def forward_overheads(cfg, bench: Bench, arch: str) -> dict:
    """Step time of the first blocks at full width: base, Share unfused / fused / one concept per sample, PEFT LoRA r16."""
    _, _, blocks = TRANSFORMER_ARCHS[arch]
    model = build(arch, blocks, cfg.arch_dtype, cfg.device)
    targets = find_targets(model, "transformer")
    shapes = {f"transformer.{n}": layer_shape(m) for n, m in targets.items()}
    batch = cfg.transformer_batch
    state = synthetic_state(shapes, batch, k=K_T, scale=0.05)
    adapter = ShareAdapter(list(state.layers.values()), device=cfg.device, dtype=cfg.arch_dtype)
    attach(model, "transformer", list(targets), adapter)
    kw = inputs(model, batch, cfg.transformer_tokens, cfg.transformer_text_tokens)
    eye = torch.eye(batch)

    def run():
        with torch.no_grad():
            return model(**kw)[0]

    def setup_base():
        adapter.unfuse()
        adapter.select(None)
        adapter.index = None

    def setup_one():
        setup_base()
        adapter.select(eye[:1])

    def setup_mixed():
        setup_base()
        adapter.select(eye)
        adapter.index = torch.arange(batch, device=cfg.device)

    def setup_fused():
        setup_one()
        adapter.fuse()

    before = [t.detach().clone() for t in model.parameters()]
    variants = {"base": run, "share unfused": run, "share mixed": run, "share fused": run}
    setups = {"base": setup_base, "share unfused": setup_one, "share mixed": setup_mixed, "share fused": setup_fused}
    times = bench.interleaved(variants, cfg.repeats, setup=setups)
    setup_base()
    bit_exact = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    setup_mixed()
    mixed = run()
    separate = []
    for i in range(batch):  # each sample's concept for the whole batch: sample i must match
        setup_base()
        adapter.select(eye[i : i + 1])
        separate.append(run()[i])
    setup_base()
    mixed_rel_err = float((mixed - torch.stack(separate)).norm() / torch.stack(separate).norm())
    detach(model)
    cls_name = type(model).__name__
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=list(TRANSFORMER_TARGETS[cls_name])))
    times["peft lora r16"] = bench.interleaved({"peft lora r16": run}, cfg.repeats)["peft lora r16"]
    model.disable_adapters()
    times["base again"] = bench.interleaved({"base again": run}, cfg.repeats)["base again"]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    base = med(times["base"] + times["base again"])
    rows = [dict(arch=NAMES[arch], variant=name, median_s=med(ts), vs_base=med(ts) / base) for name, ts in times.items()]
    return dict(rows=rows, bit_exact=bit_exact, mixed_rel_err=mixed_rel_err, params_m=params, blocks=blocks, layers=len(shapes))


def bench_transformers(cfg, bench: Bench) -> dict:
    """Storage, switch latency and step overheads of Share on the FLUX.1-dev and SD 3.5 Large transformers."""
    storage_rows, switch_rows, overhead_rows, targets, details = [], [], [], [], {}
    for arch in cfg.transformer_archs:
        meta = build(arch, meta=True)
        params_b = sum(p.numel() for p in meta.parameters()) / 1e9
        shapes = {f"transformer.{n}": layer_shape(m) for n, m in find_targets(meta, "transformer").items()}
        del meta
        s = storage(shapes)
        storage_rows.append(dict(arch=NAMES[arch], params_b=params_b, layers=s["layers"], share_kib_per_concept=s["share_bytes_per_concept"] / 1024,
                                 basis_mib=s["basis_bytes"] / 2**20, lora_r16_mib=s["lora_r16_bytes"] / 2**20,
                                 lora_r64_mib=s["lora_r64_bytes"] / 2**20, r16_over_share=s["lora_r16_over_share"],
                                 r64_over_share=s["lora_r64_over_share"]))
        log(f"transformers: {NAMES[arch]}: {s['layers']} layers, {s['share_bytes_per_concept'] / 1024:.0f} KiB per concept, "
            f"basis {s['basis_bytes'] / 2**20:.0f} MiB (k = {K_T})")
        for C in cfg.transformer_concepts:
            ms = switch_latency(bench, shapes, C, cfg.switches // 3, cfg.device) * 1e3
            switch_rows.append(dict(arch=NAMES[arch], concepts=C, layers=len(shapes), switch_ms=ms))
            log(f"transformers: {NAMES[arch]}: switch with {C} concepts {ms:.2f} ms")
        free()
        r = forward_overheads(cfg, bench, arch)
        free()
        overhead_rows += r["rows"]
        details[arch] = dict(storage=s, forward_params_m=r["params_m"], forward_blocks=r["blocks"], forward_layers=r["layers"],
                             unfuse_bit_exact=r["bit_exact"], mixed_rel_err=r["mixed_rel_err"])
        v = {row["variant"]: row["vs_base"] for row in r["rows"]}
        name = NAMES[arch]
        targets += [
            target("transformers", f"{name}: unfused step / base (PEFT LoRA r16: {v['peft lora r16']:.3f})", v["share unfused"],
                   "≤ PEFT LoRA r16", v["share unfused"] <= v["peft lora r16"], share=v["share unfused"], baseline=v["peft lora r16"]),
            target("transformers", f"{name}: fused step / base; unfuse bit-exact", v["share fused"], "≤ 1.01, bit-exact",
                   v["share fused"] <= 1.01 and r["bit_exact"]),
            target("transformers", f"{name}: batch of {cfg.transformer_batch} with a concept each / one concept",
                   v["share unfused"] / v["share mixed"], "≥ 0.9", v["share unfused"] / v["share mixed"] >= 0.9),
            target("transformers", f"{name}: stored per concept vs LoRA r16 / r64", s["lora_r16_over_share"], "—", True,
                   note=f"{s['lora_r16_over_share']:.0f}× / {s['lora_r64_over_share']:.0f}× smaller; basis {s['basis_bytes'] / 2**20:.0f} MiB once"),
        ]
        log(f"transformers: {name}: " + json.dumps({k: round(x, 3) for k, x in v.items()}))
    setup = (f"Share k = {K_T}, p = 1; switch latency = `ShareAdapter.select` on every adapted layer of the full model "
             f"({cfg.switches // 3} random switches); step times on the first blocks at full width ({cfg.transformer_batch} samples, "
             f"{cfg.transformer_tokens} image + {cfg.transformer_text_tokens} text tokens, {cfg.repeats} interleaved rounds, "
             f"{cfg.arch_dtype_name}), base measured before and after the PEFT LoRA's rounds")
    return dict(setup=setup, rows=storage_rows, rows_overhead=overhead_rows, rows_mixed=switch_rows, results=details, targets=targets)
