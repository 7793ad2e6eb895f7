"""Pretrain the tiny text-to-image base model that ships in assets/tiny-base (tiny base v6).

Why: everything in this project (training script, web UI, benchmarks, tests) must run offline on
a laptop CPU, so the project trains its own Stable-Diffusion-shaped model on a procedural world and
saves it with StableDiffusionPipeline.save_pretrained. Stock Diffusers loads it; any Diffusers
scheduler drives it. World v2 (share_lab.pilot_world, the default) has ten silhouettes, solid or in
two or three colours laid out split, outlined, striped or dotted ("a small red and yellow outlined
star on a blue background, top left"); one in seven two-colour objects is kept out of pretraining,
and those are the concepts (train/make_concepts.py). World v1 (tiny base v3's) has five plain shapes.

Stages, each checkpointed under --work-dir so that a crash loses at most a few minutes:
  1. tokenizer: a real CLIPTokenizer from a hand-written vocab.json + merges.txt (byte-level
     alphabet + BPE merges learned here) in which every caption word and each of the 64 reserved
     trigger words (world.TRIGGER_WORDS, never shown in pretraining) is exactly one token;
  2. VAE (AutoencoderKL, 64x64x3 <-> 16x16x4): (a) on plain scenes plus patterned objects of another
     world seed, (b) its decoder alone on half patterned objects, (c, world v2) its decoder alone on
     world-v2 scenes, so that two-colour detail survives a round trip (a yellow outline around red
     came back orange in a third of the concepts' images before). The encoder, hence every latent,
     is fixed after (a); --vae-from starts from an existing VAE instead of (a)-(b);
  3. UNet + CLIP text encoder, jointly from scratch on VAE latents (10% empty captions for
     classifier-free guidance, EMA weights), in --denoiser-stages, each a cosine schedule that starts
     from the previous stage's EMA weights and names its objective (OBJECTIVES): noise prediction
     with min-SNR weighting, or v prediction weighted so that the steps near t = T, where an object
     is placed, count; after --third-level-after stages the two-level UNet grows a 4x4 level
     (`add_third_level`) and the later stages train it in.

The shipped v6 is the defaults: v4's three stages, the grown UNet 4000 steps at 3e-4
(`--third-level-after 3`: v5), then 12,000 steps predicting v (without them position words are
ignored: docs/results/pilot-bases.md); the UNet and VAE are stored in float16 (`--half`) (13.3 MB of
weights in all; stock from_pretrained loads them as float32). Measured on the project's 2-core CPU
(no GPU was available), 2 threads: stages 2a-2b about 35 min, 2c 16 min, rendering and encoding the
60,000 world-v2 scenes 10 min, denoiser stage 1 82 min (10,000 steps, beside a 1-thread job), stage 2
34 min (5000), stage 3 32 min (5000), stage 4 about 30 min (4000; 46 min beside other jobs), stages
5-7 30, 31 and 29 min (4000 each): about 5.5 h in all, resumable at any point. The shipped base was
trained stage by stage over several sessions as pilots of train/pilot_bases.py (V2, V2b, V2c, G1,
G2, G3, G4 and decoder D1; docs/results/pilot-bases.md), which call these functions with the same
data, seeds and settings; this script then resumed from their checkpoints (`--vae-from` tiny base
v3's VAE, made by stages 2a-2b) and wrote assets/tiny-base. Its measured quality is in the README
("The tiny base"). Re-running with the same --seed reproduces a model of the same quality (bitwise
identity is not promised: multi-threaded CPU reductions are not ordered).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from share_lab import pilot_world as pw
from share_lab import world

# DDPM's linear schedule, not Stable Diffusion's scaled_linear: on 16x16 latents SD's schedule keeps
# a signal-to-noise ratio near 1 for each channel's mean at t = T, so the model learned to take the
# background colour from the starting noise instead of the prompt (half the backgrounds came out wrong).
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", steps_offset=1)


# --------------------------------------------------------------------------- models

def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that turn every word into a single token (plain BPE on the word list).

    Encoding applies merges in this order, so each training word ends as one token; the tests
    check it on the saved tokenizer.
    """
    pieces = [list(word[:-1]) + [word[-1] + "</w>"] for word in words]
    merges = []
    while any(len(p) > 1 for p in pieces):
        counts = collections.Counter(pair for p in pieces for pair in zip(p, p[1:]))
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # most frequent, ties by name
        merges.append(best)
        for p in pieces:
            i = 0
            while i < len(p) - 1:
                if (p[i], p[i + 1]) == best:
                    p[i:i + 2] = [p[i] + p[i + 1]]
                i += 1
    return merges


