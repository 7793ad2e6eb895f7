#!/usr/bin/env python
"""Learn one concept into a Share file: ``accelerate launch train/learn_concept.py [flags]``.

The shared basis stays frozen; the concept's coefficients and φ temporary directions are trained
on 3–20 images (DreamBooth-style, with the flags of Diffusers' ``train_dreambooth_lora.py``; on SD3
and Flux pipelines with the flow-matching objective of ``train_dreambooth_lora_{sd3,flux}.py``).
Then the concept is merged: the subspace is refit to all concepts, every old concept is
re-expressed in it without any of its data, and the report says what that did to each of them
(merge error, held-out loss before/after). The Share file is rewritten atomically and gets a
model card. With no arguments it learns a demo concept of the procedural world on the tiny base
in ``assets/`` (a few minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from share_diffusers import ShareConfig, ShareFileError, ShareState, read_share
from share_diffusers.card import write_model_card
from share_diffusers.config import portable_path, resolve_config, stored_config
from share_diffusers.hub import snapshot
from share_diffusers.io import ABSENT, DEFAULT_WEIGHT_NAME, atomic_write, locked
from share_diffusers.lora import write_lora
from share_diffusers.names import check_concept_name, check_trigger
from share_diffusers.pipeline import check_compatible
from share_diffusers.subspace import balance
from share_diffusers.targets import COMPONENTS, conv_kernels, denoiser, model_shapes
from share_diffusers.training import (
    ConceptDataset,
    FlowMatching,
    attach_new_concept,
    check_image_count,
    collate,
    concept_factors,
    denoising_loss,
    detach_new_concept,
    encode_text,
    heldout_loss,
    latent_dist,
    prepare_image,
    read_instance_images,
    steps_per_epoch,
    train_in_process,
    with_layers,
)

ROOT = Path(__file__).resolve().parent.parent

logger = get_logger(__name__)
DEMO_CONCEPT = ROOT / "assets" / "concepts" / "green-orange-outlined-diamond"
WRITE_WAIT = 3600.0  # seconds to wait for another writer of the Share file (e.g. another concept's merge)
CHECKPOINT_WEIGHTS = "share_new_concept.safetensors"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # model and data (names as in Diffusers' train_dreambooth_lora.py)
    a("--pretrained_model_name_or_path", default=str(ROOT / "assets" / "tiny-base"),
      help="Base pipeline: a local Diffusers folder or a Hub repo id (huggingface_hub; HF_HUB_OFFLINE reads only its cache).")
    a("--revision", default=None, help="The Hub revision (branch, tag or commit) of the base pipeline.")
    a("--tokenizer_name", default=None, help="Tokenizer folder or Hub repo id, if not the base pipeline's tokenizer/.")
    a("--variant", default=None, help="Weights variant, e.g. fp16.")
    a("--instance_data_dir", default=None, help="Folder of 3–20 images (+ optional <image>.txt captions). Default: a demo concept.")
    a("--instance_prompt", default=None, help="Caption for images without a .txt file, e.g. 'a photo of sks dog'.")
    a("--heldout_data_dir", default=None, help="Held-out images (+captions) of the concept, for the report's loss.")
    a("--num_heldout_images", type=int, default=None,
      help="Measure the report's held-out loss on at most this many of those images (default: all; 0: no held-out loss).")
    a("--heldout_from_file", action="store_true",
      help="Also measure the old concepts' held-out loss from the held-out folders stored in the Share file "
           "(folders that are gone are skipped; without this flag no folder named by the file is read).")
    a("--output_dir", default=None, help="Checkpoints, logs, validation images, report. Default: outputs/runs/<concept>.")
    a("--resolution", type=int, default=None, help="Default: the base model's native size.")
    a("--center_crop", action="store_true")
    a("--random_flip", action="store_true")
    # prior preservation
    a("--with_prior_preservation", action="store_true")
    a("--class_data_dir", default=None)
    a("--class_prompt", default=None)
    a("--num_class_images", type=int, default=50)
    a("--prior_loss_weight", type=float, default=1.0)
    a("--sample_batch_size", type=int, default=4)
    a("--prior_generation_precision", choices=["no", "fp32", "fp16", "bf16"], default=None)
    # optimisation
    a("--train_text_encoder", action="store_true",
      help="Also adapt the CLIP text encoder(s) (their attention projections, or --text_encoder_target_modules).")
    a("--train_t5", action="store_true", help="SD3 / Flux: also adapt the T5 text encoder (SelfAttention q/k/v/o, or "
      "--text_encoder_target_modules). Diffusers' LoRA loaders do not read T5 layers, so such a concept cannot be exported as a LoRA.")
    a("--pre_compute_text_embeddings", action="store_true",
      help="Encode every caption once before training, then keep the text encoder off the accelerator until validation.")
    a("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (pip install bitsandbytes).")
    # transformer pipelines (SD3, Flux), as in Diffusers' train_dreambooth_lora_{sd3,flux}.py
    a("--max_sequence_length", type=int, default=None, help="T5 tokens per prompt (default: 77 for SD3, 512 for Flux).")
    a("--guidance_scale", type=float, default=3.5, help="Flux: the guidance embedding's value while training (FLUX.1-dev).")
    a("--weighting_scheme", default=None, choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
      help="How σ is sampled and weighted (default: logit_normal for SD3, none for Flux).")
    a("--train_batch_size", type=int, default=4)
    a("--num_train_epochs", type=int, default=1)
    a("--max_train_steps", type=int, default=400, help="Overrides --num_train_epochs.")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", action="store_true")
    a("--learning_rate", type=float, default=3e-3)
    a("--scale_lr", action="store_true")
    a("--lr_scheduler", default="constant")
    a("--lr_warmup_steps", type=int, default=0)
    a("--lr_num_cycles", type=int, default=1)
    a("--lr_power", type=float, default=1.0)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=0.0)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    a("--allow_tf32", action="store_true")
    a("--dataloader_num_workers", type=int, default=0)
    a("--seed", type=int, default=0)
    # checkpoints, validation, logging
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'.")
    a("--validation_prompt", default=None, help="Default: the first held-out caption, else the instance prompt.")
    a("--num_validation_images", type=int, default=4)
    a("--validation_images", nargs="+", default=None,
      help="Initial images for validation: one image-to-image result per image, with the validation prompt, saved to --output_dir.")
    a("--validation_epochs", type=int, default=None, help="Also validate every N epochs (default: only at the end).")
    a("--validation_steps", type=int, default=None, help="Also write a preview image (output_dir/preview.png) every N steps.")
    a("--progress_file", default=None, help="Keep a JSON file with step, loss and status up to date (for UIs).")
    a("--report_to", default="tensorboard", help="tensorboard, wandb, all, or none.")
    a("--logging_dir", default="logs")
    a("--push_to_hub", action="store_true", help="Upload the Share file, its model card, the report and validation images to the Hub.")
    a("--hub_model_id", default=None, help="The Hub repo to push to (default: the output folder's name).")
    a("--hub_token", default=None, help="Hub token (default: the one huggingface_hub finds, e.g. from `hf auth login`).")
    # Share
    a("--share_path", default=str(ROOT / "outputs" / "share.safetensors"), help="The Share file to extend (created if absent).")
    a("--concept_name", default=None, help="Default: from the concept folder's concept.json, else the folder name.")
    a("--trigger", default=None, help="The concept's trigger token (stored in the file; shown by the UI).")
    # the file's settings (share_diffusers.ShareConfig): unset flags take the Share file's stored values (new file: defaults)
    default = ShareConfig()
    a("--basis_rank", type=int, default=None, help=f"k_max: the most directions per layer and side (new file: {default.basis_rank}).")
    a("--basis_energy", type=float, default=None, help="Keep the fewest directions holding this share of the energy (≤ k_max).")
    a("--basis_budget", type=int, default=None,
      help="Instead of --basis_energy: keep this many directions in all, over every layer, where the concepts need them "
           "(each layer ≤ k_max).")
    a("--coef_rank", "--rank", type=int, default=None, help=f"p: the rank of each concept's delta per layer (new file: {default.coef_rank}).")
    a("--num_extra_directions", type=int, default=None,
      help=f"φ: temporary new directions per side while training (new file: {default.num_extra_directions}).")
    a("--target_modules", nargs="+", default=None, metavar="NAME",
      help="The UNet's / transformer's layers to adapt, as PEFT's target_modules: module names (a layer matches its whole name "
           "or its last parts, e.g. to_q proj_in ff.net.2, or LoCon's 3x3 conv1 conv2) or one regular expression "
           "(new file: the attention projections).")
    a("--text_encoder_target_modules", nargs="+", default=None, metavar="NAME",
      help="The same for the text encoders with --train_text_encoder (new file: self_attn q/k/v/out_proj; e.g. add fc1 fc2).")
    a("--rebase", action="store_true", help="Allow basis settings that differ from the file's: the merge refits the subspace under them.")
    a("--no_merge", action="store_true", help="Do not touch the Share file; save the trained concept as a LoRA file instead.")
    a("--finetune_after_merge_steps", type=int, default=None,
      help="Then fine-tune the new concept's coefficients in the merged basis for this many steps, which recovers what a "
           "lossy merge took (default: a quarter of the training steps; 0: off).")
    a("--overwrite_concept", action="store_true", help="Replace a concept of the same name.")
    args = p.parse_args(argv)
    _apply_defaults(args)
    return args


def _apply_defaults(args) -> None:
    """Fill what was not given from the concept folder (our world's concept.json) or the demo concept."""
    if args.instance_data_dir is None:
        args.instance_data_dir = str(DEMO_CONCEPT / "train")
    folder = Path(args.instance_data_dir)
    meta_file = folder.parent / "concept.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    args.concept_name = args.concept_name or meta.get("name") or folder.name
    args.trigger = args.trigger or meta.get("trigger")
    args.instance_prompt = args.instance_prompt or meta.get("instance_prompt")
    if args.heldout_data_dir is None and meta and (folder.parent / "heldout").is_dir():
        args.heldout_data_dir = str(folder.parent / "heldout")
    args.output_dir = args.output_dir or str(ROOT / "outputs" / "runs" / args.concept_name)


def load_state(args, all_models: dict, models: dict) -> tuple[ShareState, ShareConfig]:
    """The Share file to extend (validated against the base model), or an empty one, and the settings
    to continue it with (the flags given over the file's stored `ShareConfig`).

    ``models`` are the components this run trains; the file gains the target layers it does not adapt yet.
    """
    path = Path(args.share_path)
    if path.is_dir():
        fail(f"--share_path {path} is a folder; give the Share file's path, e.g. {path / DEFAULT_WEIGHT_NAME}.")
    if not os.access(path.parent if path.parent.exists() else Path("."), os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        fail(f"--share_path {path} cannot be written (no permission): checked before training, so no training is lost.")
    stored, state, args.share_token = None, ShareState.empty({}), ABSENT
    if path.exists():
        state, header = read_share(path)
        args.share_token = header["file_token"]
        have = model_shapes(all_models) | model_shapes(all_models, layers=state.shapes)
        check_compatible(state.shapes, have, f"The Share file {path}")
        if args.concept_name in state.names and not args.overwrite_concept:
            fail(f"{path} already has a concept named {args.concept_name!r}; pass --overwrite_concept to replace it.")
        try:
            stored = stored_config(header)
        except ValueError as e:
            raise ShareFileError(f"{path}: its stored settings are invalid: {e}") from e
    try:
        config = resolve_config(stored, rebase=args.rebase, basis_rank=args.basis_rank, basis_energy=args.basis_energy,
                                basis_budget=args.basis_budget,
                                coef_rank=args.coef_rank, num_extra_directions=args.num_extra_directions,
                                base_model=portable_path(args.pretrained_model_name_or_path, ROOT),
                                target_modules=_targets_flag(args.target_modules),
                                text_encoder_target_modules=_targets_flag(args.text_encoder_target_modules))
        train_shapes = {}
        for component, model in models.items():
            targets = config.text_encoder_target_modules if component.startswith("text_encoder") else config.target_modules
            train_shapes |= model_shapes({component: model}, targets)
    except ValueError as e:
        fail(str(e))
    state = with_layers(state, train_shapes)
    return state, config.with_convolutions(conv_kernels(all_models, state.shapes))


def _targets_flag(values: list[str] | None):
    """``--target_modules``: names, or one regular expression (an entry with a regex character other than ".")."""
    if values and len(values) == 1 and any(ch in values[0] for ch in "*+?[](){}|^$\\"):
        return values[0]
    return values


class LearnError(Exception):
    """A problem with the user's input or run, reported as ``learn_concept.py: error: <message>``."""


def fail(message: str):
    raise LearnError(message)


def main(args) -> dict | None:
    """Run, and on failure say why in the progress file (which the web UI reads) and on stderr."""
    try:
        return learn(args)
    except LearnError as e:
        report_progress(args, status="failed", error=str(e))
        raise SystemExit(f"learn_concept.py: error: {e}") from None
    except Exception as e:
        report_progress(args, status="failed", error=f"{type(e).__name__}: {e}")
        raise


@dataclass
class Base:
    """The frozen base model, on the training device and in the training precision."""

    path: Path
    tokenizer: object
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    dtype: torch.dtype
    component: str = "unet"  # the denoiser's component: "unet", or "transformer" (held in ``unet``)
    flow: FlowMatching | None = None  # transformer pipelines: their objective, text encoding and pipeline

    def pipeline(self, args):
        if self.flow is not None:
            for encoder in text_encoders(self).values():  # back from the CPU (--pre_compute_text_embeddings)
                encoder.to(self.unet.device)
            return self.flow.pipe
        pipe = DiffusionPipeline.from_pretrained(
            self.path, unet=self.unet, text_encoder=self.text_encoder.to(self.unet.device), vae=self.vae, tokenizer=self.tokenizer,
            local_files_only=True, safety_checker=None, variant=args.variant,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def learn(args) -> dict | None:
    started = time.time()
    # inputs first: a bad name, folder or file fails in seconds, before any model is loaded
    try:
        args.concept_name = check_concept_name(args.concept_name)
        if args.trigger is not None:
            args.trigger = check_trigger(args.trigger)
        examples = read_instance_images(args.instance_data_dir, args.instance_prompt)
        check_image_count(len(examples), args.instance_data_dir)
        heldout = read_instance_images(args.heldout_data_dir, args.instance_prompt) if args.heldout_data_dir else []
        heldout = heldout[: args.num_heldout_images]
        validation_images = read_validation_images(args.validation_images)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    check_flags(args)
    try:
        args.base_path = snapshot(args.pretrained_model_name_or_path, "base pipeline", revision=args.revision)
        args.tokenizer_path = snapshot(args.tokenizer_name, "tokenizer", revision=args.revision) if args.tokenizer_name else None
    except OSError as e:
        fail(str(e))
    if not (args.base_path / "model_index.json").is_file():
        fail(f"{args.pretrained_model_name_or_path} is not a Diffusers pipeline folder (no model_index.json).")
    accelerator = make_accelerator(args)
    base = load_base(args, accelerator)
    models = trained_models(args, base)
    if base.flow is not None and args.tokenizer_name:  # as train_dreambooth_lora_{sd3,flux}.py, which have no such flag
        fail("--tokenizer_name replaces the one tokenizer of a UNet pipeline; SD3 and Flux pipelines have a CLIP and a T5 "
             "tokenizer each: put the ones you want in the base pipeline's folder.")
    old_state = share_to_extend(args, base, models)
    old_heldout = stored_heldout(args, old_state)
    # the new concept's trainable parametrisation, fp32 even under mixed precision
    trainers = attach_new_concept(models, old_state, p=args.config.coef_rank, phi=args.config.num_extra_directions, seed=args.seed)
    steps, loss_value = train(args, accelerator, base, models, trainers, examples, heldout)

    result = None
    if accelerator.is_main_process:
        factors = concept_factors(trainers)
        pipe = base.pipeline(args)
        trained_loss = eval_loss(pipe, heldout, args.seed)  # the new concept, still in training form
        detach_new_concept(models)
        report_progress(args, status="merging", step=steps, max_steps=steps, loss=loss_value)
        trained = Trained(old_state, factors, trained_loss, examples, heldout, steps, started, old_heldout)
        result = finish(args, accelerator, pipe, trained, validation_images)
        if args.push_to_hub:
            result["hub_repo_id"] = push_to_hub(args, result)
        report_progress(args, status="done", step=steps, max_steps=steps, loss=loss_value, report=result)
    accelerator.end_training()
    return result


def text_encoders(base: Base) -> dict[str, torch.nn.Module]:
    """The base's text encoders by component (SD3 and Flux have two or three)."""
    if base.flow is None:
        return {"text_encoder": base.text_encoder}
    return {c: m for c in COMPONENTS if c.startswith("text_encoder") and (m := getattr(base.flow.pipe, c, None)) is not None}


def encoders_off(base: Base) -> None:
    """--pre_compute_text_embeddings: the text encoders wait on the CPU until a pipeline needs them (`Base.pipeline`)."""
    for encoder in text_encoders(base).values():
        encoder.to("cpu")


def trained_models(args, base: Base) -> dict[str, torch.nn.Module]:
    """The components this run adapts: the denoiser, and the CLIP (--train_text_encoder) and T5 (--train_t5) text encoders."""
    encoders = text_encoders(base)
    t5 = {c for c, m in encoders.items() if isinstance(m, T5EncoderModel)}
    if args.train_t5 and not t5:
        fail("--train_t5: this base model has no T5 text encoder (SD3 and Flux have one).")
    chosen = {c: m for c, m in encoders.items() if (args.train_t5 if c in t5 else args.train_text_encoder)}
    return {base.component: base.unet} | chosen


def check_flags(args) -> None:
    """Flag combinations and optional packages, checked before any model is loaded (names as in train_dreambooth_lora.py)."""
    for flag in ("num_heldout_images", "finetune_after_merge_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            fail(f"--{flag} must be 0 or more, got {getattr(args, flag)}.")
    for flag in ("train_text_encoder", "train_t5"):
        if args.pre_compute_text_embeddings and getattr(args, flag):
            fail(f"--pre_compute_text_embeddings cannot be combined with --{flag} (the text encoder's output changes while training).")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            fail("--use_8bit_adam needs bitsandbytes, which is not installed: pip install bitsandbytes (or leave the flag out for torch's AdamW).")
    if args.push_to_hub:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            fail("--push_to_hub needs the network, but HF_HUB_OFFLINE is set; nothing was trained.")


def read_validation_images(paths) -> list:
    """--validation_images, read (and checked) before training."""
    from PIL import Image

    images = []
    for path in paths or ():
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as e:
            raise ValueError(f"--validation_images: {path} is not a readable image ({e}).") from None
    return images


def make_accelerator(args) -> Accelerator:
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    level = logging.INFO if accelerator.is_main_process else logging.ERROR
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=level)
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def load_base(args, accelerator) -> Base:
    path = args.base_path  # a local folder (a Hub id's snapshot, `learn` resolved it)
    load = dict(variant=args.variant, local_files_only=True)
    if "transformer" in json.loads((path / "model_index.json").read_text()):
        return load_transformer_base(args, accelerator, path, load)
    if args.tokenizer_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **load)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **load)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **load)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    if unet.config.addition_embed_type not in (None, "text"):  # "text" pools the prompt: no extra inputs
        fail(f"this script trains UNets conditioned on the prompt only (SD 1.x/2.x-style); this one needs "
             f"addition_embed_type={unet.config.addition_embed_type!r} inputs (SDXL), which it does not provide yet.")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
        model.to(accelerator.device, dtype=dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    args.resolution = args.resolution or unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return Base(path, tokenizer, text_encoder, vae, unet, noise_scheduler, dtype)


def load_transformer_base(args, accelerator, path: Path, load: dict) -> Base:
    """SD3 / Flux: the whole pipeline (its ``encode_prompt`` needs every text encoder), frozen, and its objective."""
    pipe = DiffusionPipeline.from_pretrained(path, **load)
    pipe.set_progress_bar_config(disable=True)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for model in pipe.components.values():
        if isinstance(model, torch.nn.Module):
            model.requires_grad_(False)
    pipe.to(accelerator.device, dtype=dtype)
    if args.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    args.resolution = args.resolution or pipe.default_sample_size * pipe.vae_scale_factor
    flow = FlowMatching(pipe, args.max_sequence_length, args.guidance_scale, args.weighting_scheme)
    args.max_sequence_length = flow.max_sequence_length
    return Base(path, pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.transformer, flow.schedule, dtype, "transformer", flow)


def share_to_extend(args, base: Base, models: dict) -> ShareState:
    """The Share file's state this concept joins (its namesake dropped with --overwrite_concept);
    sets ``args.config``, the settings it is continued with."""
    try:
        state, args.config = load_state(args, {base.component: base.unet} | text_encoders(base), models)
    except (ShareFileError, FileNotFoundError) as e:
        fail(str(e))
    if args.concept_name in state.names:  # --overwrite_concept: drop it, refit the rest
        state, _ = state.remove(args.concept_name, **args.config.merge_kwargs())
    return state


def train(args, accelerator, base: Base, models: dict, trainers: dict, examples, heldout) -> tuple[int, float]:
    """The Accelerate loop (checkpointed, exactly resumable); returns the steps done and the last loss."""
    output_dir = Path(args.output_dir)
    params = [p for t in trainers.values() for p in t.parameters()]
    class_examples = prepare_class_images(args, accelerator, base.path) if args.with_prior_preservation else []
    dataset = ConceptDataset(examples, args.resolution, args.center_crop, args.random_flip, class_examples, seed=args.seed)
    # its own generator: creating an iterator must not draw from the global RNG (exact resume)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed))
    cache = Cache(base.vae, base.tokenizer, base.text_encoder, dataset, args, accelerator.device, base.dtype, base.flow)
    if args.pre_compute_text_embeddings:
        cache.text([e.caption for e in dataset.examples + dataset.class_examples])
        encoders_off(base)
        accelerator.print(f"--pre_compute_text_embeddings: {len(cache.texts)} caption(s) encoded; the text encoders are off the accelerator.")

    scale = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes if args.scale_lr else 1
    adam = torch.optim.AdamW
    if args.use_8bit_adam:
        import bitsandbytes

        adam = bitsandbytes.optim.AdamW8bit
    optimizer = adam(params, lr=args.learning_rate * scale, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    per_epoch = steps_per_epoch(math.ceil(len(loader) / accelerator.num_processes), args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes, num_cycles=args.lr_num_cycles, power=args.lr_power,
    )
    prepared = accelerator.prepare(*models.values(), optimizer, loader, lr_scheduler)
    wrapped = dict(zip(models, prepared[: len(models)]))
    optimizer, loader, lr_scheduler = prepared[len(models):]
    per_epoch = steps_per_epoch(len(loader), args.gradient_accumulation_steps)
    epochs = math.ceil(max_steps / per_epoch)

    checkpoint_only_the_concept(accelerator, trainers, args.share_path)
    if accelerator.is_main_process:
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("share-learn-concept", config=tracked)

    global_step, first_epoch = 0, 0
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(output_dir, args.resume_from_checkpoint)
        if checkpoint is None:
            accelerator.print(f"No checkpoint {args.resume_from_checkpoint!r} in {output_dir}; starting a new run.")
        else:
            accelerator.print(f"Resuming from {checkpoint}")
            accelerator.load_state(str(checkpoint))
            global_step = int(checkpoint.name.split("-")[1])
            first_epoch = global_step // per_epoch

    # -- training -----------------------------------------------------------------------------------
    train_modules = list(wrapped.values())
    progress = tqdm(range(max_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    loss_value = float("nan")
    for epoch in range(first_epoch, epochs):
        for model in train_modules:
            model.train()
        loader.set_epoch(epoch)  # the sampler's permutation and the augmentations depend on the epoch only
        dataset.set_epoch(epoch)
        epoch_loader = loader
        if epoch == first_epoch and global_step % per_epoch:
            epoch_loader = accelerator.skip_first_batches(loader, (global_step % per_epoch) * args.gradient_accumulation_steps)
        for batch in epoch_loader:
            with accelerator.accumulate(*train_modules):
                latents = cache.latents(batch)
                text = cache.text(batch["captions"], encoder=wrapped.get("text_encoder"))
                if base.flow is not None:
                    loss = base.flow.loss(wrapped[base.component], latents, text, batch["num_class"], args.prior_loss_weight)
                else:
                    loss = denoising_loss(wrapped["unet"], base.noise_scheduler, latents, text, batch["num_class"], args.prior_loss_weight)
                if not torch.isfinite(loss):
                    fail(f"the loss became {loss.item()} at step {global_step}: stopping; {args.share_path} was not touched. "
                         "Lower --learning_rate or use fp32.")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                global_step += 1
                progress.update(1)
                loss_value = loss.detach().item()
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.1e}")
                accelerator.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
                if accelerator.is_main_process:
                    report_progress(args, status="training", step=global_step, max_steps=max_steps, loss=loss_value)
                    if args.validation_steps and global_step % args.validation_steps == 0:
                        preview = base.pipeline(args)
                        image = generate_validation(preview, args, heldout, count=1)[0]
                        if args.pre_compute_text_embeddings:
                            encoders_off(base)
                        atomic_write(output_dir / "preview.png", lambda tmp, image=image: image.save(tmp, format="PNG"))
                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if global_step >= max_steps:
                break
        if args.validation_epochs and (epoch + 1) % args.validation_epochs == 0 and accelerator.is_main_process:
            images = generate_validation(base.pipeline(args), args, heldout)
            log_images(accelerator, images, "validation", global_step)
        if global_step >= max_steps:
            break
    progress.close()
    accelerator.wait_for_everyone()

    return global_step, loss_value


def checkpoint_only_the_concept(accelerator, trainers: dict, share_path) -> None:
    """Checkpoints hold only the new concept's tensors (plus optimizer, scheduler and RNG states, which
    Accelerate saves); resuming against a Share file whose basis changed since is refused."""
    def save_hook(_models, weights, directory):
        if accelerator.is_main_process:
            tensors = {f"{c}.{k}": v.detach().float().cpu().contiguous() for c, t in trainers.items() for k, v in t.state_dict().items()}
            save_file(tensors, Path(directory) / CHECKPOINT_WEIGHTS)
        weights.clear()

    def load_hook(_models, directory):
        _models.clear()
        tensors = load_file(Path(directory) / CHECKPOINT_WEIGHTS)
        for c, t in trainers.items():
            sd = {k.partition(".")[2]: v for k, v in tensors.items() if k.partition(".")[0] == c}
            if any(not torch.equal(sd[k].to(v), v) for k, v in t.state_dict().items() if k.endswith((".U", ".V"))):
                fail(f"checkpoint {directory} was trained against another state of {share_path} (its basis differs).")
            t.load_state_dict(sd)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


class Cache:
    """Latents and text embeddings computed once when nothing trainable or random feeds them."""

    def __init__(self, vae, tokenizer, text_encoder, dataset, args, device, dtype, flow: FlowMatching | None = None):
        self.vae, self.tokenizer, self.text_encoder, self.dtype, self.flow = vae, tokenizer, text_encoder, dtype, flow
        self.scaling = vae.config.scaling_factor
        self.dists = {}
        if dataset.deterministic_crops():
            with torch.no_grad():
                for i, ex in enumerate(dataset.examples + dataset.class_examples):
                    for flip in (False, True) if args.random_flip else (False,):
                        pixels = prepare_image(ex.image, args.resolution, True, flip)[None]
                        d = latent_dist(vae, pixels)
                        self.dists[(i, flip)] = (d.mean, d.std)
        self.texts = {}
        self.cache_text = not (args.train_text_encoder or args.train_t5)

    def latents(self, batch) -> torch.Tensor:
        if self.dists:
            parts = [self.dists[tuple(k)] for k in batch["keys"]]
            mean, std = torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])
            sample = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        else:
            with torch.no_grad():
                sample = latent_dist(self.vae, batch["pixel_values"]).sample()
        if self.flow is not None:
            return self.flow.latents(sample).to(self.dtype)
        return (sample * self.scaling).to(self.dtype)

    def text(self, captions: list[str], encoder=None) -> torch.Tensor:
        if self.flow is not None:
            return self.flow_text(captions)
        if not self.cache_text:
            return encode_text(self.tokenizer, encoder, captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self.texts]
        if missing:
            with torch.no_grad():
                for c, e in zip(missing, encode_text(self.tokenizer, self.text_encoder, missing)):
                    self.texts[c] = e
        return torch.stack([self.texts[c] for c in captions])

    def flow_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds, pooled)`` through the pipeline's encoders (a trained CLIP encoder is the pipeline's own)."""
        if not self.cache_text:
            return self.flow.encode(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self.texts]
        if missing:
            with torch.no_grad():
                for c, embeds, pooled in zip(missing, *self.flow.encode(missing)):
                    self.texts[c] = (embeds, pooled)
        return tuple(torch.stack(parts) for parts in zip(*(self.texts[c] for c in captions)))


def find_checkpoint(output_dir: Path, which: str) -> Path | None:
    if which != "latest":
        path = Path(which)
        return path if path.is_dir() else (output_dir / which if (output_dir / which).is_dir() else None)
    found = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int | None) -> None:
    if accelerator.is_main_process and limit is not None:
        found = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in found[: max(0, len(found) - limit + 1)]:
            shutil.rmtree(old)
    accelerator.save_state(str(output_dir / f"checkpoint-{step}"))


def prepare_class_images(args, accelerator, base: Path):
    """Prior preservation: generate missing class images with the base model (as DreamBooth)."""
    if not (args.class_data_dir and args.class_prompt):
        fail("--with_prior_preservation needs --class_data_dir and --class_prompt.")
    folder = Path(args.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = len([p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")])
    if have < args.num_class_images and accelerator.is_main_process:
        pipe = DiffusionPipeline.from_pretrained(base, local_files_only=True, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(accelerator.device)
        for start in range(have, args.num_class_images, args.sample_batch_size):
            n = min(args.sample_batch_size, args.num_class_images - start)
            gens = [torch.Generator().manual_seed(args.seed + start + i) for i in range(n)]
            for i, image in enumerate(pipe([args.class_prompt] * n, generator=gens).images):
                image.save(folder / f"{start + i:05d}.png")
        del pipe
    accelerator.wait_for_everyone()
    return read_instance_images(folder, args.class_prompt)


def eval_loss(pipe, heldout, seed) -> float | None:
    if not heldout:
        return None
    return heldout_loss(pipe, [e.image for e in heldout], [e.caption for e in heldout], seed=seed)


def stored_heldout(args, state: ShareState) -> dict[str, list]:
    """With ``--heldout_from_file``, the old concepts' held-out images from the folders their metadata
    names (read before training; a folder that is gone or unreadable is skipped, never fatal)."""
    found = {}
    for concept in state.concepts if args.heldout_from_file else ():
        folder = concept.get("heldout_data_dir")
        if not isinstance(folder, str) or not folder:
            continue
        if not Path(folder).is_absolute() and not Path(folder).is_dir() and (ROOT / folder).is_dir():
            folder = str(ROOT / folder)  # stored relative to the repository (`portable_path`)
        try:
            found[concept["name"]] = read_instance_images(folder, concept.get("prompt"))
        except (ValueError, OSError) as e:
            logger.warning(f"--heldout_from_file: skipping {concept['name']!r}'s held-out folder {folder}: {e}", main_process_only=True)
    return found


def concept_losses(pipe, state: ShareState, seed: int, heldout_of: dict[str, list]) -> dict[str, float]:
    """Held-out loss of every concept of ``state`` whose held-out images are given (name → examples)."""
    pipe.load_share(state)
    losses = {}
    try:
        for concept in state.concepts:
            heldout = heldout_of.get(concept["name"])
            if heldout:
                pipe.set_share_concepts(concept["name"])
                losses[concept["name"]] = eval_loss(pipe, heldout, seed)
    finally:
        pipe.unload_share()
    return losses


@dataclass
class Trained:
    """What training produced, for `finish`."""

    old_state: ShareState  # the file's state the concept joins
    factors: dict  # the concept as dense factors per layer (`concept_factors`)
    loss: float | None  # its held-out loss in training form, before the merge
    examples: list
    heldout: list
    steps: int
    started: float  # time.time() at the start of the run
    old_heldout: dict  # the old concepts' held-out examples (`stored_heldout`), by name


def finish(args, accelerator, pipe, trained: Trained, validation_images=()) -> dict:
    """Merge, report, write the Share file atomically, write the model card, validate from the file."""
    old_state, factors, heldout, trained_loss = trained.old_state, trained.factors, trained.heldout, trained.loss
    examples, started, steps = trained.examples, trained.started, trained.steps
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "trigger": args.trigger, "prompt": args.instance_prompt, "steps": steps,
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "num_images": len(examples),
        "coef_rank": args.config.coef_rank, "num_extra_directions": args.config.num_extra_directions,
        "heldout_data_dir": portable_path(args.heldout_data_dir, ROOT) if args.heldout_data_dir else None,
    }
    base_loss = eval_loss(pipe, heldout, args.seed)
    if args.no_merge:  # keep the Share file as it is; the concept leaves as an ordinary LoRA file
        path = write_lora(factors, output_dir / "pytorch_lora_weights.safetensors")
        accelerator.print(f"--no_merge: {args.share_path} untouched; the concept is in {path} (a Diffusers LoRA file; "
                          f"base/trained held-out loss {base_loss} / {trained_loss}).")
        return {"lora_path": str(path), "heldout_loss_base": base_loss, "heldout_loss_trained": trained_loss}

    try:  # other writers wait; if one saved while this run trained, merge into what it saved
        with locked(args.share_path, timeout=WRITE_WAIT) as current:
            if current.token != args.share_token:
                old_state = joined_state(args, current.state, old_state)
                accelerator.print(f"{args.share_path} changed while training (another writer); merging into its new version.")
            new_state, report, config = merge_and_report(args, pipe, old_state, trained, meta, base_loss)
            current.save(new_state, config)
    except (OSError, ShareFileError) as e:  # e.g. disk full, the lock timed out, the file became invalid
        path = write_lora(factors, output_dir / "unsaved_concept.safetensors")
        fail(f"could not write {args.share_path} ({type(e).__name__}: {e}). The trained concept is kept as a LoRA file, {path}: "
             "fold it in with train/compress_loras.py, or load it with pipe.load_lora_weights.")
    write_model_card(Path(args.share_path), new_state, config)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    accelerator.print(format_report(report, new_state))

    pipe.load_share(args.share_path)  # validate end to end, through the file just written
    pipe.set_share_concepts(args.concept_name)
    images = generate_validation(pipe, args, heldout)
    if validation_images:  # as in train_dreambooth_lora.py: one result per given image (here image-to-image)
        images = generate_from_images(pipe, args, heldout, validation_images)
    pipe.unload_share()
    for i, image in enumerate(images):
        image.save(output_dir / f"validation_{i}.png")
    log_images(accelerator, images, "test", steps)
    accelerator.print(f"Wrote {args.share_path} ({Path(args.share_path).stat().st_size / 1024:.1f} KiB, "
                      f"{len(new_state.names)} concepts) in {time.time() - started:.0f} s; report in {output_dir / 'report.json'}")
    return report


def joined_state(args, current: ShareState | None, old_state: ShareState) -> ShareState:
    """The state to merge into when another writer saved the file during training: its new
    version, with this run's layers (the base model was checked against the file at the start)."""
    if current is None:
        fail(f"{args.share_path} was deleted while training; nothing was written.")
    state = with_layers(current, old_state.shapes)
    if args.concept_name in state.names:
        if not args.overwrite_concept:
            raise LearnError(f"another writer added a concept named {args.concept_name!r} to {args.share_path} while this "
                             "one trained")
        state, _ = state.remove(args.concept_name, **args.config.merge_kwargs())
    return state


