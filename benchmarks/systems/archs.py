"""Real architectures: SD 1.5 and SDXL (UNet + text encoders, random weights from the configs in
``benchmarks/configs``): inject a new concept, train two steps, merge, save, load, select,
fuse / unfuse (bit-exact), export to a LoRA that reproduces the concept; stored bytes and trainable
parameters per concept against LoRA r4 / r16.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.systems.harness import ARCH_NAMES, ARCHS, PHI, Bench, K, P, build_model, free, log, make_pipeline, meta_shapes, target, unet_inputs
from share_diffusers.io import save_share
from share_diffusers.lora import share_to_lora
from share_diffusers.subspace import ShareState
from share_diffusers.targets import base_linear, find_targets, pipeline_shapes


def fingerprint(tensors) -> list[int]:
    """Exact fingerprints of weights: the integer sum of their bit patterns (any changed bit shows)."""
    ints = {4: torch.int32, 2: torch.int16}
    return [int(t.detach().view(ints[t.element_size()]).sum(dtype=torch.int64)) for t in tensors]


def text_states(pipe, ids):
    """``(encoder_hidden_states, added_cond_kwargs)`` from the pipeline's text encoder(s), with gradients."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return pipe.text_encoder(ids).last_hidden_state, {}
    h1 = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    o2 = pipe.text_encoder_2(ids, output_hidden_states=True)
    ehs = torch.cat([h1, o2.hidden_states[-2]], -1)
    n = pipe.unet.config.addition_time_embed_dim
    time_ids = torch.zeros(ids.shape[0], 6, device=ids.device, dtype=ehs.dtype)
    pooled = o2.text_embeds
    assert pooled.shape[-1] + 6 * n == pipe.unet.config.projection_class_embeddings_input_dim
    return ehs, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def storage_table(shapes: dict) -> dict:
    """Bytes per concept and trainable parameters (UNet + text encoders), Share defaults vs LoRA."""
    nd = [(n, d) for n, d in shapes.values()]
    f32 = 4
    share_concept = sum(2 * min(K, n, d) * P for n, d in nd)
    return dict(
        layers=len(nd),
        share_bytes_per_concept=share_concept * f32,
        share_basis_bytes=sum((n + d) * min(K, n, d) for n, d in nd) * f32,
        lora_r4_bytes=sum(4 * (n + d) for n, d in nd) * f32,
        lora_r16_bytes=sum(16 * (n + d) for n, d in nd) * f32,
        share_trainable_default=sum(2 * min(K, n, d) * P + PHI * (n + d) + 2 * PHI * P for n, d in nd),
        share_trainable_first_concept=sum(PHI * (n + d) + 2 * PHI * P for n, d in nd),
        share_trainable_phi0=share_concept,
        lora_r4_trainable=sum(4 * (n + d) for n, d in nd),
        lora_r16_trainable=sum(16 * (n + d) for n, d in nd),
    )


def available_bytes() -> int:
    with contextlib.suppress(OSError, StopIteration):
        line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return 1 << 62


def fitting_dtype(arch: str, dtype) -> tuple[torch.dtype, str]:
    """``dtype``, or bf16 when the weights, one component's fused-weight copy and a margin do not fit in RAM."""
    element = torch.finfo(dtype).bits // 8
    params = sum(sum(p.numel() for p in build_model(arch, c, meta=True).parameters()) for c in ARCHS[arch])
    shapes = meta_shapes(arch)
    biggest_fuse = max(sum(n * d for name, (n, d) in shapes.items() if name.startswith(c + ".")) for c in ARCHS[arch])
    need, have = (params + biggest_fuse) * element + (3 << 29), available_bytes()
    if need <= have or dtype != torch.float32:
        return dtype, ""
    return torch.bfloat16, f"{dtype} needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available: ran in bf16"


def bench_archs(cfg, bench: Bench) -> dict:
    out, targets = {}, []
    for arch in cfg.archs:
        out[arch], works = one_arch(arch, cfg, bench)
        targets.append(works)
        free()  # the memory of one architecture before the next
    setup = (f"UNet + text encoder(s) from benchmarks/configs, random weights, {cfg.arch_dtype_name} unless noted, latent "
             f"{cfg.arch_size}² ({8 * cfg.arch_size} px), one prompt of 77 tokens; training: the first concept "
             f"(empty basis; p={P}, φ={PHI}), UNet and text encoders, AdamW")
    return dict(results=out, targets=targets, setup=setup)