def build_tokenizer(directory: Path, words: list[str]) -> CLIPTokenizer:
    """Write vocab.json + merges.txt + tokenizer_config.json and load them as a CLIPTokenizer."""
    merges = learn_merges(words + list(world.TRIGGER_WORDS))
    alphabet = sorted(ByteLevel.alphabet())  # every byte is a symbol: no text is ever unknown
    tokens = alphabet + [s + "</w>" for s in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return CLIPTokenizer.from_pretrained(directory)


def build_unet(cross_attn: str = "8", width: int = 64, levels: int = 2) -> UNet2DConditionModel:
    """16x16 (``width`` channels) -> 8x8 (twice as wide), self- and cross-attention at 8x8 only
    (``cross_attn="8"``, the shipped base) or at 16x16 too (``"all"``: as in Stable Diffusion, attention
    and so every attention adapter reaches the level where an object's silhouette is drawn).

    ``levels=3`` adds a 4x4 level of plain resnets (as Stable Diffusion's deepest level): there the
    zero padding of every 3x3 convolution reaches the whole map, so the model can tell top left from
    bottom right, which two levels cannot (docs/results/pilot-bases.md, pilots VQ and G1)."""
    both = cross_attn == "all"
    deep = ("DownBlock2D",) if levels == 3 else ()
    return UNet2DConditionModel(
        sample_size=world.RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width) + (2 * width,) * (levels - 2),
        down_block_types=("CrossAttnDownBlock2D" if both else "DownBlock2D", "CrossAttnDownBlock2D") + deep,
        up_block_types=tuple(b.replace("Down", "Up") for b in deep) +
                       ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D" if both else "UpBlock2D"), mid_block_type=None,
        cross_attention_dim=128, attention_head_dim=4,  # diffusers' legacy name: 4 heads of 32
        addition_embed_type="text")  # the pooled prompt joins the time embedding: every resnet sees it


def add_third_level(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A trained two-level UNet grown by a 4x4 level: every trained weight keeps its place.

    The new model's 8x8 and 16x16 up blocks are the old up blocks (same shapes: the 8x8 one now takes
    the 4x4 level's output where it took the 8x8 down block's). The new blocks start random, so the
    grown model must be trained on (a few thousand steps) before it draws again.
    """
    if len(unet.config.block_out_channels) != 2 or "CrossAttnDownBlock2D" in unet.config.down_block_types[:1]:
        raise ValueError("add_third_level grows a two-level UNet with cross-attention at 8x8 only (tiny base v4's)")
    grown = build_unet(width=unet.config.block_out_channels[0], levels=3)
    def moved(name: str) -> str:  # up_blocks.i -> up_blocks.i+1: the new 4x4 up block comes first
        block, _, rest = name.removeprefix("up_blocks.").partition(".")
        return f"up_blocks.{int(block) + 1}.{rest}" if name.startswith("up_blocks.") else name

    missing, unexpected = grown.load_state_dict({moved(k): v for k, v in unet.state_dict().items()}, strict=False)
    assert not unexpected and all(k.startswith(("down_blocks.1.downsamplers", "down_blocks.2", "up_blocks.0."))
                                  for k in missing), (missing, unexpected)
    return grown


def build_models(tokenizer: CLIPTokenizer, cross_attn: str = "8") -> tuple[CLIPTextModel, AutoencoderKL, UNet2DConditionModel]:
    """The architecture before growth (seeded by the caller): 4.5M parameters, 17.9 MB in fp32 (cross-attention at
    8x8 only); the 4x4 level adds 1.6M."""
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=world.RESOLUTION,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        mid_block_add_attention=False)
    return text_encoder, vae, build_unet(cross_attn)


# --------------------------------------------------------------------------- data

def to_uint8(images) -> torch.Tensor:
    """PIL images -> uint8 NCHW (4x smaller than float while the data set is kept in memory)."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2)


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float in [-1, 1], the VAE's input range."""
    return batch.float() / 127.5 - 1


# v1: one plain shape; v2: objects of one to three colours in eight layouts, the concepts' reserved
# combinations excluded; rich: the pilots' 16 silhouettes and nine layouts (docs/results/pilot-bases.md)
SCENES = {"v1": world.random_scene, "v2": pw.random_v2_scene, "rich": pw.random_rich_scene}