def merge_and_report(args, pipe, old_state: ShareState, trained: Trained, meta: dict, base_loss):
    """The merge, the optional post-merge fine-tune, and what they did to every concept."""
    losses_before = concept_losses(pipe, old_state, args.seed, trained.old_heldout) if old_state.concepts else {}
    new_state, merge_report = old_state.merge(
        {args.concept_name: trained.factors}, meta={args.concept_name: meta}, **args.config.merge_kwargs()
    )
    finetune_steps = trained.steps // 4 if args.finetune_after_merge_steps is None else args.finetune_after_merge_steps
    if finetune_steps:
        new_state = finetune_after_merge(args, pipe, new_state, trained.examples, finetune_steps)
    losses_after = concept_losses(pipe, new_state, args.seed, trained.old_heldout | {args.concept_name: trained.heldout})
    trained_loss, steps = trained.loss, trained.steps

    report = {"concept": args.concept_name, "share_path": str(args.share_path), "steps": steps, "finetune_after_merge_steps": finetune_steps,
              "wall_time_s": round(time.time() - trained.started, 1), "concepts": {}}
    for name in new_state.names:
        entry = {"merge_error": merge_report[name]["overall"], "heldout_loss_before": losses_before.get(name),
                 "heldout_loss_after": losses_after.get(name)}
        if name == args.concept_name:
            entry.update(heldout_loss_before=trained_loss, heldout_loss_base=base_loss)
        report["concepts"][name] = entry
    for concept in new_state.concepts:  # keep the figures in the file's history too
        if concept["name"] == args.concept_name:
            concept.update(heldout_loss_base=base_loss, heldout_loss_trained=trained_loss, heldout_loss_merged=losses_after.get(args.concept_name))
    return new_state, report, args.config.to_dict()


