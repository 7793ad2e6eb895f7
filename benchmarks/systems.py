"""Systems benchmark: Share against what Diffusers users would otherwise use (PEFT / Diffusers LoRA).

Every figure is a ratio against a baseline measured in the same process and run: timings are
medians over repeats after warm-up, variants of one comparison are interleaved round by round
(so slow drifts of a shared machine hit all of them alike), and nothing is cached across runs.

Sections (``--sections``, default all):

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

``python benchmarks/systems.py`` runs everything at full size on the CPU (about 30 minutes on two
cores); ``--quick`` runs every code path on tiny models in well under a minute (a smoke test, its
numbers mean little). Results: ``benchmarks/results/systems.{json,md,png}`` (or ``--out``).
``--device cuda --dtype bf16`` runs the same on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import functools
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.initialization import no_init_weights

import share_diffusers  # noqa: F401  (installs pipe.load_share & co.)
from share_diffusers.io import save_share
from share_diffusers.lora import share_to_lora
from share_diffusers.subspace import LayerShare, ShareState
from share_diffusers.targets import PROJECTIONS, base_linear, find_targets, layer_shape, pipeline_shapes
from share_lab.tiny_pipelines import SDXL_UNET, tokenizer_dir  # the test suite's tiny SDXL UNet, offline tokenizer

CONFIGS = Path(__file__).resolve().parent / "configs"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Share defaults of train/learn_concept.py: --basis_rank 16, --coef_rank 1, --num_extra_directions 2
K, P, PHI = 16, 1, 2

# ----------------------------------------------------------------------------- architectures

TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
    bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=32,
)
# name -> component -> config (a dict, or the name of a JSON file in benchmarks/configs)
ARCHS = {
    "tiny": {"unet": TINY_UNET, "text_encoder": TINY_TEXT},
    "tiny-xl": {"unet": SDXL_UNET, "text_encoder": TINY_TEXT, "text_encoder_2": TINY_TEXT},
    "sd15": {"unet": "sd15_unet", "text_encoder": "sd15_text_encoder"},
    "sdxl": {"unet": "sdxl_unet", "text_encoder": "sdxl_text_encoder", "text_encoder_2": "sdxl_text_encoder_2"},
}
ARCH_NAMES = {"tiny": "tiny SD-1-style", "tiny-xl": "tiny SDXL-style", "sd15": "SD 1.5", "sdxl": "SDXL"}


def config(spec) -> dict:
    if isinstance(spec, dict):
        return dict(spec)
    data = json.loads((CONFIGS / f"{spec}.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights fast: slices of one uniform random pool, scaled like PyTorch's defaults
    (±1/√fan_in for matrices and kernels); norms ≈ 1, biases small. Initialising SDXL with the
    per-layer default initialisers takes minutes on a CPU; this takes seconds."""
    g = torch.Generator().manual_seed(seed)
    pool = (torch.rand(1 << 22, generator=g) * 2 - 1).to(next(model.parameters()).device)
    for name, p in model.named_parameters():
        flat = p.view(-1)
        offset, i = int(torch.randint(0, pool.numel(), (1,), generator=g)), 0
        while i < flat.numel():
            m = min(flat.numel() - i, pool.numel() - offset)
            flat[i : i + m].copy_(pool[offset : offset + m])
            i, offset = i + m, 0
        if p.ndim >= 2:
            p.mul_(1 / math.sqrt(p[0].numel()))
        elif name.endswith("bias"):
            p.mul_(0.02)
        else:
            p.mul_(0.1).add_(1.0)
    return model


def build_model(arch: str, component: str, dtype=torch.float32, device="cpu", seed=0, meta=False):
    """A randomly initialised UNet or CLIP text encoder of ``arch`` (on the meta device: shapes only)."""
    cfg = config(ARCHS[arch][component])
    ctx = torch.device("meta") if meta else contextlib.nullcontext()
    with ctx, no_init_weights(), default_dtype(dtype):
        if component == "unet":
            model = UNet2DConditionModel(**cfg)
        else:
            cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            model = cls(CLIPTextConfig(**cfg))
    if meta:
        return model
    fill_random_(model, seed)
    return model.to(device).eval().requires_grad_(False)