def pretraining_scenes(world_name: str, n: int, seed: int) -> tuple[list, Callable[[], torch.Tensor]]:
    """n scenes of a world and a function that renders them (called only when their latents are not
    cached yet: rendering 60,000 takes minutes)."""
    sample = SCENES[world_name]
    rng = np.random.default_rng(seed)
    scenes = [sample(rng) for _ in range(n)]
    return scenes, lambda: to_uint8([s.render(rng) for s in scenes])


def render_base(n: int, seed: int) -> tuple[torch.Tensor, list[world.Scene]]:
    scenes, render = pretraining_scenes("v1", n, seed)
    return render(), scenes


def render_vae_extras(n: int, seed: int) -> torch.Tensor:
    """Patterned objects from a world seed the shipped concepts do not use."""
    rng = np.random.default_rng(seed)
    concepts = world.make_concepts(len(world.TRIGGER_WORDS), world_seed=seed)
    images = []
    for i in range(n):
        concept = concepts[i % len(concepts)]
        background, position = concept.contexts(1, rng)[0]
        images.append(concept.render(background, position, rng))
    return to_uint8(images)


# --------------------------------------------------------------------------- training

def save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_autoencoder(vae, images, steps, batch_size, lr, seed, checkpoint: Path, decoder_only=False,
                      log_every=100) -> None:
    """L1 + MSE reconstruction with a tiny KL term (Stable Diffusion's VAE recipe minus GAN and LPIPS).

    decoder_only keeps the encoder, hence every latent, fixed: the decoder can then be refined on
    harder images without touching what the denoiser learns from (like SD's ft-MSE decoder).
    """
    modules = [vae.decoder, vae.post_quant_conv] if decoder_only else [vae]
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=100, num_training_steps=steps)
    step = 0
    if checkpoint.exists():
        state = torch.load(checkpoint)
        vae.load_state_dict(state["model"]), optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step = state["step"]
        print(f"{checkpoint.stem}: resumed at step {step}")
    vae.train()
    start = time.time()
    while step < steps:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x = to_float(images[torch.randint(len(images), (batch_size,), generator=generator)])
        with torch.set_grad_enabled(not decoder_only):
            posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x)
        if not decoder_only:
            loss = loss + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        step += 1
        if step % log_every == 0 or step == steps:
            print(f"{checkpoint.stem} step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
            save_atomic({"model": vae.state_dict(), "optimizer": optimizer.state_dict(),
                         "schedule": schedule.state_dict(), "step": step}, checkpoint)
    vae.eval()


@torch.no_grad()
def encode(vae, render: Callable[[], torch.Tensor], cache: Path, batch_size=500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image that ``render()`` gives (latents are sampled from them
    during training).

    Cached beside the autoencoder checkpoints (the encoder is final once its stage has finished),
    under a name that holds the seed and count of the rendered images.
    """
    if cache.exists():
        state = torch.load(cache)
        return state["mean"], state["std"]
    images = render()
    parts = [vae.encode(to_float(images[i:i + batch_size])).latent_dist for i in range(0, len(images), batch_size)]
    mean, std = torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts])
    save_atomic({"mean": mean, "std": std}, cache)
    return mean, std


def train_denoiser(unet, text_encoder, tokenizer, means, stds, scaling_factor, scenes, steps, batch_size, lr,
                   seed, checkpoint: Path, log_every=100, prediction_type="epsilon", snr_gamma=5.0,
                   snr_floor=0.0) -> None:
    """Joint UNet + text-encoder training; EMA weights are copied into the models at the end.

    ``prediction_type`` "v_prediction" makes the model predict v = √ᾱ ε − √(1−ᾱ) x0: near t = T that is
    minus the image itself, so where the object goes must come from the prompt, not from the noise.
    ``snr_gamma`` is min-SNR weighting (Hang et al. 2023); 0 = none. For v, min-SNR's weight
    min(SNR, γ) / (SNR + 1) vanishes near t = T (SNR 4e-5 there): exactly the steps that place the
    object, so a v model that must follow position words is trained with 0 (every step weighs 1), or
    with ``snr_floor``: min-SNR's weight on the x0 error, min(SNR, γ), raised to at least the floor, so
    steps near T weigh as much as under plain v while the nearly clean steps stay capped at γ.
    """
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE, prediction_type=prediction_type)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # no decay: unseen trigger embeddings stay as initialised
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=200, num_training_steps=steps)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=3 / 4)
    step = 0
    if checkpoint.exists():
        state = torch.load(checkpoint)
        unet.load_state_dict(state["unet"]), text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"]), schedule.load_state_dict(state["schedule"])
        ema.load_state_dict(state["ema"])
        step = state["step"]
        print(f"denoiser: resumed at step {step}")
    unet.train(), text_encoder.train()
    start, running = time.time(), 0.0
    while step < steps:
        rng = np.random.default_rng([seed, step])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.from_numpy(rng.integers(len(scenes), size=batch_size))
        captions = ["" if rng.random() < 0.1 else world.pretraining_caption(scenes[i], rng) for i in index]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        prediction = unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, text_encoder(ids)[0]).sample
        snr = compute_snr(noise_scheduler, timesteps)
        v = prediction_type == "v_prediction"
        target = noise_scheduler.get_velocity(latents, noise, timesteps) if v else noise
        x0_weights = torch.clamp(snr, min=snr_floor, max=snr_gamma)  # the weight on |x0 - x0_hat|^2
        weights = x0_weights / (snr + 1 if v else snr) if snr_gamma else torch.ones_like(snr)
        loss = (F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        ema.step(params)
        step += 1
        running += loss.item()
        if step % log_every == 0 or step == steps:
            print(f"denoiser step {step}/{steps} loss {running / log_every:.4f} ({time.time() - start:.0f} s)", flush=True)
            running = 0.0
            save_atomic({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                         "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                         "ema": ema.state_dict(), "step": step}, checkpoint)
    ema.copy_to(params)
    unet.eval(), text_encoder.eval()


# What a denoiser stage predicts and how it weighs its timesteps (train_denoiser says why).
OBJECTIVES = {
    "eps": dict(prediction_type="epsilon", snr_gamma=5.0),  # min-SNR-5: tiny bases v3-v5
    "v": dict(prediction_type="v_prediction", snr_gamma=0.0),  # every step weighs 1
    "v-floor": dict(prediction_type="v_prediction", snr_gamma=5.0, snr_floor=1.0),  # min-SNR-5, steps near T kept
}


def parse_stages(text: str) -> list[tuple[int, float, str]]:
    """"10000:7e-4,4000:2e-4:v" -> [(10000, 7e-4, "eps"), (4000, 2e-4, "v")]: denoiser steps, peak
    learning rate and objective (an OBJECTIVES key; "eps" when left out)."""
    try:
        stages = [(int(fields[0]), float(fields[1]), fields[2] if len(fields) == 3 else "eps")
                  for fields in (stage.split(":") for stage in text.split(",")) if len(fields) in (2, 3)]
    except ValueError:
        stages = []
    if len(stages) != len(text.split(",")):
        raise argparse.ArgumentTypeError(f"expected STEPS:LR[:OBJECTIVE][,...], got {text!r}")
    if any(steps <= 0 or lr <= 0 for steps, lr, _ in stages):
        raise argparse.ArgumentTypeError(f"steps and learning rates must be positive, got {text!r}")
    if unknown := {objective for *_, objective in stages} - set(OBJECTIVES):
        raise argparse.ArgumentTypeError(f"unknown objective {', '.join(sorted(unknown))} in {text!r}; "
                                         f"choose from {', '.join(OBJECTIVES)}")
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=Path("assets/tiny-base"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs/tiny-base"), help="checkpoints; resumed if present")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", choices=("v1", "v2"), default="v2",
                        help="what the denoiser learns to draw: v1 plain shapes (tiny base v3), v2 objects of one to "
                             "three colours in eight layouts (v4, the shipped base)")
    parser.add_argument("--images", type=int, default=60000, help="rendered scenes of --world for the denoiser")
    parser.add_argument("--vae-from", type=Path, help="an AutoencoderKL folder to start from instead of training "
                                                      "stages 2a-2b (its encoder is kept as it is)")
    parser.add_argument("--vae-images", type=int, default=30000, help="plain base scenes for stages 2a-2b")
    parser.add_argument("--vae-extra-images", type=int, default=6000, help="patterned objects for stages 2a-2b")
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--decoder-steps", type=int, default=1500, help="stage 2b: decoder-only fine-tuning")
    parser.add_argument("--v2-decoder-images", type=int, default=16000, help="stage 2c (world v2): its scenes")
    parser.add_argument("--v2-decoder-steps", type=int, default=2500, help="stage 2c: decoder-only on world v2")
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--denoiser-stages", type=parse_stages,
                        default=parse_stages("10000:7e-4,5000:3e-4,5000:2e-4,4000:3e-4,4000:2e-4:v,4000:2e-4:v-floor,"
                                             "4000:2e-4:v-floor"),
                        help="STEPS:LR[:OBJECTIVE],...: each stage a cosine schedule from the previous stage's EMA "
                             "weights (OBJECTIVES; eps if left out). Tiny base v5: the first four; v4: the first "
                             "three, no growth; v3: 6000:7e-4 on world v1")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cross-attn", choices=("8", "all"), default="8",
                        help="8: attention at 8x8 only (the shipped base); all: at 16x16 too "
                             "(pilot P3: no gain in adapter identity, docs/results/pilot-bases.md)")
    parser.add_argument("--third-level-after", type=int, default=3, metavar="STAGE",
                        help="grow the UNet by a 4x4 level after this denoiser stage (add_third_level); 0: never")
    parser.add_argument("--half", action=argparse.BooleanOptionalAction, default=True,
                        help="store the UNet and the VAE in float16 (half the bytes; --no-half: float32)")
    parser.add_argument("--threads", type=int, help="torch CPU threads; 1 is faster on a CPU shared with other jobs")
    args = parser.parse_args()
    if not 0 <= args.third_level_after < len(args.denoiser_stages):
        parser.error(f"--third-level-after {args.third_level_after}: there are {len(args.denoiser_stages)} denoiser "
                     "stages, and the grown UNet needs one after it to learn its new level (0: do not grow)")
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.time()
    torch.manual_seed(args.seed)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(args.work_dir / "tokenizer", world.CAPTION_WORDS if args.world == "v1" else pw.V2_CAPTION_WORDS)
    text_encoder, vae, unet = build_models(tokenizer, args.cross_attn)

    stage = time.time()
    if args.vae_from:
        vae = AutoencoderKL.from_pretrained(args.vae_from, local_files_only=True)
    else:
        plain, _ = render_base(args.vae_images, args.seed)
        extras = render_vae_extras(args.vae_extra_images, args.seed + 1)
        train_autoencoder(vae, torch.cat([plain, extras]), args.vae_steps, args.vae_batch_size, 1e-3, args.seed,
                          args.work_dir / "vae.pt")
        train_autoencoder(vae, torch.cat([plain[:len(extras)], extras]), args.decoder_steps, args.vae_batch_size, 5e-4,
                          args.seed, args.work_dir / "decoder.pt", decoder_only=True)  # half patterned objects
        plain_means, _ = encode(vae, lambda: plain, args.work_dir / f"latents-seed{args.seed}-{args.vae_images}.pt")
        vae.register_to_config(scaling_factor=1.0 / plain_means.std().item())  # from the plain scenes
    if args.world == "v2":  # two-colour detail: a yellow outline around red must not come back orange
        _, render = pretraining_scenes("v2", args.v2_decoder_images, args.seed + 7)
        train_autoencoder(vae, render(), args.v2_decoder_steps, args.vae_batch_size, 5e-4, args.seed,
                          args.work_dir / "decoder-v2.pt", decoder_only=True)
    print(f"autoencoder done, scaling_factor {vae.config.scaling_factor:.4f} ({(time.time() - stage) / 60:.1f} min)", flush=True)

    scenes, render = pretraining_scenes(args.world, args.images, args.seed)
    means, stds = encode(vae, render, args.work_dir / f"latents-{args.world}-seed{args.seed}-{args.images}.pt")
    for i, (steps, lr, objective) in enumerate(args.denoiser_stages, 1):  # each from the previous stage's EMA weights
        if args.third_level_after and i == args.third_level_after + 1:
            torch.manual_seed(args.seed)  # the new blocks' initial weights
            unet = add_third_level(unet)
            print(f"denoiser: grown by a 4x4 level before stage {i}", flush=True)
        stage = time.time()
        train_denoiser(unet, text_encoder, tokenizer, means, stds, vae.config.scaling_factor, scenes, steps, args.batch_size,
                       lr, args.seed, args.work_dir / f"denoiser-stage{i}.pt", **OBJECTIVES[objective])
        print(f"denoiser stage {i} done ({(time.time() - stage) / 60:.1f} min)", flush=True)

    if args.half:  # stock from_pretrained loads these back as float32
        unet.to(torch.float16), vae.to(torch.float16)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler(**NOISE_SCHEDULE, prediction_type=OBJECTIVES[objective]["prediction_type"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(args.output)
    for name in ("vocab.json", "merges.txt"):  # keep the hand-written sources beside tokenizer.json
        (args.output / "tokenizer" / name).write_bytes((args.work_dir / "tokenizer" / name).read_bytes())
    print(f"saved {args.output}; total training time {(time.time() - start) / 60:.1f} min on "
          f"{torch.get_num_threads()} CPU threads", flush=True)


if __name__ == "__main__":
    main()