def finetune_after_merge(args, pipe, state: ShareState, examples, steps: int) -> ShareState:
    """Fine-tune the new concept's k×p coefficients of the UNet or transformer in the merged basis
    (basis frozen, φ = 0), with the run's objective."""
    c = state.index(args.concept_name)
    component = denoiser(pipe)
    models = {component: getattr(pipe, component)}
    layers = {n: l for n, l in state.layers.items() if n.startswith(f"{component}.") and l.k > 0}  # k = 0: nothing to tune
    trainer = attach_new_concept(models, ShareState(layers, state.concepts), p=1, phi=0, seed=args.seed)[component]
    for name, layer in zip(trainer.layer_names, trainer.layers):  # start from the merged coefficients
        layer.B = torch.nn.Parameter(state.layers[name].B[c].clone().to(layer.U))
        layer.A = torch.nn.Parameter(state.layers[name].A[c].clone().to(layer.U))
    flow = FlowMatching(pipe, args.max_sequence_length, args.guidance_scale, args.weighting_scheme) if component == "transformer" else None
    train_in_process(pipe, list(trainer.parameters()), examples, steps, args.learning_rate * 0.3,
                     batch_size=args.train_batch_size, seed=args.seed, max_grad_norm=args.max_grad_norm,
                     resolution=args.resolution, flow=flow)
    detach_new_concept(models)
    with torch.no_grad():
        for name, layer in zip(trainer.layer_names, trainer.layers):
            B, A = balance(layer.B.detach().double(), layer.A.detach().double())
            state.layers[name].B[c], state.layers[name].A[c] = B.float(), A.float()
    return state


