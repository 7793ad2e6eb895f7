"""Tiny SD-1, SDXL, SD3 and Flux pipelines built from configs, offline (no hub), in milliseconds."""

import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from share_diffusers.config import ShareConfig
from share_diffusers.io import save_share
from share_diffusers.subspace import LayerShare, ShareState
from share_diffusers.targets import COMPONENTS, conv_kernels, pipeline_shapes


@lru_cache
def tokenizer_dir() -> str:
    """A byte-level CLIP vocabulary with no merges: every character is a token, nothing is unknown."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    path = Path(tempfile.mkdtemp(prefix="tiny-clip-tok-"))
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return str(path)


def tokenizer():
    return CLIPTokenizer.from_pretrained(tokenizer_dir())


def text_config(hidden=32, projection_dim=None):
    return CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=hidden, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, projection_dim=projection_dim or hidden,
    )


def tiny_sd(seed=0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    text_encoder = CLIPTextModel(text_config(hidden=24))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
    return _set(
        StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer(), scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    )


def _set(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


SDXL_UNET = dict(  # SDXL's features (text_time embedding, linear projections, 2 transformer layers) in miniature
    block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
    attention_head_dim=(4, 8), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, norm_num_groups=8,
)


def tiny_sdxl(seed=0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SDXL_UNET)
    vae = AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    return _set(
        StableDiffusionXLPipeline(
            unet=unet, vae=vae, scheduler=scheduler,
            text_encoder=CLIPTextModel(text_config()), tokenizer=tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(text_config()), tokenizer_2=tokenizer(),
        )
    )


def t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer whose Unigram vocabulary (made here, not downloaded) is every printable ASCII character."""
    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(c, -2.0) for c in chars] + [("\u2581" + c, -1.5) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def t5_encoder(d_model=32) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=200, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)).eval()


def _flow_vae(latent_channels):
    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=latent_channels, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )


SD3_TRANSFORMER = dict(  # 2 joint blocks (the last is context_pre_only, as in SD3), patch 2, 16x16 latents
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32,
    pos_embed_max_size=16,
)


def tiny_sd3(seed=0) -> StableDiffusion3Pipeline:
    """SD3's layout in miniature: two CLIP encoders with projection, a T5 encoder, joint-attention transformer."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**SD3_TRANSFORMER)
    return _set(
        StableDiffusion3Pipeline(
            transformer=transformer, vae=_flow_vae(4), scheduler=FlowMatchEulerDiscreteScheduler(),
            text_encoder=CLIPTextModelWithProjection(text_config(hidden=16)), tokenizer=tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(text_config(hidden=16)), tokenizer_2=tokenizer(),
            text_encoder_3=t5_encoder(), tokenizer_3=t5_tokenizer(),
        )
    )


FLUX_TRANSFORMER = dict(  # 2 double- and 2 single-stream blocks, with the guidance embedding of FLUX.1-dev
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
)


def tiny_flux(seed=0) -> FluxPipeline:
    """Flux's layout in miniature: CLIP (pooled) and T5 encoders, packed 2x2 latents, guidance embedding."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER)
    return _set(
        FluxPipeline(
            transformer=transformer, vae=_flow_vae(4), scheduler=FlowMatchEulerDiscreteScheduler(),
            text_encoder=CLIPTextModel(text_config(hidden=32)), tokenizer=tokenizer(),
            text_encoder_2=t5_encoder(), tokenizer_2=t5_tokenizer(),
        )
    )


def synthetic_state(shapes: dict[str, tuple[int, int]], concepts: int, k: int | dict[str, int] = 16, p: int = 1, seed: int = 0,
                    scale: float = 0.05, dtype=torch.float32) -> ShareState:
    """A Share state with random orthonormal bases (``k`` per side, per layer if a dict, at most the
    layer's size) and random coefficients: what a trained file holds, as far as maths, speed and size
    are concerned. Concepts are named ``c0``, ``c1``, … with triggers ``<c0>``, …"""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (n, d) in shapes.items():
        kk = min(k[name] if isinstance(k, dict) else k, n, d)
        U = torch.linalg.qr(torch.randn(n, kk, generator=g, dtype=torch.float64))[0].to(dtype)
        V = torch.linalg.qr(torch.randn(d, kk, generator=g, dtype=torch.float64))[0].to(dtype)
        B, A = ((torch.randn(concepts, kk, p, generator=g, dtype=torch.float64) * scale).to(dtype) for _ in "BA")
        layers[name] = LayerShare(U, V, B, A)
    return ShareState(layers, [{"name": f"c{i}", "trigger": f"<c{i}>"} for i in range(concepts)])


def random_share(pipe, path, names=("cat", "dog", "owl"), p=2, scale=0.3, k_max=64, seed=0, components=None, target_modules=None):
    """A Share file for ``pipe`` with random concepts (on the default targets, or ``{component: target_modules}``);
    returns the state written."""
    g = torch.Generator().manual_seed(seed)
    shapes = pipeline_shapes(pipe, components)
    for component, targets in (target_modules or {}).items():
        shapes |= pipeline_shapes(pipe, [component], targets)
    new = {
        name: {l: (torch.randn(n, p, generator=g) * scale, torch.randn(d, p, generator=g) * scale) for l, (n, d) in shapes.items()}
        for name in names
    }
    meta = {name: {"trigger": f"<{name}>"} for name in names}
    state, _ = ShareState.empty(shapes).merge(new, meta=meta, k_max=k_max)
    models = {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}
    save_share(state, path, ShareConfig().with_convolutions(conv_kernels(models, shapes)).to_dict())
    return state


def fake_hub_repo(cache: str | Path, repo_id: str, files: dict[str, str | Path | bytes], revision: str = "main") -> Path:
    """A Hub model repo in a local Hub cache, as ``huggingface_hub`` lays it out
    (``models--owner--name/refs/<revision>``, ``snapshots/<sha>/<file>``), for offline tests.
    ``files`` maps a path in the repo to a local file or folder (copied) or bytes; returns the snapshot folder."""
    import hashlib
    import shutil

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    sha = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / sha
    for name, src in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            target.write_bytes(src)
        elif Path(src).is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True)
        else:
            shutil.copy(src, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(sha)
    return snapshot
