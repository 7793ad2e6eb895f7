"""The shipped tiny base: loads offline with stock Diffusers, any scheduler, right shapes, small."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.models.attention_processor import Attention

import share_lab
from share_lab import pilot_world as pw
from share_lab import world


@pytest.fixture(scope="module")
def pipe():
    pipe = StableDiffusionPipeline.from_pretrained(share_lab.TINY_BASE, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_every_caption_word_and_trigger_is_one_token(pipe):
    tokenizer = pipe.tokenizer
    assert tokenizer.model_max_length == 77
    for word in pw.V2_CAPTION_WORDS + list(world.TRIGGER_WORDS):  # world v2's words include v1's
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    caption = world.make_concept(0).caption("green", "top left")
    # a photo of <trigger> on a green background , top left: 11 tokens + start + end
    assert len(tokenizer(caption).input_ids) == 13
    assert len(tokenizer("zzzzqqq", add_special_tokens=False).input_ids) > 1  # unknown words split


def test_tokenizer_sources_are_hand_written_bpe_files():
    folder = share_lab.TINY_BASE / "tokenizer"
    assert (folder / "merges.txt").read_text().splitlines()[0] == "#version: 0.2"
    vocab = json.loads((folder / "vocab.json").read_text())
    assert {t + "</w>" for t in world.TRIGGER_WORDS} <= set(vocab)


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
                                             DPMSolverMultistepScheduler, PNDMScheduler, UniPCMultistepScheduler])
def test_generates_with_any_scheduler(pipe, scheduler_class):
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    images = pipe(["a large red circle on a blue background, center"] * 2, num_inference_steps=4, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, world.RESOLUTION, world.RESOLUTION, 3)
    assert np.isfinite(images).all() and images.std() > 0.05


def test_the_base_puts_the_object_where_the_prompt_says(pipe):
    """Each of the nine position words, in a held-out scene: the object's centre lands in the asked
    cell of the 3x3 grid (v5 put it where the starting noise did)."""
    from share_lab import evaluation

    scenes = [dataclasses.replace(world.heldout_scenes(1, seed=i)[0], position=p) for i, p in enumerate(world.POSITIONS)]
    images = evaluation.generate(pipe, [s.caption() for s in scenes], seed=0, steps=15)
    found = [evaluation.object_position(image) for image in images]
    assert sum(f == s.position for f, s in zip(found, scenes)) >= 8, found


def test_attention_is_standard_and_wide(pipe):
    attentions = {name: m for name, m in pipe.unet.named_modules() if isinstance(m, Attention)}
    assert len(attentions) >= 6
    for module in attentions.values():
        for linear in (module.to_q, module.to_k, module.to_v, module.to_out[0]):
            assert min(linear.in_features, linear.out_features) >= 128
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size >= 128


def test_fp32_and_within_size_budget(pipe):
    assert all(p.dtype == torch.float32 for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    total = sum(f.stat().st_size for f in share_lab.ASSETS.rglob("*.safetensors"))  # every shipped weight
    assert total <= 20_000_000, f"assets/ holds {total / 1e6:.1f} MB of weights"



def test_the_pretraining_script_builds_the_shipped_architecture(pipe):
    """train/pretrain_tiny_base.py's `build_unet` is the one definition (the pilots use it too): with
    three levels it is the shipped UNet; ``cross_attn="all"`` adds cross-attention at 16x16 too."""
    import runpy

    def plain(config):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}

    build_unet = runpy.run_path(str(share_lab.ROOT / "train" / "pretrain_tiny_base.py"))["build_unet"]
    assert plain(build_unet(levels=3).config) == plain(pipe.unet.config)
    cross = {".".join(name.split(".")[:2]) for name, m in build_unet("all").named_modules() if name.endswith("attn2")}
    assert cross == {"down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"}


def test_a_grown_unet_keeps_every_trained_weight_in_place(pipe):
    """add_third_level: the two-level UNet's weights reappear unchanged (its up blocks one place on),
    and only the 4x4 level is new."""
    import runpy

    script = runpy.run_path(str(share_lab.ROOT / "train" / "pretrain_tiny_base.py"))
    two = script["build_unet"]()
    grown = script["add_third_level"](two).state_dict()
    renamed = {"up_blocks.0.": "up_blocks.1.", "up_blocks.1.": "up_blocks.2."}

    def moved(name):
        return next((name.replace(a, b, 1) for a, b in renamed.items() if name.startswith(a)), name)

    for name, weight in two.state_dict().items():
        assert torch.equal(grown[moved(name)], weight), name
    blocks = {".".join(name.split(".")[:2]) for name in grown.keys() - set(map(moved, two.state_dict()))}
    assert blocks == {"down_blocks.1", "down_blocks.2", "up_blocks.0"}  # 8x8 gains its downsampler
    assert grown.keys() == pipe.unet.state_dict().keys()
    with pytest.raises(ValueError, match="two-level"):
        script["add_third_level"](pipe.unet)


def test_denoiser_stages_name_their_objective_and_bad_ones_are_refused():
    """--denoiser-stages: "eps" when a stage names no objective; the errors say what is wrong."""
    import argparse
    import runpy

    script = runpy.run_path(str(share_lab.ROOT / "train" / "pretrain_tiny_base.py"))
    parse = script["parse_stages"]
    assert parse("10:1e-3,5:2e-4:v-floor") == [(10, 1e-3, "eps"), (5, 2e-4, "v-floor")]
    assert script["OBJECTIVES"]["v-floor"]["prediction_type"] == "v_prediction"
    for text, error in [("10", "expected STEPS:LR"), ("10:fast", "expected STEPS:LR"), ("10:1e-3:v:x", "expected"),
                        ("0:1e-3", "positive"), ("10:1e-3:x0", "unknown objective x0")]:
        with pytest.raises(argparse.ArgumentTypeError, match=error):
            parse(text)


def test_the_pretraining_script_runs_every_stage_and_resumes(tmp_path):
    """A few steps of each stage of the world-v2 recipe write a pipeline stock Diffusers loads (float32,
    from float16 files), with world v2's words as single tokens and the UNet grown by its 4x4 level
    between the stages; run again, every stage resumes at its last step (nothing is trained twice) and
    writes the same weights."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    out = tmp_path / "pipeline"
    command = [sys.executable, str(share_lab.ROOT / "train" / "pretrain_tiny_base.py"), "--threads", "1",
               "--work-dir", str(tmp_path / "work"), "--output", str(out), "--vae-images", "48", "--vae-extra-images", "16",
               "--vae-steps", "2", "--decoder-steps", "2", "--v2-decoder-images", "16", "--v2-decoder-steps", "2",
               "--images", "48", "--denoiser-stages", "3:1e-3,2:1e-4:v-floor", "--batch-size", "4",
               "--vae-batch-size", "4", "--third-level-after", "1", "--half"]
    first = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "grown by a 4x4 level before stage 2" in first
    assert "denoiser stage 2 done" in first and "resumed" not in first
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert len(pipe.unet.config.block_out_channels) == 3 and pipe.unet.dtype == pipe.vae.dtype == torch.float32
    assert all(len(pipe.tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in pw.V2_CAPTION_WORDS)
    weights = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float16}

    again = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    for stage in ("vae: resumed at step 2", "decoder: resumed at step 2", "decoder-v2: resumed at step 2",
                  "denoiser: resumed at step 3", "denoiser: resumed at step 2"):
        assert stage in again
    assert "loss" not in again  # no training step ran
    resumed = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