def meta_shapes(arch: str) -> dict[str, tuple[int, int]]:
    """Share's adaptable layers of an architecture, ``{"unet.<module>": (n, d)}``, without any weights."""
    shapes = {}
    for component in ARCHS[arch]:
        model = build_model(arch, component, meta=True)
        shapes.update({f"{component}.{n}": layer_shape(m) for n, m in find_targets(model, component).items()})
    return shapes


def make_pipeline(arch: str, dtype=torch.float32, device="cpu", unet=None, seed=0):
    """A Diffusers pipeline with ``arch``'s UNet and text encoder(s) (random weights) and a tiny VAE
    (the VAE is never timed)."""
    xl = "text_encoder_2" in ARCHS[arch]
    unet = unet if unet is not None else build_model(arch, "unet", dtype, device, seed)
    vae = AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    ).to(device, dtype)
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir())
    common = dict(unet=unet, vae=vae, text_encoder=build_model(arch, "text_encoder", dtype, device, seed + 1), tokenizer=tok)
    if xl:
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
        pipe = StableDiffusionXLPipeline(
            **common, scheduler=scheduler, tokenizer_2=tok,
            text_encoder_2=build_model(arch, "text_encoder_2", dtype, device, seed + 2),
        )
    else:
        scheduler = DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
            steps_offset=1,
        )
        pipe = StableDiffusionPipeline(
            **common, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sibling_pipeline(pipe, unet):
    """The same pipeline with another UNet (text encoders, VAE, tokenizers shared)."""
    return type(pipe)(**{**pipe.components, "unet": unet})


def unet_inputs(unet, batch: int, size: int, seed=0, tokens=77):
    """Random ``(sample, timestep, encoder_hidden_states)`` and ``added_cond_kwargs`` for ``unet``."""
    g = torch.Generator().manual_seed(seed)
    cfg, device, dtype = unet.config, unet.device, unet.dtype
    rand = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    kw = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": rand(batch, pooled), "time_ids": rand(batch, 6)}
    args = (rand(batch, cfg.in_channels, size, size), torch.tensor(500, device=device), rand(batch, tokens, cfg.cross_attention_dim))
    return args, kw


# ----------------------------------------------------------------------------- Share and LoRA data


def synthetic_state(shapes: dict, concepts: int, k=K, p=P, seed=0, scale=0.05) -> ShareState:
    """A Share state with ``concepts`` concepts: random orthonormal bases (k per side), random
    balanced coefficients. What a trained file holds, as far as speed and size are concerned."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (n, d) in shapes.items():
        kk = min(k, n, d)
        U = torch.linalg.qr(torch.randn(n, kk, generator=g))[0]
        V = torch.linalg.qr(torch.randn(d, kk, generator=g))[0]
        B = torch.randn(concepts, kk, p, generator=g) * scale
        A = torch.randn(concepts, kk, p, generator=g) * scale
        layers[name] = LayerShare(U, V, B, A)
    return ShareState(layers, [{"name": f"c{i}", "trigger": f"<c{i}>"} for i in range(concepts)])


def random_lora(shapes: dict, rank: int, seed: int, components=("unet", "text_encoder")) -> dict:
    """A Diffusers LoRA state dict (PEFT-style keys, scale 1) on Share's target layers."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (n, d) in shapes.items():
        component, _, module = name.partition(".")
        if component not in components:
            continue
        prefix = f"{component}.{module}" if component == "unet" else f"{component}.text_model.{module}"
        sd[f"{prefix}.lora_A.weight"] = torch.randn(rank, d, generator=g) / math.sqrt(d)
        sd[f"{prefix}.lora_B.weight"] = torch.randn(n, rank, generator=g) * 0.01
    return sd


def load_loras(pipe, shapes, names, rank, components, seed0=100) -> list[float]:
    """Load one random LoRA per name from memory (``pipe.load_lora_weights(dict)``); load times."""
    times = []
    for i, name in enumerate(names):
        sd = random_lora(shapes, rank, seed0 + i, components)
        t = time.perf_counter()
        pipe.load_lora_weights(sd, adapter_name=name)
        times.append(time.perf_counter() - t)
    return times


@contextlib.contextmanager
def peft_mixed_batch(model, adapter_names):
    """PEFT's mixed-adapter batch on a Diffusers model: what ``PeftModel(..., adapter_names=[...])``
    does (``LoraModel._enable_peft_forward_hooks``), i.e. pass ``adapter_names`` to every LoRA layer."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.model import _adapter_names_pre_forward_hook

    hook = functools.partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- measuring


class Bench:
    """Timing and memory helpers bound to one device."""

    def __init__(self, device: str):
        self.device = torch.device(device)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def interleaved(self, variants: dict, repeats: int, warmup: int = 1, setup: dict | None = None) -> dict[str, list[float]]:
        """Time each variant once per round, rounds repeated; ``setup[name]()`` runs untimed before it."""
        setup = setup or {}
        times = {name: [] for name in variants}
        for r in range(warmup + repeats):
            for name, fn in variants.items():
                if name in setup:
                    setup[name]()
                t = self.time(fn)
                if r >= warmup:
                    times[name].append(t)
        return times


def med(ts) -> float:
    return statistics.median(ts)


def spread(ts) -> str:
    """Median and interquartile range of a list of seconds, as milliseconds."""
    if len(ts) < 4:
        return f"{med(ts) * 1e3:.3g} ms"
    q = statistics.quantiles(ts, n=4)
    return f"{med(ts) * 1e3:.3g} ms (IQR {q[0] * 1e3:.3g}–{q[2] * 1e3:.3g})"


def memory_kib() -> dict[str, int]:
    """Resident and peak resident memory of this process (KiB), from /proc."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def reset_peak_memory(device) -> None:
    """Reset the peak: CUDA allocator stats, or the kernel's peak-RSS counter (Linux ≥ 4.0)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def free():
    """Collect garbage and give freed heap memory back to the OS (the next section's models need it)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def target(section, what, value, goal, met, share=None, baseline=None, note=""):
    return dict(section=section, what=what, value=value, goal=goal, met=bool(met), share=share, baseline=baseline, note=note)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- 1. switching


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
        bench.time(lambda: pipe.set_adapters(loaded[0]))
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
        ts = [bench.time(lambda: pipe.load_lora_weights(sds[1 + i % 3], adapter_name="hot", hotswap=True)) for i in range(cfg.lora_switches)]
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


# ----------------------------------------------------------------------------- 2. torch.compile


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


# ----------------------------------------------------------------------------- 3 + 4. inference


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


# ----------------------------------------------------------------------------- 5. training


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
            proc = subprocess.run([sys.executable, __file__, "--train-worker", json.dumps(spec)], capture_output=True, text=True)
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


# ----------------------------------------------------------------------------- 6. merge


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


# ----------------------------------------------------------------------------- 7. real architectures


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
    from share_diffusers.training import attach_new_concept, concept_factors, detach_new_concept

    out, targets = {}, []
    for arch in cfg.archs:
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
        save_share(ShareState({n: l.select([0]) for n, l in state.layers.items()}, state.concepts[:1]), tmp / "one.safetensors")
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
        targets.append(target("archs", f"{ARCH_NAMES[arch]}: inject, train 2 steps, merge, load, fuse/unfuse, export", ok, "all work", ok,
                              note=f"{r['dtype']}; relative to the output: concept's effect {r['share_vs_base_rel_diff']:.1e}, fused vs "
                                   f"unfused {max(fused_diffs.values()):.1e}, exported LoRA vs Share {r['exported_lora_vs_share_rel_diff']:.1e} "
                                   f"(tolerance {tol:.0e}); unfuse bit-exact {r['unfuse_bit_exact']}, "
                                   f"trainable tensors moved {r['trainable_tensors_moved']} (without a gradient path: "
                                   f"{', '.join(r['trainable_tensors_without_gradient']) or 'none'})"))
        out[arch] = r
        log(f"archs: {ARCH_NAMES[arch]} done: " + json.dumps({k: v for k, v in r.items() if k not in ('storage',)}, default=str)[:600])
        pipe = unet = comps = base_out = share_out = lora_out = state = state0 = None  # free the memory before the next measurement
        free()
    setup = (f"UNet + text encoder(s) from benchmarks/configs, random weights, {cfg.arch_dtype_name} unless noted, latent "
             f"{cfg.arch_size}² ({8 * cfg.arch_size} px), one prompt of 77 tokens; training: the first concept "
             f"(empty basis; p={P}, φ={PHI}), UNet and text encoders, AdamW")
    return dict(results=out, targets=targets, setup=setup)


# ----------------------------------------------------------------------------- report


def environment(cfg) -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), cpu)
    import diffusers
    import peft
    import transformers

    env = dict(
        cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), python=platform.python_version(),
        torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__, peft=peft.__version__,
        device=cfg.device, dtype=cfg.dtype_name, command=" ".join([Path(sys.executable).name] + sys.argv),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    if cfg.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(cfg.device)
    return env


