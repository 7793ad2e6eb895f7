"""Share on transformer pipelines: tiny SD3 and Flux pipelines (built offline from configs) get what the
UNet pipelines have: exact deltas and mixes, a concept per image (with SD3's classifier-free guidance and
Flux's guidance embedding and true CFG), per-call selection, bit-exact fuse/unfuse and unload, PEFT LoRAs
stacked on top, Flux LoRAs in the Diffusers/PEFT, kohya, ComfyUI and XLabs key styles folded in, export to a LoRA
that ``load_lora_weights`` loads, and files for the other kind of model refused."""

import copy
import re
import runpy
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import share_diffusers  # noqa: F401  (installs pipe.load_share & co.)
from share_diffusers import ShareFileError, loras_to_share, read_share, share_to_lora
from share_diffusers.targets import base_linear, find_targets, pipeline_shapes
from share_lab.tiny_pipelines import random_share, tiny_flux, tiny_sd, tiny_sd3

BUILDERS = {"sd3": tiny_sd3, "flux": tiny_flux}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(BUILDERS))
def pipe(request):
    return BUILDERS[request.param]()


def generate(pipe, prompt="a photo of a cat", seed=0, **kw):
    n = (len(prompt) if isinstance(prompt, list) else 1) * kw.get("num_images_per_prompt", 1)
    kw = {"num_inference_steps": 2, "height": 32, "width": 32, "max_sequence_length": 16, **kw}
    return pipe(prompt, generator=[torch.Generator().manual_seed(seed + i) for i in range(n)], output_type="pt", **kw).images


def transformer_inputs(pipe, batch=2, seed=0):
    """Random inputs of the pipeline's transformer (Flux: packed latents, position ids, guidance)."""
    g = torch.Generator().manual_seed(seed)
    kw = {"encoder_hidden_states": torch.randn(batch, 7, 32, generator=g), "pooled_projections": torch.randn(batch, 32, generator=g)}
    if "Flux" in type(pipe).__name__:
        return {**kw, "hidden_states": torch.randn(batch, 64, 16, generator=g), "timestep": torch.full((batch,), 0.5),
                "img_ids": pipe._prepare_latent_image_ids(batch, 8, 8, "cpu", torch.float32), "txt_ids": torch.zeros(7, 3),
                "guidance": torch.full((batch,), 3.5)}
    return {**kw, "hidden_states": torch.randn(batch, 4, 16, 16, generator=g), "timestep": torch.full((batch,), 500.0)}


