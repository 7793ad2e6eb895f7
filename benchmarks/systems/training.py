"""Training: step time, peak memory above the model and optimizer state of a new Share concept
(``attach_new_concept``, φ = 2 and φ = 0) against a PEFT LoRA of rank 4 (and 16) on the same UNet;
each variant in a fresh worker process (``--train-worker``) so that its memory is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from benchmarks.systems.harness import (
    ARCH_NAMES,
    DTYPES,
    PHI,
    ROOT,
    Bench,
    K,
    P,
    build_model,
    free,
    log,
    med,
    memory_kib,
    reset_peak_memory,
    target,
    unet_inputs,
)
from share_diffusers.targets import PROJECTIONS, find_targets, layer_shape
from share_lab.tiny_pipelines import synthetic_state


def train_worker(spec: dict) -> dict:
    """One training configuration (run in a fresh process by default, so its memory is its own)."""
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    bench = Bench(device)
    unet = build_model(spec["arch"], "unet", dtype, device)
    free()
    mem0 = memory_kib()
    cuda0 = torch.cuda.memory_allocated(device) if bench.device.type == "cuda" else 0
    variant = spec["variant"]
    if variant.startswith("lora"):
        from peft import LoraConfig

        r = int(variant.split("-r")[1])
        unet.add_adapter(LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian", target_modules=list(PROJECTIONS["unet"])))
        params = [p for p in unet.parameters() if p.requires_grad]
    else:
        from share_diffusers.training import attach_new_concept

        phi = int(variant.split("phi")[1])
        shapes = {f"unet.{n}": layer_shape(m) for n, m in find_targets(unet, "unet").items()}
        state = synthetic_state(shapes, 10)  # an existing basis (k = 16) learned from earlier concepts
        trainers = attach_new_concept({"unet": unet}, state, p=P, phi=phi)
        params = list(trainers["unet"].parameters())
    for p in params:
        p.data = p.data.float()  # trainable parameters in fp32, as under mixed precision
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    args, kw = unet_inputs(unet, spec["batch"], spec["size"])
    target_ = torch.randn_like(args[0])

    def step():
        with torch.autocast(bench.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = unet(*args, **kw).sample
        loss = torch.nn.functional.mse_loss(out.float(), target_.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(spec["warmup"]):
        bench.time(step)
    free()
    reset_peak_memory(device)
    before = memory_kib()
    times = [bench.time(step) for _ in range(spec["repeats"])]
    after = memory_kib()
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim)
    out = dict(
        variant=variant, step_s=med(times), steps=times, trainable=sum(p.numel() for p in params),
        trainable_bytes=sum(p.numel() * p.element_size() for p in params), optimizer_state_bytes=state_bytes,
        model_rss_mib=mem0.get("VmRSS", 0) / 1024, rss_before_steps_mib=before.get("VmRSS", 0) / 1024,
        peak_rss_mib=after.get("VmHWM", 0) / 1024,
    )
    out["peak_over_model_mib"] = out["peak_rss_mib"] - out["model_rss_mib"]
    if bench.device.type == "cuda":
        out["peak_over_model_mib"] = (torch.cuda.max_memory_allocated(device) - cuda0) / 2**20
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def bench_training(cfg, bench: Bench) -> dict:
    variants = ["lora-r4", f"share-phi{PHI}", "share-phi0"] + (["lora-r16"] if not cfg.quick else [])
    results = {}
    for variant in variants:
        spec = dict(variant=variant, arch=cfg.arch, device=cfg.device, dtype=cfg.dtype_name, batch=cfg.train_batch,
                    size=cfg.train_size, warmup=2, repeats=cfg.train_repeats, threads=cfg.threads)
        if cfg.quick:  # in-process: memory figures are then not isolated
            results[variant] = train_worker(spec)
        else:
            worker = [sys.executable, "-m", "benchmarks.systems", "--train-worker", json.dumps(spec)]
            proc = subprocess.run(worker, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"training worker {variant} failed:\n{proc.stderr[-3000:]}")
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[variant]
        log(f"training {variant}: {r['step_s']:.3f} s/step, peak +{r['peak_over_model_mib']:.0f} MiB over the model, "
            f"optimizer state {r['optimizer_state_bytes'] / 2**20:.2f} MiB")
        free()
    lora, share, share0 = results["lora-r4"], results[f"share-phi{PHI}"], results["share-phi0"]
    rows = [dict(variant=v, **{k: r[k] for k in ("step_s", "trainable", "optimizer_state_bytes", "peak_over_model_mib", "peak_rss_mib")})
            for v, r in results.items()]
    t_ratio = share["step_s"] / lora["step_s"]
    m_ratio = share["peak_over_model_mib"] / max(lora["peak_over_model_mib"], 1e-9)
    o_ratio = lora["optimizer_state_bytes"] / share["optimizer_state_bytes"]
    o_ratio0 = lora["optimizer_state_bytes"] / share0["optimizer_state_bytes"]
    targets = [
        target("training", f"Share (φ={PHI}) step time / LoRA r4", t_ratio, "≤ 1.1", t_ratio <= 1.1, share["step_s"], lora["step_s"]),
        target("training", f"Share (φ={PHI}) peak memory above the model / LoRA r4", m_ratio, "≤ 1.0", m_ratio <= 1.0,
               share["peak_over_model_mib"], lora["peak_over_model_mib"],
               note=f"whole-process peak RSS {share['peak_rss_mib']:.0f} vs {lora['peak_rss_mib']:.0f} MiB"),
        target("training", f"optimizer state, LoRA r4 / Share (φ={PHI}, the default)", o_ratio, "≥ 10×", o_ratio >= 10,
               share["optimizer_state_bytes"], lora["optimizer_state_bytes"],
               note="the φ temporary directions (n+d)·φ per layer are trained like LoRA factors"),
        target("training", "optimizer state, LoRA r4 / Share (φ=0: coefficients only)", o_ratio0, "≥ 10×", o_ratio0 >= 10,
               share0["optimizer_state_bytes"], lora["optimizer_state_bytes"]),
    ]
    setup = (f"{ARCH_NAMES[cfg.arch]} UNet, batch {cfg.train_batch} at latent {cfg.train_size}², MSE loss, AdamW, "
             f"{cfg.train_repeats} timed steps after 2 warm-up steps, {'in-process' if cfg.quick else 'one fresh process per variant'}; "
             f"Share: NewConcept (p={P}) attached as share_diffusers.training.attach_new_concept does, basis k={K} frozen; "
             "peak memory = peak RSS during the timed steps minus RSS of the loaded UNet (CUDA: max_memory_allocated)")
    return dict(rows=rows, targets=targets, setup=setup, raw=results)
