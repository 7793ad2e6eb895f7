"""Pieces every trainer here shares: reading a concept's images, the data pipeline, the denoising loss,
and attaching a new concept's trainable parametrisation to the models.

``train/learn_concept.py`` (Share, with Accelerate) and the LoRA baselines of the lab
(``share_lab.baselines``) use the same functions, so "same data, same loss, same steps" holds by construction.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from PIL import Image, ImageOps

from .processor import ShareAdapter, attach, detach
from .subspace import LayerShare, NewConcept, ShareState
from .targets import denoiser, split_layer

IGNORED_SUFFIXES = {".txt", ".json", ".md", ".caption"}
MAX_IMAGE_PIXELS = 64_000_000
MIN_IMAGES, MAX_IMAGES = 3, 20  # a concept's training images, for the training script and the web UI


def check_image_count(count: int, folder) -> None:
    """3–20 training images: fewer cannot define a concept, more is not what this method is for."""
    if not MIN_IMAGES <= count <= MAX_IMAGES:
        raise ValueError(f"{folder} has {count} image{'s' * (count != 1)}: a concept is learned from "
                         f"{MIN_IMAGES}–{MAX_IMAGES} images.")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16- and 32-bit greyscale (``I;16``, ``I``, ``F``) are scaled to 8 bits first:
    PIL's own ``convert("RGB")`` clips them, which turns a 16-bit PNG pure white."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            top = 1.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


@dataclass
class Example:
    image: Image.Image
    caption: str
    path: Path


def read_instance_images(folder: str | Path, instance_prompt: str | None) -> list[Example]:
    """The images of a folder, each with its caption (``<image>.txt`` beside it, else ``instance_prompt``).

    Every file that is not a caption/metadata file must be a readable image: bad files are
    reported together, by name, so the user can fix the folder in one go.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {folder} does not exist.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IGNORED_SUFFIXES)
    examples, bad = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"{im.width}×{im.height} is too large")
                image = to_rgb(ImageOps.exif_transpose(im))
        except Exception as e:  # PIL raises many types for bad files
            bad.append(f"{path.name} ({type(e).__name__}: {e})" if isinstance(e, ValueError) else path.name)
            continue
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else instance_prompt
        if not caption:
            raise ValueError(f"{path.name} has no caption file and no --instance_prompt was given.")
        examples.append(Example(image, caption, path))
    if bad:
        raise ValueError(f"Unreadable image files in {folder}: {', '.join(bad)}.")
    if not examples:
        raise ValueError(f"No images in {folder}.")
    return examples


def prepare_image(image: Image.Image, resolution: int, center_crop: bool, flip: bool, rng: random.Random | None = None) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop a square, optionally mirror; CHW in [-1, 1]."""
    scale = resolution / min(image.size)
    image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))), Image.BICUBIC)
    left = (image.width - resolution) // 2 if center_crop else rng.randint(0, image.width - resolution)
    top = (image.height - resolution) // 2 if center_crop else rng.randint(0, image.height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


class ConceptDataset(torch.utils.data.Dataset):
    """Instance examples (and optional prior-preservation class examples) as training items.

    An item is ``{"pixel_values", "caption", "key"}``; ``key`` = (example, flipped) identifies the
    deterministic view of an image so that its latent can be cached when crops are deterministic.
    Flips and crops are a function of (seed, epoch, item), not of a random stream that data
    loading consumes ahead of training, so a run resumed mid-epoch sees exactly the same
    augmentations as an uninterrupted one. Call `set_epoch` at the start of every epoch.
    """

    def __init__(self, examples: list[Example], resolution: int, center_crop=False, random_flip=False, class_examples=(), seed=0):
        self.examples, self.class_examples = examples, list(class_examples)
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def deterministic_crops(self) -> bool:
        return self.center_crop or all(min(e.image.size) == max(e.image.size) for e in self.examples + self.class_examples)

    def __len__(self) -> int:
        return max(len(self.examples), len(self.class_examples))

    def item(self, example: Example, index: int) -> dict:
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        flip = self.random_flip and rng.random() < 0.5
        pixels = prepare_image(example.image, self.resolution, self.center_crop, flip, rng)
        return {"pixel_values": pixels, "caption": example.caption, "key": (index, flip)}

    def __getitem__(self, i: int) -> dict:
        out = {"instance": self.item(self.examples[i % len(self.examples)], i % len(self.examples))}
        if self.class_examples:
            j = i % len(self.class_examples)
            out["class"] = self.item(self.class_examples[j], len(self.examples) + j)
        return out


def collate(items: list[dict]) -> dict:
    """Instance examples first, then class examples: one forward pass covers both (as DreamBooth)."""
    parts = [it["instance"] for it in items] + [it["class"] for it in items if "class" in it]
    return {
        "pixel_values": torch.stack([p["pixel_values"] for p in parts]),
        "captions": [p["caption"] for p in parts],
        "keys": [p["key"] for p in parts],
        "num_class": sum("class" in it for it in items),
    }


def denoising_loss(unet, noise_scheduler, latents, encoder_hidden_states, num_class: int = 0, prior_loss_weight: float = 1.0, generator=None):
    """The diffusion training loss (ε or v target) at random timesteps; class examples last, weighted."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states).sample
    target = noise_scheduler.get_velocity(latents, noise, t) if noise_scheduler.config.prediction_type == "v_prediction" else noise
    errors = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    n = len(errors) - num_class
    loss = errors[:n].mean()
    if num_class:
        loss = loss + prior_loss_weight * errors[n:].mean()
    return loss