def one_arch(arch: str, cfg, bench: Bench) -> tuple[dict, dict]:
    """One architecture end to end: its results and its target (everything works)."""
    from share_diffusers.training import attach_new_concept, concept_factors, detach_new_concept

    log(f"archs: building {ARCH_NAMES[arch]}")
    r, device, dtype = {}, cfg.device, cfg.arch_dtype
    if torch.device(device).type == "cpu":
        dtype, r["dtype_note"] = fitting_dtype(arch, dtype)
    r["dtype"] = str(dtype).removeprefix("torch.")
    t = time.perf_counter()
    pipe = make_pipeline(arch, dtype, device)
    r["build_s"] = time.perf_counter() - t
    comps = {c: getattr(pipe, c) for c in ARCHS[arch]}
    r["params_m"] = {c: sum(p.numel() for p in m.parameters()) / 1e6 for c, m in comps.items()}
    shapes = pipeline_shapes(pipe)
    r["adapted_layers"] = {c: sum(1 for n in shapes if n.startswith(c + ".")) for c in comps}
    ids = torch.randint(0, 500, (1, 77), device=device)
    args, kw = unet_inputs(pipe.unet, 1, cfg.arch_size)
    unet = pipe.unet

    # 1. inject a new concept into UNet + text encoders (first concept: empty basis) and train two steps
    state0 = ShareState.empty(shapes)
    trainers = attach_new_concept(comps, state0, p=P, phi=PHI)
    params = [p for t_ in trainers.values() for p in t_.parameters() if p.numel()]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # no decay: a tensor moves only through its gradient
    losses, step_times, before = [], [], [p.detach().clone() for p in params]
    had_grad = [False] * len(params)

    def step():
        ehs, extra = text_states(pipe, ids)
        pred = unet(args[0], args[1], ehs, **extra).sample
        loss = torch.nn.functional.mse_loss(pred.float(), torch.zeros_like(pred, dtype=torch.float32))
        loss.backward()
        for i, p in enumerate(params):
            had_grad[i] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    for _ in range(2):  # ΔW = 0 at step 0; every tensor with a gradient path moves within two steps
        step_times.append(bench.time(step))
    moved = [not torch.equal(a, b) for a, b in zip(before, params)]
    unet_params = {id(p) for p in trainers["unet"].parameters()}
    no_path = [i for i, p in enumerate(params) if not had_grad[i]]
    r["train_step_s"], r["train_losses"] = step_times, losses
    r["trainable"] = sum(p.numel() for p in params)
    r["trainable_tensors_moved"] = f"{sum(moved)}/{len(params)}"
    r["trainable_tensors_without_gradient"] = sorted({f"{c}: {len([i for i in no_path if id(params[i]) in {id(q) for q in t_.parameters()}])}"
                                                      for c, t_ in trainers.items()} - {f"{c}: 0" for c in trainers})
    train_ok = (all(moved[i] for i in range(len(params)) if had_grad[i])
                and all(had_grad[i] for i, p in enumerate(params) if id(p) in unet_params))
    factors = concept_factors(trainers)
    detach_new_concept(comps)
    trainers = opt = params = before = None  # free the memory before the next measurement
    free()

    # 2. merge it (and a second concept) into a Share state; save
    t = time.perf_counter()
    state, report = state0.merge({"concept": factors}, k_max=K)
    r["merge_first_s"] = time.perf_counter() - t
    g = torch.Generator().manual_seed(3)
    other = {n: (torch.randn(a.shape[0], P, generator=g) * 1e-3, torch.randn(b.shape[0], P, generator=g) * 1e-3) for n, (a, b) in factors.items()}
    t = time.perf_counter()
    state, report = state.merge({"other": other}, k_max=K)
    r["merge_second_s"] = time.perf_counter() - t
    r["merge_error_after_second"] = {c: v["overall"] for c, v in report.items()}
    tmp = Path(tempfile.mkdtemp(prefix="share-bench-"))
    save_share(state, tmp / "share.safetensors")
    save_share(ShareState({n: l.subset([0]) for n, l in state.layers.items()}, state.concepts[:1]), tmp / "one.safetensors")
    r["file_bytes_2_concepts"] = (tmp / "share.safetensors").stat().st_size
    r["file_bytes_per_concept_measured"] = r["file_bytes_2_concepts"] - (tmp / "one.safetensors").stat().st_size
    factors = other = None  # free the memory before the next measurement

    # 3. load, select, fuse / unfuse, export
    with torch.no_grad():
        base_out = unet(*args, **kw).sample
        pipe.load_share(tmp / "share.safetensors")
        pipe.set_share_concepts("concept")
        share_out = unet(*args, **kw).sample
        r["share_vs_base_rel_diff"] = ((share_out - base_out).abs().max() / base_out.abs().max()).item()
        ehs_share = text_states(pipe, ids)[0]
        fused_diffs, restored = {}, True
        for c, m in comps.items():  # one component at a time: fusing keeps a copy of its adapted weights
            weights = [base_linear(mod).weight for mod in find_targets(m, c).values()]
            before_fp = fingerprint(weights)
            t = time.perf_counter()
            pipe.fuse_share(components=[c])
            r.setdefault("fuse_s", {})[c] = time.perf_counter() - t
            if c == "unet":
                fused_out = unet(*args, **kw).sample
                fused_diffs[c] = ((fused_out - share_out).abs().max() / share_out.abs().max()).item()
            t = time.perf_counter()
            pipe.unfuse_share(components=[c])
            r.setdefault("unfuse_s", {})[c] = time.perf_counter() - t
            restored &= fingerprint(weights) == before_fp
        r["fused_vs_unfused_rel_diff"] = fused_diffs
        r["unfuse_bit_exact"] = restored
        t = time.perf_counter()
        share_to_lora(tmp / "share.safetensors", "concept", tmp / "concept_lora.safetensors")
        r["export_s"] = time.perf_counter() - t
        r["lora_file_bytes"] = (tmp / "concept_lora.safetensors").stat().st_size
        pipe.unload_share()
        pipe.load_lora_weights(str(tmp), weight_name="concept_lora.safetensors", adapter_name="exported")
        lora_out = unet(*args, **kw).sample
        ehs_lora = text_states(pipe, ids)[0]
        r["exported_lora_vs_share_rel_diff"] = ((lora_out - share_out).abs().max() / share_out.abs().max()).item()
        r["exported_lora_vs_share_rel_to_effect"] = ((lora_out - share_out).abs().max() / (share_out - base_out).abs().max()).item()
        r["exported_lora_text_vs_share_rel_diff"] = ((ehs_lora - ehs_share).abs().max() / ehs_share.abs().max()).item()
        pipe.unload_lora_weights()
    r["storage"] = storage_table(shapes)
    for f in tmp.iterdir():
        f.unlink()
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # relative to the output: what rounding in this dtype allows
    ok = (all(math.isfinite(x) for x in losses) and train_ok and r["unfuse_bit_exact"] and r["share_vs_base_rel_diff"] > 0
          and r["exported_lora_vs_share_rel_diff"] <= tol and max(fused_diffs.values()) <= tol)
    works = target("archs", f"{ARCH_NAMES[arch]}: inject, train 2 steps, merge, load, fuse/unfuse, export", ok, "all work", ok,
                   note=f"{r['dtype']}; relative to the output: concept's effect {r['share_vs_base_rel_diff']:.1e}, fused vs "
                        f"unfused {max(fused_diffs.values()):.1e}, exported LoRA vs Share {r['exported_lora_vs_share_rel_diff']:.1e} "
                        f"(tolerance {tol:.0e}); unfuse bit-exact {r['unfuse_bit_exact']}, "
                        f"trainable tensors moved {r['trainable_tensors_moved']} (without a gradient path: "
                        f"{', '.join(r['trainable_tensors_without_gradient']) or 'none'})")
    log(f"archs: {ARCH_NAMES[arch]} done: " + json.dumps({k: v for k, v in r.items() if k not in ('storage',)}, default=str)[:600])
    return r, works  # its models, states and outputs are freed on return