def dense_copy(model, state, component, mix):
    """A copy of ``model`` with the dense ΔW of ``mix`` added to every adapted weight."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in find_targets(model, component).items():
            base_linear(module).weight += state.delta(f"{component}.{name}", mix).float()
    return model


def clip_components(pipe):
    return [c for c in ("text_encoder", "text_encoder_2") if f"{c}.encoder.layers.0.self_attn.q_proj" in pipeline_shapes(pipe)]


def t5_component(pipe):
    return "text_encoder_3" if "3" in type(pipe).__name__ else "text_encoder_2"


def test_the_target_lists_cover_joint_attention_feed_forwards_and_single_blocks():
    sd3, flux = (pipeline_shapes(b(), ["transformer"]) for b in (tiny_sd3, tiny_flux))
    last = "transformer.transformer_blocks.1."  # SD3's last block is context_pre_only: no to_add_out, no ff_context
    assert {n.removeprefix("transformer.transformer_blocks.0.") for n in sd3 if n.startswith("transformer.transformer_blocks.0.")} == {
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
        "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    }
    assert last + "attn.add_q_proj" in sd3 and last + "attn.to_add_out" not in sd3 and len(sd3) == 12 + 9
    single = {n.removeprefix("transformer.single_transformer_blocks.0.") for n in flux if "single_transformer_blocks.0." in n}
    assert single == {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"}
    assert flux["transformer.single_transformer_blocks.0.proj_out"] == (32, 160) and "transformer.proj_out" not in flux
    assert len(flux) == 2 * 12 + 2 * 5


def test_nothing_selected_and_unloaded_are_bit_identical_to_the_base(pipe, tmp_path):
    base = generate(pipe)
    random_share(pipe, tmp_path / "s.safetensors")
    pipe.load_share(tmp_path / "s.safetensors")
    assert torch.equal(generate(pipe), base)
    pipe.set_share_concepts("cat")
    assert (generate(pipe) - base).abs().max() > 1e-3
    pipe.unload_share()
    assert torch.equal(generate(pipe), base)
    assert not hasattr(pipe.transformer, "share_adapter") and pipe.share_concepts == []


@pytest.mark.parametrize("mix", [{"dog": 1.0}, {"cat": 0.7, "owl": -0.4}])
def test_selection_equals_adding_the_dense_delta(pipe, tmp_path, mix):
    state = random_share(pipe, tmp_path / "s.safetensors")
    kw, ids = transformer_inputs(pipe), torch.randint(0, 200, (2, 77))  # within every tiny vocabulary (T5: 200)
    components = ["transformer", *clip_components(pipe), t5_component(pipe)]
    assert len(components) == (4 if "3" in type(pipe).__name__ else 3)
    dense = {c: dense_copy(getattr(pipe, c), state, c, mix) for c in components}
    pipe.load_share(tmp_path / "s.safetensors")
    with torch.no_grad():
        base = pipe.transformer(**kw, return_dict=False)[0]
        pipe.set_share_concepts(mix if len(mix) > 1 else next(iter(mix)))
        got, want = pipe.transformer(**kw, return_dict=False)[0], dense["transformer"](**kw, return_dict=False)[0]
        assert (got - want).abs().max() <= 1e-5 and (got - base).abs().max() > 1e-2
        for c in components[1:]:
            assert (getattr(pipe, c)(ids).last_hidden_state - dense[c](ids).last_hidden_state).abs().max() <= 1e-5


@pytest.mark.parametrize("name, guidance", [("sd3", "cfg"), ("flux", "cfg"), ("flux", "true_cfg")])
def test_a_batch_of_different_concepts_equals_separate_calls(name, guidance, tmp_path):
    """SD3: both halves of classifier-free guidance follow their prompt. Flux: the guidance embedding
    (distilled guidance, no doubled batch), and with ``true_cfg`` a second, negative transformer call."""
    pipe, flux = BUILDERS[name](), name == "flux"
    random_share(pipe, tmp_path / "s.safetensors")
    pipe.load_share(tmp_path / "s.safetensors")
    prompts, selections = ["a cat", "a dog", "an owl"], ["cat", {"dog": 0.5, "owl": 0.5}, None]
    kw = {"num_images_per_prompt": 2, "guidance_scale": 3.5 if flux else 5.0}
    if guidance == "true_cfg":
        kw.update(true_cfg_scale=2.0, negative_prompt=["blurry"] * 3)
    pipe.set_share_concepts(selections)
    batch = generate(pipe, prompts, **kw)
    separate = []
    for i, (prompt, selection) in enumerate(zip(prompts, selections)):
        pipe.set_share_concepts(selection)
        separate.append(generate(pipe, prompt, seed=2 * i, **{**kw, "negative_prompt": "blurry"} if "negative_prompt" in kw else kw))
    torch.testing.assert_close(batch, torch.cat(separate), atol=1e-5, rtol=0)
    pipe.set_share_concepts(None)
    assert (generate(pipe, prompts[0], **{k: v for k, v in kw.items() if k != "negative_prompt"}) - separate[0]).abs().max() > 1e-3


def test_sd3_skip_layer_guidance_keeps_each_prompts_concept(tmp_path):
    """SD3's skip-layer guidance adds a third transformer call holding only the conditional half."""
    pipe = tiny_sd3()
    random_share(pipe, tmp_path / "s.safetensors")
    pipe.load_share(tmp_path / "s.safetensors")
    kw = {"num_images_per_prompt": 2, "guidance_scale": 5.0, "skip_guidance_layers": [0], "skip_layer_guidance_stop": 1.0}
    pipe.set_share_concepts(["cat", "dog"])
    batch = generate(pipe, ["a cat", "a dog"], **kw)
    separate = []
    for i, selection in enumerate(["cat", "dog"]):
        pipe.set_share_concepts(selection)
        separate.append(generate(pipe, ["a cat", "a dog"][i], seed=2 * i, **kw))
    torch.testing.assert_close(batch, torch.cat(separate), atol=1e-5, rtol=0)
    assert (generate(pipe, "a dog", seed=2, **{**kw, "skip_guidance_layers": None}) - separate[1]).abs().max() > 1e-4