LOSS_TIMESTEPS = tuple(range(50, 1000, 100))  # 50, 150, ..., 950: the fixed timesteps of heldout_loss


def heldout_loss(pipe, images, captions: list[str], seed: int = 0, timesteps=LOSS_TIMESTEPS,
                 cross_attention_kwargs: dict | None = None) -> float:
    """Mean denoising MSE of the pipeline on (images, captions), with fixed timesteps and noises.

    Why: a generative model that has learned a concept predicts the noise on unseen images of it
    better. Everything random is fixed by `seed`, so two adapters are compared on identical
    problems and a repeated call returns the same number.
    """
    return float(heldout_losses(pipe, images, captions, seed, timesteps, cross_attention_kwargs).mean())


@torch.no_grad()
def heldout_losses(pipe, images, captions: list[str], seed: int = 0, timesteps=LOSS_TIMESTEPS,
                   cross_attention_kwargs: dict | None = None) -> np.ndarray:
    """`heldout_loss` image by image: one mean MSE per image (same noises, so their mean is it)."""
    if denoiser(pipe) == "transformer":  # SD3, Flux
        return FlowMatching(pipe).heldout_losses(images, captions, seed, timesteps, cross_attention_kwargs)
    device = pipe.unet.device
    pixels = VaeImageProcessor(do_resize=False).preprocess([im.convert("RGB") for im in images])
    latents = pipe.vae.encode(pixels.to(device, pipe.vae.dtype)).latent_dist.mean
    latents = latents * pipe.vae.config.scaling_factor
    text = pipe.encode_prompt(captions, device, 1, False)[0]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the forward process only
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        t = torch.full((len(latents),), t, device=device)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        noisy = noise_scheduler.add_noise(latents, noise, t)
        prediction = pipe.unet(noisy, t, text, cross_attention_kwargs=cross_attention_kwargs).sample
        losses.append(per_image_mse(prediction, target))
    return np.mean(losses, axis=0)


