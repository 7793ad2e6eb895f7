"""LoRA files in every common key style → one Share file → back to standard Diffusers LoRA files."""

import json

import pytest
import torch
from safetensors.torch import save_file

import share_diffusers  # noqa: F401
from share_diffusers import loras_to_share, read_lora, read_share, share_to_lora
from share_diffusers.targets import pipeline_shapes
from share_lab.tiny_pipelines import tiny_sd


def random_lora(shapes, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return {l: (torch.randn(n, rank, generator=g) * 0.3, torch.randn(rank, d, generator=g) * 0.3) for l, (n, d) in shapes.items()}


def write(style, lora, path, alpha=None):
    """Write ``{layer: (up n×r, down r×d)}`` as a LoRA file in one of the styles people have."""
    tensors, meta = {}, {"format": "pt"}
    rank = next(iter(lora.values()))[0].shape[1]
    for layer, (up, down) in lora.items():
        component, _, module = layer.partition(".")
        te_module = "text_model." + module
        if style == "diffusers":
            if component == "unet":
                tensors[f"unet.{module}.lora.down.weight"], tensors[f"unet.{module}.lora.up.weight"] = down, up
            else:
                tensors[f"{component}.{te_module}.lora_linear_layer.down.weight"] = down
                tensors[f"{component}.{te_module}.lora_linear_layer.up.weight"] = up
        elif style == "peft_metadata":
            tensors[f"{component}.{module}.lora_A.weight"], tensors[f"{component}.{module}.lora_B.weight"] = down, up
        elif style == "kohya":
            prefix = "lora_unet_" + module if component == "unet" else "lora_te_" + te_module
            key = prefix.replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
        elif style == "peft_folder":
            tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"] = down, up
    if style == "peft_metadata":
        cfg = {f"{c}.{k}": v for c in ("unet", "text_encoder") for k, v in {"r": rank, "lora_alpha": alpha}.items()}
        meta["lora_adapter_metadata"] = json.dumps(cfg)
    if style == "peft_folder":
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": alpha, "peft_type": "LORA"}))
        path = path / "adapter_model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)


STYLES = [("diffusers", None, 2), ("peft_metadata", 8, 4), ("kohya", 3, 3), ("peft_folder", 1, 2), ("diffusers", None, 1)]


@pytest.fixture
def loras(tmp_path):
    pipe = tiny_sd()
    shapes = pipeline_shapes(pipe)
    files, truth = [], []
    for i, (style, alpha, rank) in enumerate(STYLES):
        use = shapes if style != "peft_folder" else {k: v for k, v in shapes.items() if k.startswith("unet.")}
        lora = random_lora(use, rank, seed=i)
        path = tmp_path / (f"lora{i}" if style == "peft_folder" else f"lora{i}.safetensors")
        write(style, lora, path, alpha)
        scale = 1.0 if alpha is None else alpha / rank
        files.append(path)
        truth.append({l: up @ down * scale for l, (up, down) in lora.items()})
    return pipe, files, truth


def test_every_key_style_reads_back_the_scaled_delta(loras):
    _, files, truth = loras
    for path, expected in zip(files, truth):
        factors = read_lora(path)
        assert set(factors) == set(expected), path
        for layer, (B, A) in factors.items():
            torch.testing.assert_close(B @ A.mT, expected[layer], atol=1e-5, rtol=1e-5)


def test_loras_to_share_then_share_to_lora_round_trips_through_load_lora_weights(loras, tmp_path):
    pipe, files, truth = loras
    names = [f"concept{i}" for i in range(len(files))]
    report = loras_to_share(files, tmp_path / "all.safetensors", names=names, basis_rank=64, shapes=pipeline_shapes(pipe))
    for name in names:  # k = 64 holds every rank-≤4 LoRA of these small layers exactly
        assert report[name]["overall"] < 1e-5
    state, _ = read_share(tmp_path / "all.safetensors")
    for name, expected in zip(names, truth):
        for layer, delta in expected.items():
            torch.testing.assert_close(state.delta(layer, {name: 1.0}), delta, atol=1e-5, rtol=1e-4)

    ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    sample, ehs = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 24, generator=g)
    for name in names:
        share_to_lora(tmp_path / "all.safetensors", name, tmp_path / f"{name}.safetensors")
        pipe.load_share(tmp_path / "all.safetensors")
        pipe.set_share_concepts(name)
        with torch.no_grad():
            want = pipe.unet(sample, 10, ehs).sample, pipe.text_encoder(ids).last_hidden_state
        pipe.unload_share()
        pipe.load_lora_weights(tmp_path / f"{name}.safetensors", adapter_name=name)
        with torch.no_grad():
            got = pipe.unet(sample, 10, ehs).sample, pipe.text_encoder(ids).last_hidden_state
        pipe.unload_lora_weights()
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, atol=5e-5, rtol=1e-5)