def test_per_call_selection_and_scale_through_joint_attention_kwargs(tmp_path):
    pipe = tiny_flux()
    base = generate(pipe)
    random_share(pipe, tmp_path / "s.safetensors")
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts("cat")
    cat = generate(pipe)
    torch.testing.assert_close(generate(pipe, joint_attention_kwargs={"scale": 0.0}), base, atol=1e-6, rtol=0)  # text encoder too
    pipe.set_share_concepts("dog")
    with pytest.warns(UserWarning, match="text encoders use the selection of set_share_concepts"):
        per_call = generate(pipe, joint_attention_kwargs={"share": "cat"})
    pipe.set_share_concepts("dog")
    dog = generate(pipe)
    assert (per_call - cat).abs().max() > 1e-4 and (per_call - dog).abs().max() > 1e-4  # transformer cat, CLIP dog
    pipe.unload_share()
    random_share(pipe, tmp_path / "t.safetensors", components=["transformer"])
    pipe.load_share(tmp_path / "t.safetensors")
    pipe.set_share_concepts("cat")
    cat = generate(pipe)
    pipe.set_share_concepts("dog")
    torch.testing.assert_close(generate(pipe, joint_attention_kwargs={"share": "cat"}), cat, atol=1e-6, rtol=0)
    assert (generate(pipe) - cat).abs().max() > 1e-3  # the pipeline's own selection is back


def test_a_concept_exported_as_a_lora_gives_the_same_images(pipe, tmp_path):
    """Transformer and CLIP layers (Flux's flattened CLIPTextModel, SD3's two encoders with projection);
    T5 layers, which Diffusers' LoRA loaders do not read, are refused rather than dropped."""
    random_share(pipe, tmp_path / "t5.safetensors")
    with pytest.raises(ValueError, match=f"T5 text encoder \\({t5_component(pipe)}\\).*silently lose"):
        share_to_lora(tmp_path / "t5.safetensors", "cat", tmp_path / "lora.safetensors")
    assert not (tmp_path / "lora.safetensors").exists()
    random_share(pipe, tmp_path / "s.safetensors", components=["transformer", *clip_components(pipe)])
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts({"cat": 0.5, "owl": 0.5})
    share = generate(pipe)
    pipe.unload_share()
    base = generate(pipe)
    share_to_lora(tmp_path / "s.safetensors", {"cat": 0.5, "owl": 0.5}, tmp_path / "lora.safetensors")
    pipe.load_lora_weights(tmp_path / "lora.safetensors")
    assert set(pipe.get_list_adapters()) == {"transformer", *clip_components(pipe)}
    assert (generate(pipe) - share).abs().max() <= 1e-4 and (share - base).abs().max() > 1e-2


def test_fuse_then_unfuse_restores_every_weight_bit_exactly(pipe, tmp_path):
    random_share(pipe, tmp_path / "s.safetensors")
    components = ["transformer", *clip_components(pipe), t5_component(pipe)]
    before = {(c, k): v.clone() for c in components for k, v in getattr(pipe, c).state_dict().items()}
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts({"cat": 0.6, "dog": 0.6})
    unfused = generate(pipe)
    pipe.fuse_share()
    assert any(not torch.equal(pipe.transformer.state_dict()[k], before["transformer", k]) for k in pipe.transformer.state_dict())
    torch.testing.assert_close(generate(pipe), unfused, atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError, match="unfuse_share"):
        pipe.set_share_concepts("owl")
    pipe.unfuse_share()
    assert all(torch.equal(v, getattr(pipe, c).state_dict()[k]) for (c, k), v in before.items())
    torch.testing.assert_close(generate(pipe), unfused, atol=0, rtol=0)


