"""What the systems benchmark's sections share: Diffusers models and pipelines with random weights
built from the config dictionaries (``ARCHS``, ``benchmarks/configs``), synthetic Share states and
LoRAs, ``Bench`` (timing), memory measurement, ``target`` (one goal and whether it is met), ``log``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import math
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.initialization import no_init_weights

import share_diffusers  # noqa: F401  (installs pipe.load_share & co.)
from share_diffusers.targets import find_targets, layer_shape
from share_lab.tiny_pipelines import SDXL_UNET, tokenizer_dir  # the test suite's tiny SDXL UNet, offline tokenizer

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "benchmarks" / "configs"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Share's settings in docs/results/systems.*: k = 16 (learn_concept.py's --basis_rank default when they were measured; now 8),
# --coef_rank 1, --num_extra_directions 2
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