def per_image_mse(prediction: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    return (prediction.float() - target.float()).pow(2).flatten(1).double().mean(1).cpu().numpy()


class FlowMatching:
    """The objective of Diffusers' ``train_dreambooth_lora_sd3.py`` / ``_flux.py`` on a transformer pipeline.

    Rectified flow: ``x_σ = (1 − σ) x_0 + σ ε`` and the transformer predicts the velocity ``ε − x_0``, σ drawn
    like those scripts draw it (``compute_density_for_timestep_sampling`` with their default weighting
    scheme: logit-normal for SD3, uniform for Flux) from the pipeline's flow-matching schedule. Flux packs
    2×2 latent patches into tokens and takes position ids and the guidance embedding (``guidance_scale``,
    FLUX.1-dev's distilled guidance); SD3 takes the latents as they are. Text goes through the
    pipeline's own ``encode_prompt`` (all its encoders, T5 included).
    """

    def __init__(self, pipe, max_sequence_length: int | None = None, guidance_scale: float = 3.5, weighting_scheme: str | None = None):
        self.pipe, self.flux = pipe, isinstance(pipe, FluxPipeline)
        self.schedule = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.max_sequence_length = max_sequence_length or (512 if self.flux else 77)  # the scripts' defaults
        self.weighting_scheme = weighting_scheme or ("none" if self.flux else "logit_normal")
        self.guidance_scale = guidance_scale

    def latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents as the transformer sees them."""
        return (latents - (self.pipe.vae.config.shift_factor or 0.0)) * self.pipe.vae.config.scaling_factor

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds, pooled_prompt_embeds)``, one row per caption."""
        kw = dict(device=self.pipe.transformer.device, max_sequence_length=self.max_sequence_length)
        if self.flux:
            embeds, pooled, _ = self.pipe.encode_prompt(captions, None, **kw)
        else:
            embeds, _, pooled, _ = self.pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False, **kw)
        return embeds, pooled

    def predict(self, transformer, noisy: torch.Tensor, sigmas: torch.Tensor, text, joint_attention_kwargs=None) -> torch.Tensor:
        """The predicted velocity, in the latents' layout ``(B, C, h, w)``."""
        embeds, pooled = text
        kw = dict(encoder_hidden_states=embeds, pooled_projections=pooled, joint_attention_kwargs=joint_attention_kwargs, return_dict=False)
        if not self.flux:
            return transformer(hidden_states=noisy, timestep=sigmas * 1000, **kw)[0]
        b, c, h, w = noisy.shape
        guidance = torch.full((b,), self.guidance_scale, device=noisy.device) if self.pipe.transformer.config.guidance_embeds else None
        pred = transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=sigmas, guidance=guidance,
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype), **kw,
        )[0]
        scale = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(pred, h * scale, w * scale, scale)

    def loss(self, transformer, latents, text, num_class: int = 0, prior_loss_weight: float = 1.0, generator=None) -> torch.Tensor:
        """The training loss at random σ (class examples last, weighted), as `denoising_loss` for UNets."""
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        u = compute_density_for_timestep_sampling(self.weighting_scheme, b, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
        sigmas = self.schedule.sigmas[(u * len(self.schedule.sigmas)).long().clamp(max=len(self.schedule.sigmas) - 1)]
        sigmas = sigmas.to(latents.device, latents.dtype)
        s = sigmas.view(-1, 1, 1, 1)
        pred = self.predict(transformer, (1 - s) * latents + s * noise, sigmas, text)
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, s)
        errors = (weighting.float() * (pred.float() - (noise - latents).float()) ** 2).reshape(b, -1).mean(1)
        n = b - num_class
        loss = errors[:n].mean()
        if num_class:
            loss = loss + prior_loss_weight * errors[n:].mean()
        return loss

    @torch.no_grad()
    def heldout_losses(self, images, captions: list[str], seed: int = 0, timesteps=None, joint_attention_kwargs=None) -> np.ndarray:
        """`heldout_losses` for transformer pipelines: the velocity MSE at fixed σ = t / 1000 and fixed noises."""
        device = self.pipe.transformer.device
        pixels = VaeImageProcessor(do_resize=False).preprocess([im.convert("RGB") for im in images])
        latents = self.latents(self.pipe.vae.encode(pixels.to(device, self.pipe.vae.dtype)).latent_dist.mean)
        text = self.encode(captions)
        generator = torch.Generator().manual_seed(seed)
        losses = []
        for t in timesteps or LOSS_TIMESTEPS:
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            sigmas = torch.full((len(latents),), t / 1000, device=device, dtype=latents.dtype)
            s = sigmas.view(-1, 1, 1, 1)
            pred = self.predict(self.pipe.transformer, (1 - s) * latents + s * noise, sigmas, text, joint_attention_kwargs)
            losses.append(per_image_mse(pred, noise - latents))
        return np.mean(losses, axis=0)


def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(next(text_encoder.parameters()).device))[0]


def latent_dist(vae, pixel_values: torch.Tensor):
    return vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist


def steps_per_epoch(num_batches: int, accumulation: int) -> int:
    return math.ceil(num_batches / accumulation)