def _peft_lora(pipe, path, rank=4, seed=1, targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp")):
    """A random LoRA on the pipeline's transformer, saved the Diffusers way (``save_lora_weights``)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in find_targets(pipe.transformer, "transformer").items():
        if name.endswith(tuple("." + t for t in targets)):
            n, d = base_linear(module).weight.shape
            layers[f"{name}.lora_A.weight"] = torch.randn(rank, d, generator=g) * 0.3
            layers[f"{name}.lora_B.weight"] = torch.randn(n, rank, generator=g) * 0.3
    type(pipe).save_lora_weights(path, transformer_lora_layers=layers)
    return path / "pytorch_lora_weights.safetensors"


def test_a_peft_lora_loaded_by_load_lora_weights_stacks_with_share(pipe, tmp_path):
    random_share(pipe, tmp_path / "s.safetensors")
    lora = _peft_lora(pipe, tmp_path)
    base = generate(pipe)
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts("cat")
    share_only = generate(pipe)
    pipe.load_lora_weights(lora)
    both = generate(pipe)
    pipe.set_share_concepts(None)
    lora_only = generate(pipe)
    for a, b in [(both, share_only), (both, lora_only), (lora_only, base), (share_only, base)]:
        assert (a - b).abs().max() > 1e-3
    pipe.unload_lora_weights()
    pipe.set_share_concepts("cat")
    torch.testing.assert_close(generate(pipe), share_only, atol=1e-6, rtol=0)


def test_fused_qkv_projections_are_refused_not_ignored(pipe, tmp_path):
    random_share(pipe, tmp_path / "s.safetensors")
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts("cat")
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(RuntimeError, match="fused QKV"):
        generate(pipe)
    pipe.unload_share()
    with pytest.raises(ValueError, match="fused QKV"):
        pipe.load_share(tmp_path / "s.safetensors")


def test_a_file_for_the_other_kind_of_model_is_refused_naming_the_mismatch(tmp_path):
    sd, sd3, flux = tiny_sd(), tiny_sd3(), tiny_flux()
    for p, name in [(sd, "sd"), (sd3, "sd3"), (flux, "flux")]:
        random_share(p, tmp_path / f"{name}.safetensors")
    with pytest.raises(ShareFileError, match=r"another kind of base model: it adapts the unet \(a UNet pipeline.*transformer"):
        flux.load_share(tmp_path / "sd.safetensors")
    with pytest.raises(ShareFileError, match=r"adapts the transformer \(a transformer pipeline: SD3, Flux\).*unet"):
        sd.load_share(tmp_path / "flux.safetensors")
    with pytest.raises(ShareFileError, match="made for another base model: 29 of its 50 layers do not match"):
        sd3.load_share(tmp_path / "flux.safetensors")
    assert not any(hasattr(m, "share_adapter") for p in (sd, sd3, flux) for m in p.components.values())


# ----------------------------------------------------------------------------- Flux LoRAs in the wild


def _factors(g, n, d, r=2, scale=0.3):
    return torch.randn(n, r, generator=g) * scale, torch.randn(r, d, generator=g) * scale  # up (B), down (A)


def flux_lora(style: str, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA for `tiny_flux` in one of the key styles found in the wild (fused qkv where the style fuses it)."""
    g, sd = torch.Generator().manual_seed(seed), {}
    if style == "peft":  # Diffusers' train_dreambooth_lora_flux.py / ai-toolkit
        for name, (n, d) in [("transformer_blocks.0.attn.to_q", (32, 32)), ("transformer_blocks.1.attn.to_add_out", (32, 32)),
                             ("transformer_blocks.0.ff.net.2", (32, 128)), ("single_transformer_blocks.1.proj_mlp", (128, 32)),
                             ("single_transformer_blocks.0.proj_out", (32, 160))]:
            sd[f"transformer.{name}.lora_B.weight"], sd[f"transformer.{name}.lora_A.weight"] = _factors(g, n, d)
    elif style == "kohya":  # sd-scripts: fused qkv, alpha beside each layer
        for name, (n, d) in [("double_blocks_0_img_attn_qkv", (96, 32)), ("double_blocks_1_txt_attn_qkv", (96, 32)),
                             ("double_blocks_0_img_attn_proj", (32, 32)), ("double_blocks_1_txt_mlp_0", (128, 32)),
                             ("single_blocks_1_linear2", (32, 160))]:
            sd[f"lora_unet_{name}.lora_up.weight"], sd[f"lora_unet_{name}.lora_down.weight"] = _factors(g, n, d, r=4)
            sd[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)  # scale alpha / r = 0.5
    elif style == "comfyui":  # kohya's keys under BFL's module names
        for name, (n, d) in [("double_blocks.1.img_attn.qkv", (96, 32)), ("double_blocks.0.txt_attn.proj", (32, 32))]:
            sd[f"diffusion_model.{name}.lora_up.weight"], sd[f"diffusion_model.{name}.lora_down.weight"] = _factors(g, n, d)
            sd[f"diffusion_model.{name}.alpha"] = torch.tensor(4.0)
    elif style == "xlabs":  # XLabs-AI: processor LoRAs on the double blocks
        for name, (n, d) in [("0.processor.qkv_lora1", (96, 32)), ("1.processor.qkv_lora2", (96, 32)),
                             ("0.processor.proj_lora2", (32, 32))]:
            sd[f"double_blocks.{name}.up.weight"], sd[f"double_blocks.{name}.down.weight"] = _factors(g, n, d)
    return sd


def test_flux_loras_in_four_key_styles_fold_in_and_give_the_loras_images(tmp_path):
    styles = ["peft", "kohya", "comfyui", "xlabs"]
    files = []
    for i, style in enumerate(styles):
        save_file(flux_lora(style, seed=i), tmp_path / f"{style}.safetensors")
        files.append(tmp_path / f"{style}.safetensors")
    report = loras_to_share(files, tmp_path / "share.safetensors", names=styles, basis_rank=64)
    assert all(report[s]["overall"] < 1e-5 for s in styles)  # k holds every LoRA: lossless
    state, _ = read_share(tmp_path / "share.safetensors")
    assert "transformer.transformer_blocks.0.attn.to_k" in state.layers  # kohya's and XLabs' fused qkv, split

    pipe = tiny_flux()
    base = generate(pipe)
    pipe.load_share(tmp_path / "share.safetensors")
    for style, file in zip(styles, files):
        pipe.set_share_concepts(style)
        share = generate(pipe)
        pipe.load_lora_weights(file)  # Diffusers' own reading of the same file, on the base model
        pipe.set_share_concepts(None)
        lora = generate(pipe)
        pipe.unload_lora_weights()
        assert (lora - base).abs().max() > 1e-2, style
        assert (share - lora).abs().max() <= 1e-3, style
    # BFL's names with PEFT's lora_A/B: Diffusers has no converter, so it is refused, not misread
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 32),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(96, 2)}, tmp_path / "bfl.safetensors")
    with pytest.raises(ShareFileError, match="Flux LoRA layout that Diffusers' FluxLoraLoaderMixin does not convert"):
        loras_to_share([tmp_path / "bfl.safetensors"], tmp_path / "no.safetensors")
    # a T5 part (ComfyUI's text_encoders.t5xxl, kohya's lora_te3_), which Diffusers' converter filters out: refused, not dropped
    for key in ("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q", "lora_te3_encoder_block_0_layer_0_SelfAttention_q"):
        t5 = {**flux_lora("comfyui", seed=0), f"{key}.lora_up.weight": torch.ones(32, 2), f"{key}.lora_down.weight": torch.ones(2, 32)}
        save_file(t5, tmp_path / "t5.safetensors")
        with pytest.raises(ShareFileError, match="LoRA layers for the T5 text encoder.*drop"):
            loras_to_share([tmp_path / "t5.safetensors"], tmp_path / "no.safetensors")
    assert not (tmp_path / "no.safetensors").exists()