def test_compression_reports_the_reconstruction_error_and_exports_mixes(loras, tmp_path):
    pipe, files, truth = loras
    report = loras_to_share(files, tmp_path / "small.safetensors", basis_rank=3)
    state, header = read_share(tmp_path / "small.safetensors")
    for name, expected in zip(state.names, truth):
        num = sum(((state.delta(l, {name: 1.0}) - d) ** 2).sum() for l, d in expected.items())
        den = sum((d**2).sum() for d in expected.values())
        assert report[name]["overall"] == pytest.approx((num / den).sqrt().item(), rel=1e-3)
        assert report[name]["overall"] > 0.05
    mix = {state.names[0]: 0.5, state.names[2]: 2.0}
    share_to_lora(tmp_path / "small.safetensors", mix, tmp_path / "mix.safetensors")
    exported = read_lora(tmp_path / "mix.safetensors")
    for layer, (B, A) in exported.items():
        torch.testing.assert_close(B @ A.mT, state.delta(layer, mix), atol=1e-5, rtol=1e-4)


def test_bad_lora_inputs_name_the_problem(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors LoRA"):
        read_lora(tmp_path / "junk.safetensors")
    conv_in = {"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.zeros(4, 2, 1, 1)}
    save_file(conv_in, tmp_path / "conv.safetensors")  # a 3×3 convolution is held: ΔW maps each 4×3×3 input patch
    assert {k: (B.shape, A.shape) for k, (B, A) in read_lora(tmp_path / "conv.safetensors").items()} == {
        "unet.conv_in": ((4, 2), (36, 2))}
    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(ValueError, match=r"empty.safetensors: no LoRA layers were found"):
        read_lora(tmp_path / "empty.safetensors")
    with pytest.raises(FileNotFoundError):
        read_lora(tmp_path / "nothing.safetensors")


def test_loras_from_state_dicts_and_an_offline_hub_repo(loras, tmp_path, monkeypatch):
    """Before: only local paths. A state dict (as ``load_lora_weights`` takes) and a Hub repo id
    (``weight_name=``, ``revision=``, through huggingface_hub's cache with HF_HUB_OFFLINE) fold the same."""
    import huggingface_hub.constants as constants
    from safetensors.torch import load_file

    from share_lab.tiny_pipelines import fake_hub_repo

    pipe, files, truth = loras
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub_repo(tmp_path / "hub", "someone/kohya-lora", {"pytorch_lora_weights.safetensors": files[2]})
    fake_hub_repo(tmp_path / "hub", "someone/two", {"old.safetensors": files[0], "pytorch_lora_weights.safetensors": files[4]}, revision="v1")
    fake_hub_repo(tmp_path / "hub", "someone/peft-adapter", {".": files[3]})  # adapter_model.safetensors + adapter_config.json
    sources = [load_file(files[0]), "someone/kohya-lora", load_file(files[3] / "adapter_model.safetensors")]
    with pytest.raises(ValueError, match="pass names="):
        loras_to_share(sources, tmp_path / "s.safetensors")
    report = loras_to_share(sources, tmp_path / "s.safetensors", names=["sd", "hub", "peft"], shapes=pipeline_shapes(pipe))
    state, header = read_share(tmp_path / "s.safetensors")
    assert [c["source"] for c in header["concepts"]] == ["<LoRA state dict>", "someone/kohya-lora", "<LoRA state dict>"]
    # (a PEFT state dict without its adapter_config has no alpha: scale 1, as in load_lora_weights)
    for name, expected, scale in (("sd", truth[0], 1.0), ("hub", truth[2], 1.0), ("peft", truth[3], 1 / 0.5)):
        assert report[name]["overall"] < 1e-5
        for layer, delta in expected.items():
            torch.testing.assert_close(state.delta(layer, {name: 1.0}), delta * scale, atol=1e-5, rtol=1e-4)
    for layer, (B, A) in read_lora("someone/peft-adapter").items():  # its adapter_config's alpha honoured
        torch.testing.assert_close(B @ A.mT, truth[3][layer], atol=1e-5, rtol=1e-5)
    factors = read_lora("someone/two", weight_name="old.safetensors", revision="v1")
    for layer, (B, A) in factors.items():
        torch.testing.assert_close(B @ A.mT, truth[0][layer], atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="someone/absent has neither pytorch_lora_weights.safetensors nor a PEFT adapter"):
        read_lora("someone/absent")
    with pytest.raises(FileNotFoundError, match="'nope.safetensors' of the Hub repo someone/two.*HF_HUB_OFFLINE"):
        read_lora("someone/two", weight_name="nope.safetensors")
    with pytest.raises(TypeError, match="maps key names to tensors"):
        read_lora({"unet.a.lora_A.weight": [1.0]})


def _wild_kohya_lora(pipe, rank=2, alpha=1.0, seed=0):
    """A kohya LoRA as trainers write them by default: attention, proj_in/proj_out (1×1 convs here),
    feed-forward and text-encoder MLP layers. Returns the state dict and every layer's true ΔW."""
    g = torch.Generator().manual_seed(seed)
    tensors, truth = {}, {}
    leaves = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
    modules = [("unet", n, m) for n, m in pipe.unet.named_modules() if n.endswith(leaves)]
    text_leaves = ("q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1", "mlp.fc2")
    modules += [("text_encoder", n, m) for n, m in pipe.text_encoder.named_modules() if n.endswith(text_leaves)]
    for component, name, module in modules:
        n, d = module.weight.shape[:2]
        conv = module.weight.ndim == 4
        up, down = torch.randn(n, rank, generator=g) * 0.2, torch.randn(rank, d, generator=g) * 0.2
        key = ("lora_unet_" + name if component == "unet" else "lora_te_text_model_" + name).replace(".", "_")
        tensors[f"{key}.lora_up.weight"] = up[..., None, None] if conv else up
        tensors[f"{key}.lora_down.weight"] = down[..., None, None] if conv else down
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
        truth[f"{component}.{name}"] = up @ down * (alpha / rank)
    return tensors, truth


def _images(pipe, **kw):
    return pipe("a cat", generator=torch.Generator().manual_seed(0), num_inference_steps=3, guidance_scale=5.0, output_type="np", **kw).images


def _share_fused_and_exported_give(pipe, share, concept: str, want) -> None:
    """The concept from its Share file, fused, and exported in both LoRA layouts draws ``want`` (within 1e-3)."""
    pipe.load_share(share)
    pipe.set_share_concepts(concept)
    assert abs(_images(pipe) - want).max() < 1e-3
    pipe.fuse_share()
    assert abs(_images(pipe) - want).max() < 1e-3
    pipe.unfuse_share()
    pipe.unload_share()
    for fmt in ("diffusers", "kohya"):
        share_to_lora(share, concept, share.parent / f"{fmt}.safetensors", format=fmt)
        pipe.load_lora_weights(share.parent / f"{fmt}.safetensors")
        assert abs(_images(pipe) - want).max() < 1e-3, fmt
        pipe.unload_lora_weights()


def test_a_kohya_lora_on_attention_proj_feed_forward_and_text_mlp_is_held_whole(tmp_path):
    """Before: proj_in/proj_out, feed-forward and text-encoder MLP layers were dropped with a warning while the
    report said ~1e-8 (images 0.155 off). Now every layer is held: the images are the LoRA's (Diffusers' own
    kohya loader), the reported error is the measured one, and the exports load back to the same images."""
    pipe = tiny_sd()
    sd, truth = _wild_kohya_lora(pipe)
    save_file(sd, tmp_path / "wild.safetensors")
    report = loras_to_share([tmp_path / "wild.safetensors"], tmp_path / "s.safetensors", basis_rank=64)["wild"]
    state, header = read_share(tmp_path / "s.safetensors")
    assert set(state.layers) == set(truth)
    num = den = 0.0
    for layer, delta in truth.items():  # measured: every layer of the LoRA against what the Share file gives
        num, den = num + ((state.delta(layer, {"wild": 1.0}) - delta) ** 2).sum().item(), den + (delta**2).sum().item()
    assert report["overall"] == pytest.approx((num / den) ** 0.5, abs=1e-6) and report["overall"] < 1e-5
    convs = {l for l in truth if l.endswith(("proj_in", "proj_out"))}
    assert set(header["config"]["conv_layers"]) == convs  # 1×1 convolutions in this UNet

    base = _images(pipe)
    pipe.load_lora_weights(tmp_path / "wild.safetensors")
    lora = _images(pipe)
    pipe.unload_lora_weights()
    assert abs(lora - base).max() > 0.05  # the LoRA changes the images
    _share_fused_and_exported_give(pipe, tmp_path / "s.safetensors", "wild", lora)
    assert abs(_images(pipe) - base).max() == 0


def test_a_locon_lora_on_3x3_convolutions_is_held_whole_and_exports_back(tmp_path):
    """Before: a LoCon layer (a 3×3 resnet convolution) could not be held and was refused, or dropped and counted.
    Now it is held (its down factor maps each input patch): the images are the LoRA's (Diffusers' own kohya
    loader), the reported error is the measured one, and the file's conv_kernels make its exports 4-D again."""
    pipe = tiny_sd()
    sd, truth = _wild_kohya_lora(pipe)
    g = torch.Generator().manual_seed(1)
    for name in ("down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.0.conv2"):
        conv = pipe.unet.get_submodule(name)
        up, down = torch.randn(conv.out_channels, 2, 1, 1, generator=g) * 0.2, torch.randn(2, conv.in_channels, 3, 3, generator=g) * 0.2
        key = "lora_unet_" + name.replace(".", "_")
        sd |= {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(1.0)}
        truth[f"unet.{name}"] = up.flatten(1) @ down.flatten(1) * 0.5
    save_file(sd, tmp_path / "locon.safetensors")
    report = loras_to_share([tmp_path / "locon.safetensors"], tmp_path / "s.safetensors", basis_rank=64)["locon"]
    state, header = read_share(tmp_path / "s.safetensors")
    assert set(state.layers) == set(truth) and report["overall"] < 1e-5
    for layer in ("unet.down_blocks.0.resnets.0.conv1", "unet.up_blocks.1.resnets.0.conv2"):
        torch.testing.assert_close(state.delta(layer, {"locon": 1.0}), truth[layer], atol=1e-6, rtol=1e-5)
        assert header["config"]["conv_kernels"][layer] == [3, 3]

    base = _images(pipe)
    pipe.load_lora_weights(tmp_path / "locon.safetensors")
    lora = _images(pipe)
    pipe.unload_lora_weights()
    assert abs(lora - base).max() > 0.05
    _share_fused_and_exported_give(pipe, tmp_path / "s.safetensors", "locon", lora)


def test_dora_and_lycoris_files_are_refused_naming_the_format(tmp_path):
    """Before: a DoRA imported with its magnitudes silently dropped; a LoHa failed with Diffusers' 7,700-character error."""
    pipe = tiny_sd()
    sd, _ = _wild_kohya_lora(pipe)
    q = next(k for k in sd if k.endswith("to_q.lora_up.weight")).removesuffix(".lora_up.weight")
    cases = {
        "DoRA": {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32),
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 2),
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector": torch.ones(32)},
        "LoHa": {f"{q}.hada_w1_a": torch.zeros(32, 2), f"{q}.hada_w1_b": torch.zeros(2, 32), f"{q}.alpha": torch.tensor(1.0)},
        "LoKr": {f"{q}.lokr_w1": torch.zeros(4, 4), f"{q}.lokr_w2": torch.zeros(8, 8)},
    }
    for name, tensors in cases.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(share_diffusers.ShareFileError, match=rf"is a {name} .*not a plain LoRA") as info:
            loras_to_share([tmp_path / f"{name}.safetensors"], tmp_path / "s.safetensors")
        assert len(str(info.value)) < 400


@pytest.mark.parametrize("builder", ["tiny_sd", "tiny_sdxl"])
def test_a_kohya_export_loads_in_diffusers_with_the_images_of_the_peft_export(builder, tmp_path):
    """share_to_lora(format="kohya"): the keys A1111 / ComfyUI load, alpha and kohya metadata; Diffusers'
    kohya converter loads it to the same images as the Diffusers-layout export."""
    from safetensors import safe_open

    from share_lab import tiny_pipelines
    from share_lab.tiny_pipelines import random_share

    pipe = getattr(tiny_pipelines, builder)()
    random_share(pipe, tmp_path / "s.safetensors")
    mix = {"cat": 0.7, "owl": 0.5}
    share_to_lora(tmp_path / "s.safetensors", mix, tmp_path / "peft.safetensors")
    share_to_lora(tmp_path / "s.safetensors", mix, tmp_path / "kohya.safetensors", format="kohya")
    with safe_open(tmp_path / "kohya.safetensors", "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
        ranks = {k: f.get_tensor(k.replace(".alpha", ".lora_down.weight")).shape[0] for k in alphas}
    prefixes = ("lora_unet_", "lora_te1_", "lora_te2_") if builder == "tiny_sdxl" else ("lora_unet_", "lora_te_")
    assert all(k.startswith(prefixes) and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert {k.split("_")[1] for k in keys} == {p.split("_")[1] for p in prefixes}  # every component exported
    assert alphas == ranks and meta["ss_network_module"] == "networks.lora" and json.loads(meta["share_diffusers_concept"]) == mix
    images = {}
    for fmt in ("peft", "kohya"):
        pipe.load_lora_weights(tmp_path / f"{fmt}.safetensors", adapter_name=fmt)
        images[fmt] = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
        pipe.unload_lora_weights()
    base = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert (images["kohya"] - images["peft"]).abs().max() <= 1e-4 < (images["peft"] - base).abs().max()
    with pytest.raises(ValueError, match="format must be one of diffusers, kohya"):
        share_to_lora(tmp_path / "s.safetensors", "cat", tmp_path / "x.safetensors", format="a1111")
