"""Pretrain the tiny text-to-image base model that ships in assets/tiny-base.

Why: everything in this project (training script, web UI, benchmarks, tests) must run offline on
a laptop CPU, so the project trains its own Stable-Diffusion-shaped model on the procedural world
of share_diffusers.world ("a small red circle on a blue background, top left") and saves it with
StableDiffusionPipeline.save_pretrained. Stock Diffusers loads it; any Diffusers scheduler drives it.

Stages, each checkpointed under --work-dir so that a crash loses at most a few minutes:
  1. tokenizer: a real CLIPTokenizer from a hand-written vocab.json + merges.txt (byte-level
     alphabet + BPE merges learned here) in which every caption word and each of the 64 reserved
     trigger words (world.TRIGGER_WORDS, never shown in pretraining) is exactly one token;
  2. VAE (AutoencoderKL, 64x64x3 <-> 16x16x4) on base scenes plus patterned objects from another
     world seed, so that it can encode concepts the denoiser has never seen;
  3. UNet + CLIP text encoder, jointly from scratch on VAE latents (epsilon prediction, min-SNR
     weighting, 10% empty captions for classifier-free guidance, EMA weights are saved).

Measured for the shipped model on the project's 2-core CPU (no GPU was available to measure),
default arguments: rendering 2 min, VAE + decoder about 35 min (1 thread, resumed across
interruptions, so only roughly timed), encoding 4 min, denoiser 38 min with `--threads 2`
(6000 steps, 0.38 s/step). Its measured quality is in the README ("The tiny base").
Re-running with the same --seed reproduces a model of the same quality (bitwise identity is not
promised: multi-threaded CPU reductions are not ordered).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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


def build_unet(cross_attn: str = "8", width: int = 64) -> UNet2DConditionModel:
    """16x16 (``width`` channels) -> 8x8 (twice as wide), self- and cross-attention at 8x8 only
    (``cross_attn="8"``, the shipped base) or at 16x16 too (``"all"``: as in Stable Diffusion, attention
    and so every attention adapter reaches the level where an object's silhouette is drawn)."""
    both = cross_attn == "all"
    return UNet2DConditionModel(
        sample_size=world.RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D" if both else "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D" if both else "UpBlock2D"), mid_block_type=None,
        cross_attention_dim=128, attention_head_dim=4,  # diffusers' legacy name: 4 heads of 32
        addition_embed_type="text")  # the pooled prompt joins the time embedding: every resnet sees it


def build_models(tokenizer: CLIPTokenizer, cross_attn: str = "8") -> tuple[CLIPTextModel, AutoencoderKL, UNet2DConditionModel]:
    """The architecture (seeded by the caller): 4.5M parameters, 17.9 MB in fp32 (cross-attention at 8x8 only)."""
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


def render_base(n: int, seed: int, patterned: bool = False) -> tuple[torch.Tensor, list[world.Scene]]:
    rng = np.random.default_rng(seed)
    scenes = [world.random_scene(rng, patterned=patterned) for _ in range(n)]
    return to_uint8([s.render(rng) for s in scenes]), scenes


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
def encode(vae, images, cache: Path, batch_size=500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (latents are sampled from them during training).

    Cached beside the autoencoder checkpoints (the encoder is final once its stage has finished),
    under a name that holds the seed and count of the rendered images.
    """
    if cache.exists():
        state = torch.load(cache)
        return state["mean"], state["std"]
    parts = [vae.encode(to_float(images[i:i + batch_size])).latent_dist for i in range(0, len(images), batch_size)]
    mean, std = torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts])
    save_atomic({"mean": mean, "std": std}, cache)
    return mean, std


def train_denoiser(unet, text_encoder, tokenizer, means, stds, scaling_factor, scenes, steps, batch_size, lr,
                   seed, checkpoint: Path, log_every=100, prediction_type="epsilon") -> None:
    """Joint UNet + text-encoder training; EMA weights are copied into the models at the end.

    ``prediction_type`` "v_prediction" makes the model predict v = √ᾱ ε − √(1−ᾱ) x0: near t = T that is
    minus the image itself, so where the object goes must come from the prompt, not from the noise.
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
        if prediction_type == "v_prediction":  # min-SNR-5 weighting (Hang et al. 2023) for each target
            target, weights = noise_scheduler.get_velocity(latents, noise, timesteps), torch.clamp(snr, max=5.0) / (snr + 1)
        else:
            target, weights = noise, torch.clamp(snr, max=5.0) / snr
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=Path("assets/tiny-base"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs/tiny-base"), help="checkpoints; resumed if present")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=30000, help="rendered plain base scenes")
    parser.add_argument("--patterned-images", type=int, default=0,
                        help="also pretrain the denoiser on this many patterned scenes ('a red and white striped "
                             "circle ...'); an experiment, the shipped base has none (README: identity accuracy)")
    parser.add_argument("--vae-extra-images", type=int, default=6000, help="patterned objects for the VAE only")
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--decoder-steps", type=int, default=1500, help="decoder-only fine-tuning")
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--denoiser-steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=7e-4)
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon",
                        help="the denoiser's target (the shipped base: epsilon; train_denoiser says why v)")
    parser.add_argument("--cross-attn", choices=("8", "all"), default="8",
                        help="8: attention at 8x8 only (the shipped base); all: at 16x16 too "
                             "(pilot P3: no gain in adapter identity, docs/results/pilot-bases.md)")
    parser.add_argument("--threads", type=int, help="torch CPU threads; 1 is faster on a CPU shared with other jobs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.time()
    torch.manual_seed(args.seed)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(args.work_dir / "tokenizer",
                                world.CAPTION_WORDS + (world.PATTERN_WORDS if args.patterned_images else []))
    text_encoder, vae, unet = build_models(tokenizer, args.cross_attn)

    images, scenes = render_base(args.images, args.seed)
    extras = render_vae_extras(args.vae_extra_images, args.seed + 1)
    patterned, patterned_scenes = (render_base(args.patterned_images, args.seed + 2, patterned=True)
                                   if args.patterned_images else (images[:0], []))
    print(f"rendered {len(images) + len(extras) + len(patterned)} images ({time.time() - start:.0f} s)", flush=True)
    stage = time.time()
    train_autoencoder(vae, torch.cat([images, extras]), args.vae_steps, args.vae_batch_size, 1e-3, args.seed,
                      args.work_dir / "vae.pt")
    train_autoencoder(vae, torch.cat([images[:len(extras)], extras]), args.decoder_steps, args.vae_batch_size, 5e-4,
                      args.seed, args.work_dir / "decoder.pt", decoder_only=True)  # half patterned objects
    means, stds = encode(vae, images, args.work_dir / f"latents-seed{args.seed}-{args.images}.pt")
    vae.register_to_config(scaling_factor=1.0 / means.std().item())  # from the plain scenes
    if args.patterned_images:
        extra_means, extra_stds = encode(vae, patterned, args.work_dir / f"latents-patterned-seed{args.seed + 2}-{args.patterned_images}.pt")
        means, stds, scenes = torch.cat([means, extra_means]), torch.cat([stds, extra_stds]), scenes + patterned_scenes
    print(f"autoencoder done, scaling_factor {vae.config.scaling_factor:.4f} ({(time.time() - stage) / 60:.1f} min)", flush=True)
    stage = time.time()
    train_denoiser(unet, text_encoder, tokenizer, means, stds, vae.config.scaling_factor, scenes, args.denoiser_steps, args.batch_size,
                   args.lr, args.seed, args.work_dir / "denoiser.pt", prediction_type=args.prediction_type)
    print(f"denoiser done ({(time.time() - stage) / 60:.1f} min)", flush=True)

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler(**NOISE_SCHEDULE, prediction_type=args.prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(args.output)
    for name in ("vocab.json", "merges.txt"):  # keep the hand-written sources beside tokenizer.json
        (args.output / "tokenizer" / name).write_bytes((args.work_dir / "tokenizer" / name).read_bytes())
    print(f"saved {args.output}; total training time {(time.time() - start) / 60:.1f} min on "
          f"{torch.get_num_threads()} CPU threads", flush=True)


if __name__ == "__main__":
    main()