def fmt(x, digits=3) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = ["# Share systems benchmark", "",
             f"`{env['command']}` — {env['date']}; {env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch threads, "
             f"load average {results['load_before']} before / {results['load_after']} after; torch {env['torch']}, diffusers "
             f"{env['diffusers']}, transformers {env['transformers']}, peft {env['peft']}; device {env['device']}, {env['dtype']}.", "",
             "| section | measure | value | target | met | Share | baseline | note |", "|---|---|---|---|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['section']} | {t['what']} | {fmt(t['value'])} | {t['goal']} | {'✅' if t['met'] else '❌'} | "
                     f"{fmt(t['share']) if t['share'] is not None else ''} | "
                     f"{fmt(t['baseline']) if t['baseline'] is not None else ''} | {t['note']} |")
    for name, sec in results["sections"].items():
        lines += ["", f"## {name}", "", f"*Setup:* {sec.get('setup', '')}", ""]
        for key in ("rows", "rows_overhead", "rows_mixed"):
            rows = sec.get(key)
            if not rows:
                continue
            cols = list(dict.fromkeys(k for row in rows for k in row if k not in ("runs", "steps")))
            lines += [f"| {' | '.join(cols)} |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in cols) + " |" for row in rows]
            lines.append("")
        if name == "archs":
            for arch, r in sec["results"].items():
                s = r["storage"]
                lines += [f"### {ARCH_NAMES[arch]} ({r['dtype']}{'; ' + r['dtype_note'] if r.get('dtype_note') else ''})", "",
                          f"- parameters (M): {', '.join(f'{c} {v:.0f}' for c, v in r['params_m'].items())}; adapted layers: "
                          f"{', '.join(f'{c} {v}' for c, v in r['adapted_layers'].items())}; built in {r['build_s']:.0f} s",
                          f"- training step (first concept, UNet + text encoders): {', '.join(f'{t:.2f}' for t in r['train_step_s'])} s; "
                          f"{r['trainable']:,} trainable parameters, tensors moved {r['trainable_tensors_moved']}",
                          f"- merge: first concept {r['merge_first_s']:.2f} s, second {r['merge_second_s']:.2f} s; save/load/select ok; "
                          f"fuse {sum(r['fuse_s'].values()):.2f} s, unfuse {sum(r['unfuse_s'].values()):.2f} s, bit-exact {r['unfuse_bit_exact']}; "
                          f"exported LoRA ({r['lora_file_bytes'] / 2**20:.1f} MiB) reproduces the concept's effect on the UNet output to "
                          f"{r['exported_lora_vs_share_rel_to_effect']:.1e} of that effect; text encoder output to "
                          f"{r['exported_lora_text_vs_share_rel_diff']:.1e}",
                          "", "| per concept (UNet + text encoders, fp32) | Share (k=16, p=1) | LoRA r4 | LoRA r16 |", "|---|---|---|---|",
                          f"| stored bytes | {s['share_bytes_per_concept'] / 1024:.1f} KiB "
                          f"(file grows {r['file_bytes_per_concept_measured'] / 1024:.1f} KiB) "
                          f"+ shared basis {s['share_basis_bytes'] / 2**20:.1f} MiB once | {s['lora_r4_bytes'] / 2**20:.1f} MiB | "
                          f"{s['lora_r16_bytes'] / 2**20:.1f} MiB |",
                          f"| trainable parameters | {s['share_trainable_default']:,} (φ={PHI}); {s['share_trainable_phi0']:,} (φ=0) | "
                          f"{s['lora_r4_trainable']:,} | {s['lora_r16_trainable']:,} |", ""]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = results["sections"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0, 0]
    if "switch" in secs:
        s = secs["switch"]
        c = sorted(int(k) for k in s["share_ms"])
        ax.loglog(c, [s["share_ms"][k] for k in c], "o-", label="Share: set_share_concepts")
        n = sorted(int(k) for k in s["lora_ms"])
        ax.loglog(n, [s["lora_ms"][k] for k in n], "s-", label="Diffusers: set_adapters")
        if s.get("hotswap_ms"):
            ax.axhline(s["hotswap_ms"], ls=":", color="gray", label="Diffusers: hotswap from memory (1 resident)")
        ax.axhline(1.0, ls="--", color="green", lw=0.8, label="target 1 ms")
        ax.set_xlabel("concepts / LoRAs loaded")
        ax.set_ylabel("switch latency (ms)")
        ax.set_title("1. Switching concepts")
        ax.legend(fontsize=8)
    ax = axes[0, 1]
    if "merge" in secs:
        t = secs["merge"]["times"]
        c = sorted(int(k) for k in t)
        ax.loglog(c, [t[k] for k in c], "o-", label="Share merge (one new concept)")
        ax.loglog(c, [t[c[0]] * x / c[0] for x in c], ":", color="gray", label="linear growth")
        ax.axhline(2.0, ls="--", color="green", lw=0.8, label="target 2 s")
        ax.set_xlabel("concepts in the Share state")
        ax.set_ylabel("merge time (s)")
        ax.set_title("6. Merge scaling")
        ax.legend(fontsize=8)
    ax = axes[1, 0]
    if "inference" in secs:
        inf = secs["inference"]
        labels, vals = [], []
        for row in inf["rows_overhead"]:
            labels.append(f"{row['variant']}\n(b=2)")
            vals.append(row["vs_base"])
        for row in inf["rows_mixed"]:
            labels.append(f"{row['variant']}\n(b=8)")
            vals.append(row["vs_base"])
        colors = ["tab:blue" if "share" in l else "tab:orange" if "peft" in l else "gray" for l in labels]
        ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)), labels, fontsize=7, rotation=60)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylim(min(vals) * 0.97, max(vals) * 1.02)
        ax.set_ylabel("UNet step time / base")
        ax.set_title("3–4. Inference (blue Share, orange PEFT)")
    ax = axes[1, 1]
    if "training" in secs:
        raw = secs["training"]["raw"]
        base = raw["lora-r4"]
        names = list(raw)
        x = range(len(names))
        w = 0.27
        for j, (key, label) in enumerate([("step_s", "step time"), ("peak_over_model_mib", "peak memory above model"),
                                           ("optimizer_state_bytes", "optimizer state")]):
            ax.bar([i + (j - 1) * w for i in x], [raw[v][key] / max(base[key], 1e-9) for v in names], w, label=label)
        ax.set_yscale("log")
        ax.set_xticks(list(x), names)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("relative to LoRA r4")
        ax.set_title("5. Training")
        ax.legend(fontsize=8)
    env = results["environment"]
    fig.suptitle(f"Share systems benchmark — {env['cpu']}, {env['torch_threads']} threads, {env['device']} {env['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

SECTIONS = {"switch": bench_switch, "compile": bench_compile, "inference": bench_inference, "training": bench_training,
            "merge": bench_merge, "archs": bench_archs}
RUN_ORDER = ["archs", "switch", "compile", "inference", "training", "merge"]  # the largest models while memory is fresh


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, few repeats: a smoke test of every code path")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds of the inference comparisons")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--archs", nargs="+", default=None, help="architectures of the 'archs' section (default: sd15 sdxl)")
    p.add_argument("--arch-dtype", default=None, choices=list(DTYPES), help="dtype of the 'archs' section (default: --dtype)")
    p.add_argument("--train-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    main()