def generate_validation(pipe, args, heldout, count=None):
    count = count or args.num_validation_images
    prompt = args.validation_prompt or (heldout[0].caption if heldout else args.instance_prompt)
    gens = [torch.Generator().manual_seed(args.seed + i) for i in range(count)]
    with torch.no_grad():
        return pipe([prompt] * count, generator=gens, num_inference_steps=25, **trained_size(pipe, args)).images


def trained_size(pipe, args) -> dict:
    """Transformer pipelines default to 1024 px and 512 T5 tokens, whatever was trained: ask for what was."""
    if denoiser(pipe) != "transformer":
        return {}
    return {"height": args.resolution, "width": args.resolution, "max_sequence_length": args.max_sequence_length}


def generate_from_images(pipe, args, heldout, images) -> list:
    """--validation_images: the validation prompt applied to each image by the image-to-image pipeline of the same
    components (it shares the loaded Share state)."""
    from diffusers import AutoPipelineForImage2Image

    i2i = AutoPipelineForImage2Image.from_pipe(pipe)
    prompt = args.validation_prompt or (heldout[0].caption if heldout else args.instance_prompt)
    size = (args.resolution, args.resolution)
    with torch.no_grad():
        return [i2i(prompt, image=image.resize(size), generator=torch.Generator().manual_seed(args.seed + i), num_inference_steps=25,
                    strength=0.75, **trained_size(pipe, args)).images[0] for i, image in enumerate(images)]