def _peft_deltas(pipe) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA layer ``load_lora_weights`` put on the transformer (its scaling included)."""
    from peft.tuners.lora import LoraLayer

    return {f"transformer.{name}": module.get_delta_weight(module.active_adapters[0]).detach()
            for name, module in pipe.transformer.named_modules() if isinstance(module, LoraLayer)}


def test_the_reported_reconstruction_error_is_the_measured_one_and_exports_load_back(tmp_path, capsys):
    """A basis too small for two kohya LoRAs: the error ``compress_loras.py`` prints is the error against the
    ΔW Diffusers loads from the same file; ``share_to_lora`` writes a LoRA that ``load_lora_weights`` gives back exactly."""
    files = []
    for i in range(2):
        save_file(flux_lora("kohya", seed=10 + i), tmp_path / f"k{i}.safetensors")
        files.append(tmp_path / f"k{i}.safetensors")
    compress_loras = runpy.run_path(str(Path(__file__).parents[1] / "train" / "compress_loras.py"))["main"]  # in-process
    compress_loras([*map(str, files), "--output", str(tmp_path / "share.safetensors"), "--basis_rank", "5"])
    out = capsys.readouterr().out
    printed = dict(re.findall(r"^(k\d)\s+([0-9.]+)$", out, re.M))
    state, _ = read_share(tmp_path / "share.safetensors")
    pipe = tiny_flux()
    for name, file in zip(["k0", "k1"], files):
        pipe.load_lora_weights(file)
        want = _peft_deltas(pipe)
        pipe.unload_lora_weights()
        err = sum((state.delta(layer, {name: 1.0}) - dw).norm() ** 2 for layer, dw in want.items()) ** 0.5
        measured = float(err / sum(dw.norm() ** 2 for dw in want.values()) ** 0.5)
        assert measured > 0.05 and abs(float(printed[name]) - measured) <= 6e-5, (name, printed, measured)  # printed to 4 decimals

    pipe.load_share(tmp_path / "share.safetensors")
    pipe.set_share_concepts({"k0": 0.7, "k1": 0.5})
    share = generate(pipe)
    pipe.unload_share()
    share_to_lora(tmp_path / "share.safetensors", {"k0": 0.7, "k1": 0.5}, tmp_path / "exported.safetensors")
    pipe.load_lora_weights(tmp_path / "exported.safetensors")
    assert (generate(pipe) - share).abs().max() <= 1e-4


def test_an_sd3_lora_folds_in_and_exports_back(tmp_path):
    pipe = tiny_sd3()
    lora = _peft_lora(pipe, tmp_path, targets=("to_q", "add_k_proj", "to_add_out", "ff_context.net.2"))
    base = generate(pipe)
    pipe.load_lora_weights(lora)
    with_lora = generate(pipe)
    pipe.unload_lora_weights()
    report = loras_to_share([lora], tmp_path / "share.safetensors", names=["l"], basis_rank=16)
    assert report["l"]["overall"] < 1e-5 and (with_lora - base).abs().max() > 1e-2
    pipe.load_share(tmp_path / "share.safetensors")
    pipe.set_share_concepts("l")
    assert (generate(pipe) - with_lora).abs().max() <= 1e-3
    pipe.unload_share()
    share_to_lora(tmp_path / "share.safetensors", "l", tmp_path / "back.safetensors")
    pipe.load_lora_weights(tmp_path / "back.safetensors")
    assert (generate(pipe) - with_lora).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- learn_concept.py


@pytest.mark.parametrize("name", list(BUILDERS))
def test_learn_concept_trains_30_steps_and_load_share_reads_the_file(name, tmp_path):
    """Flow matching (Flux: packed latents, guidance embedding) lowers the held-out loss, with the
    post-merge fine-tune after it; the file it writes loads on the pipeline. With --train_t5 (Flux) the
    T5 encoder's attention is adapted too and changes the prompt embeddings under the concept. SD3's
    last block never reads its context queries, so that layer learns nothing (k = 0 there): the file
    must still load and generate."""
    BUILDERS[name]().save_pretrained(tmp_path / "base")
    concept = sorted((Path(__file__).parents[1] / "assets" / "concepts").glob("*/concept.json"))[0].parent
    (tmp_path / "heldout").mkdir()
    for image in sorted((concept / "heldout").glob("*.png"))[:2]:
        (tmp_path / "heldout" / image.name).write_bytes(image.read_bytes())
    script = runpy.run_path(str(Path(__file__).parents[1] / "train" / "learn_concept.py"))
    report = script["main"](script["parse_args"]([
        "--pretrained_model_name_or_path", str(tmp_path / "base"), "--instance_data_dir", str(concept / "train"),
        "--heldout_data_dir", str(tmp_path / "heldout"), "--share_path", str(tmp_path / "share.safetensors"),
        "--output_dir", str(tmp_path / "run"), "--max_train_steps", "30", "--train_batch_size", "2", "--learning_rate", "1e-2",
        "--resolution", "32", "--max_sequence_length", "16", "--num_validation_images", "1", "--report_to", "none",
        "--finetune_after_merge_steps", "5", *(["--train_t5"] if name == "flux" else []),
    ]))
    entry = report["concepts"][concept.name]
    assert entry["heldout_loss_before"] < 0.97 * entry["heldout_loss_base"] and entry["merge_error"] < 1e-5
    pipe = type(BUILDERS[name]()).from_pretrained(tmp_path / "base")
    pipe.set_progress_bar_config(disable=True)
    base = generate(pipe)
    pipe.load_share(tmp_path / "share.safetensors")
    assert pipe.share_concepts[0].name == concept.name and hasattr(pipe.transformer, "share_adapter")
    pipe.set_share_concepts(concept.name)
    assert (generate(pipe) - base).abs().max() > 1e-3
    t5_layers = [layer for layer in read_share(tmp_path / "share.safetensors")[0].shapes if layer.startswith("text_encoder_2.")]
    if name == "flux":
        assert len(t5_layers) == 8 and all(".SelfAttention." in layer for layer in t5_layers)
        ids = torch.randint(0, 200, (1, 16))
        with torch.no_grad():
            adapted = pipe.text_encoder_2(ids)[0]
            pipe.set_share_concepts(None)
            assert (pipe.text_encoder_2(ids)[0] - adapted).abs().max() > 1e-4
    else:
        assert not t5_layers


@pytest.mark.parametrize("name", list(BUILDERS))
def test_pre_computed_embeddings_learn_the_same_concept_and_validation_images_go_image_to_image(name, tmp_path):
    """--pre_compute_text_embeddings encodes through every encoder (CLIP and T5) once and moves them off
    the accelerator: the concept learned is the one learned without it. --validation_images gives one
    image-to-image result per image (SD3's and Flux's img2img siblings, at the trained size). Their two
    tokenizers leave --tokenizer_name nothing to replace: it is refused."""
    BUILDERS[name]().save_pretrained(tmp_path / "base")
    concept = sorted((Path(__file__).parents[1] / "assets" / "concepts").glob("*/concept.json"))[0].parent
    starts = [str(p) for p in sorted((concept / "heldout").glob("*.png"))[:2]]
    script = runpy.run_path(str(Path(__file__).parents[1] / "train" / "learn_concept.py"))

    def learn(run, *extra):
        return script["main"](script["parse_args"]([
            "--pretrained_model_name_or_path", str(tmp_path / "base"), "--instance_data_dir", str(concept / "train"),
            "--share_path", str(tmp_path / run / "share.safetensors"), "--output_dir", str(tmp_path / run),
            "--max_train_steps", "8", "--train_batch_size", "2", "--learning_rate", "1e-2", "--resolution", "32",
            "--max_sequence_length", "16", "--num_validation_images", "1", "--report_to", "none",
            "--finetune_after_merge_steps", "0", *extra]))

    with pytest.raises(SystemExit, match="--tokenizer_name replaces the one tokenizer of a UNet pipeline"):
        learn("refused", "--tokenizer_name", str(tmp_path / "base" / "tokenizer"))
    assert not (tmp_path / "refused" / "share.safetensors").exists()
    learn("plain")
    learn("pre", "--pre_compute_text_embeddings", "--validation_images", *starts)
    files = {run: tmp_path / run / "share.safetensors" for run in ("plain", "pre")}
    plain, pre = read_share(files["plain"])[0], read_share(files["pre"])[0]
    assert plain.shapes.keys() == pre.shapes.keys()
    for layer in plain.shapes:
        torch.testing.assert_close(pre.delta(layer, {concept.name: 1.0}), plain.delta(layer, {concept.name: 1.0}),
                                   rtol=1e-4, atol=1e-6)
    outputs = sorted((tmp_path / "pre").glob("validation_*.png"))
    assert len(outputs) == len(starts) and all(Image.open(p).size == (32, 32) for p in outputs)