def train_in_process(pipe, params: list[torch.nn.Parameter], examples: list[Example], steps: int, lr: float,
                     batch_size: int = 4, seed: int = 0, center_crop: bool = True, max_grad_norm: float = 1.0,
                     penalty: Callable[[], torch.Tensor] | None = None, resolution: int | None = None,
                     flow: FlowMatching | None = None, lr_scheduler: str = "constant") -> None:
    """A few hundred steps of ``params`` on ``pipe``'s UNet or transformer, in this process, without Accelerate.

    For trainings that run inside another program: the LoRA baselines of the benchmarks and the
    post-merge fine-tune of ``learn_concept.py`` (on its main process only, after the distributed
    part). The data pipeline, loss, optimizer and clipping are ``learn_concept.py``'s (on SD3 / Flux
    the flow-matching objective: ``flow``, or the pipeline's defaults); every random draw comes from
    ``seed``, so a rerun gives the same result. ``penalty()``, if given, is added to every step's loss
    (a regulariser of the trained parameters, e.g. C-LoRA's). ``resolution``: default, the UNet's
    native size; a transformer pipeline's default sample size. ``lr_scheduler``: a name Diffusers'
    ``get_scheduler`` knows (``learn_concept.py --lr_scheduler``), without warmup.
    """
    if denoiser(pipe) == "transformer":
        flow = flow or FlowMatching(pipe)
        resolution = resolution or pipe.default_sample_size * pipe.vae_scale_factor
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    dataset = ConceptDataset(examples, resolution, center_crop=center_crop, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(seed))
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config) if flow is None else None
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_scheduler(lr_scheduler, optimizer, num_warmup_steps=0, num_training_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    step, epoch = 0, 0
    while step < steps:
        dataset.set_epoch(epoch)
        for batch in loader:
            with torch.no_grad():
                latents = latent_dist(pipe.vae, batch["pixel_values"]).sample(generator)
                if flow is None:
                    text = encode_text(pipe.tokenizer, pipe.text_encoder, batch["captions"])
                    latents = latents * pipe.vae.config.scaling_factor
                else:
                    text, latents = flow.encode(batch["captions"]), flow.latents(latents)
            if flow is None:
                loss = denoising_loss(pipe.unet, noise_scheduler, latents, text, generator=generator)
            else:
                loss = flow.loss(pipe.transformer, latents, text, generator=generator)
            (loss if penalty is None else loss + penalty()).backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step == steps:
                break
        epoch += 1


# -- attaching a new concept for training ---------------------------------------------------------


def attach_new_concept(models: dict, state: ShareState, p: int, phi: int, seed: int = 0) -> dict[str, NewConcept]:
    """Route each model's adapted layers through a fresh `NewConcept` (basis frozen, ΔW = 0 at start).

    ``models`` maps a component name (``"unet"``, ``"text_encoder"``) to the model; returns the
    trainable parametrisation per component. `detach_new_concept` undoes it.
    """
    trainers = {}
    for component, model in models.items():
        names = [n for n in state.layers if split_layer(n)[0] == component]
        adapter = ShareAdapter([state.layers[n] for n in names], device=model.device, dtype=model.dtype)
        attach(model, component, [split_layer(n)[1] for n in names], adapter)
        adapter.trainer = NewConcept(state, p=p, phi=phi, seed=seed, layers=names).to(model.device)
        trainers[component] = adapter.trainer
    return trainers


def detach_new_concept(models: dict) -> None:
    for model in models.values():
        detach(model)


def concept_factors(trainers: dict[str, NewConcept]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The trained concept as dense factors per layer, ready for `ShareState.merge`."""
    factors = {}
    for trainer in trainers.values():
        factors.update(trainer.factors())
    return factors


def with_layers(state: ShareState, shapes: dict[str, tuple[int, int]]) -> ShareState:
    """``state`` plus empty layers for ``shapes`` it does not adapt yet (old concepts: zero there)."""
    layers = dict(state.layers)
    C = len(state.concepts)
    for name, (n, d) in shapes.items():
        if name not in layers:
            layers[name] = LayerShare(torch.zeros(n, 0), torch.zeros(d, 0), torch.zeros(C, 0, 1), torch.zeros(C, 0, 1))
    return ShareState(layers, state.concepts)