def push_to_hub(args, result: dict) -> str:
    """--push_to_hub: one commit with the Share file (as share.safetensors, so ``pipe.load_share(repo_id)`` finds it),
    its model card, the report and the validation images (with --no_merge: the LoRA file instead of the Share file)."""
    from huggingface_hub import create_repo, upload_folder

    output_dir, share = Path(args.output_dir), Path(args.share_path)
    repo_id = create_repo(args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token).repo_id
    files = {p.name: p for p in sorted(output_dir.glob("validation_*.png"))}
    if "lora_path" in result:
        files["pytorch_lora_weights.safetensors"] = Path(result["lora_path"])
    else:
        files |= {DEFAULT_WEIGHT_NAME: share, "report.json": output_dir / "report.json"}
    with tempfile.TemporaryDirectory(prefix="share-push-") as staging:
        for name, path in files.items():
            shutil.copy(path, Path(staging) / name)
        if "lora_path" not in result:  # the card, with the example loading from the repo
            state, header = read_share(Path(staging) / DEFAULT_WEIGHT_NAME)
            write_model_card(Path(staging) / DEFAULT_WEIGHT_NAME, state, header["config"], load_from=repo_id)
            files["README.md"] = None
        upload_folder(repo_id=repo_id, folder_path=staging, token=args.hub_token,
                      commit_message=f"Share: add concept {args.concept_name!r}")
    print(f"Pushed {', '.join(files)} to https://huggingface.co/{repo_id}")
    return repo_id


def report_progress(args, **status) -> None:
    if args.progress_file:
        path = Path(args.progress_file)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(status)))


def log_images(accelerator, images, name, step):
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(name, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")


def format_report(report: dict, state: ShareState) -> str:
    fmt = lambda v: "      -" if v is None else f"{v:7.4f}"  # noqa: E731
    lines = [f"\nMerged {report['concept']!r} into {report['share_path']} — what the merge did to every concept:",
             f"{'concept':<28} {'merge err':>9} {'loss before':>11} {'loss after':>10}  (held-out denoising MSE)"]
    for name, e in report["concepts"].items():
        mark = "  ← new (before = trained, pre-merge)" if name == report["concept"] else ""
        lines.append(f"{name:<28} {e['merge_error']:9.4f} {fmt(e['heldout_loss_before']):>11} {fmt(e['heldout_loss_after']):>10}{mark}")
    ks = sorted({l.k for l in state.layers.values()})
    lines.append(f"basis width k per layer: {ks[0]}–{ks[-1]}; {len(state.names)} concepts in the file")
    return "\n".join(lines)


PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    """Started by ``accelerate launch``: exit when the launcher dies, even by SIGKILL, so a killed
    launch never leaves a trainer behind that still writes the Share file. Linux: the kernel sends
    SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); elsewhere a thread watches the parent."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            launched = b"accelerate" in f.read()
    except OSError:
        launched = "ACCELERATE_MIXED_PRECISION" in os.environ and "LOCAL_RANK" in os.environ
    if not launched:
        return  # run directly (the web UI, a shell): its parent's end is not ours
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # it died before the prctl took effect
                os._exit(1)
            return
        except (OSError, AttributeError):
            pass

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


if __name__ == "__main__":
    die_with_launcher()
    main(parse_args())
