"""`pipe.load_share` on tiny SD-1 and SDXL pipelines: exactness, per-prompt batches, fuse, errors."""

import copy

import pytest
import torch
from safetensors.torch import save_file

import share_diffusers  # noqa: F401  (installs pipe.load_share & co.)
from share_diffusers import ShareFileError
from share_diffusers.targets import LORA_EXTRA, PROJECTIONS, base_linear, lookup
from share_lab.tiny_pipelines import random_share, tiny_sd, tiny_sdxl

BUILDERS = {"sd": tiny_sd, "sdxl": tiny_sdxl}


def generate(pipe, prompt="a photo of a cat", seed=0, **kw):
    n = len(prompt) if isinstance(prompt, list) else 1
    n *= kw.get("num_images_per_prompt", 1)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    kw.setdefault("num_inference_steps", 2)
    if "xl" in type(pipe).__name__.lower():
        kw.setdefault("height", 32)
        kw.setdefault("width", 32)
    return pipe(prompt, generator=gens, output_type="pt", **kw).images


def unet_inputs(pipe, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    size = unet.config.sample_size
    kw = {}
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
    sample = torch.randn(batch, 4, size, size, generator=g)
    ehs = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)
    return (sample, torch.tensor(10), ehs), kw


def dense_copy(model, state, component, mix):
    """A copy of ``model`` with the dense ΔW of ``mix`` added to every adapted weight (1×1 convolutions too)."""
    model = copy.deepcopy(model)
    names = [layer.partition(".")[2] for layer in state.layers if layer.startswith(component + ".")]
    for name, module in lookup(model, component, names).items():
        with torch.no_grad():
            weight = base_linear(module).weight
            weight += state.delta(f"{component}.{name}", mix).float().view_as(weight)
    return model


@pytest.fixture(params=["sd", "sdxl"])
def pipe(request):
    return BUILDERS[request.param]()


def test_nothing_selected_and_unloaded_are_bit_identical_to_the_base(pipe, tmp_path):
    base = generate(pipe)
    random_share(pipe, tmp_path / "s.safetensors")
    pipe.load_share(tmp_path / "s.safetensors")
    assert torch.equal(generate(pipe), base)
    pipe.set_share_concepts("cat")
    assert not torch.equal(generate(pipe), base)
    pipe.unload_share()
    assert torch.equal(generate(pipe), base)
    assert not hasattr(pipe.unet, "share_adapter") and pipe.share_concepts == []


@pytest.mark.parametrize("mix", [{"dog": 1.0}, {"cat": 0.7, "owl": -0.4}])
def test_selection_equals_adding_the_dense_delta(pipe, tmp_path, mix):
    state = random_share(pipe, tmp_path / "s.safetensors")
    args, kw = unet_inputs(pipe)
    ids = torch.randint(0, 500, (2, 77))
    components = ["unet"] + [c for c in ("text_encoder", "text_encoder_2") if hasattr(pipe, c)]
    dense = {c: dense_copy(getattr(pipe, c), state, c, mix) for c in components}
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts(mix if len(mix) > 1 else next(iter(mix)))
    with torch.no_grad():
        assert (pipe.unet(*args, **kw).sample - dense["unet"](*args, **kw).sample).abs().max() <= 1e-5
        for c in components[1:]:
            got, want = getattr(pipe, c)(ids).last_hidden_state, dense[c](ids).last_hidden_state
            assert (got - want).abs().max() <= 1e-5


def test_every_layer_loras_adapt_is_exact_per_prompt_and_fuses_bit_exactly(pipe, tmp_path):
    """target_modules beyond attention: proj_in/proj_out (1×1 convolutions in SD-1's UNet, Linears in SDXL's),
    feed-forwards, text-encoder MLPs, and LoCon's 3×3 convolutions (the resnets' conv1/conv2, the strided
    down-sampler and the up-sampler). A selection equals the dense ΔW, a batch with a concept per prompt
    equals separate calls, and fuse / unfuse restores every weight bit-exactly."""
    texts = [c for c in ("text_encoder", "text_encoder_2") if hasattr(pipe, c)]
    unet = PROJECTIONS["unet"] + LORA_EXTRA["unet"] + ("conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv")
    targets = {"unet": unet} | dict.fromkeys(texts, ("self_attn.q_proj", "fc1", "fc2"))
    state = random_share(pipe, tmp_path / "s.safetensors", target_modules=targets)
    assert any(l.endswith("proj_in") for l in state.layers) and any(l.endswith("mlp.fc2") for l in state.layers)
    assert {l.rpartition(".")[2] for l in state.layers if l.startswith("unet.")} >= {"conv1", "conv2", "conv"}
    mix = {"cat": 0.7, "owl": -0.4}
    args, kw = unet_inputs(pipe)
    ids = torch.randint(0, 500, (2, 77))
    dense = {c: dense_copy(getattr(pipe, c), state, c, mix) for c in ["unet", *texts]}
    before = {k: v.clone() for c in ["unet", *texts] for k, v in getattr(pipe, c).state_dict().items()}
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts(mix)
    with torch.no_grad():
        assert (pipe.unet(*args, **kw).sample - dense["unet"](*args, **kw).sample).abs().max() <= 1e-5
        for c in texts:
            assert (getattr(pipe, c)(ids).last_hidden_state - dense[c](ids).last_hidden_state).abs().max() <= 1e-5
    pipe.set_share_concepts(["cat", mix])
    batch = generate(pipe, ["a cat", "an owl"], guidance_scale=5.0)
    separate = []
    for i, sel in enumerate(["cat", mix]):
        pipe.set_share_concepts(sel)
        separate.append(generate(pipe, ["a cat", "an owl"][i], seed=i, guidance_scale=5.0))
    torch.testing.assert_close(batch, torch.cat(separate), atol=1e-5, rtol=0)
    pipe.fuse_share()
    torch.testing.assert_close(generate(pipe, "an owl", seed=1, guidance_scale=5.0), separate[1], atol=1e-4, rtol=0)
    pipe.unfuse_share()
    after = {k: v for c in ["unet", *texts] for k, v in getattr(pipe, c).state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_a_concept_on_3x3_convolutions_exports_as_a_locon_that_diffusers_loads(tmp_path, fmt):
    """The resnets' conv1/conv2 (as LoCon adapts them) export 4-D (down r×in×3×3, up n×r×1×1, as the file's
    conv_kernels say) and load_lora_weights gives Share's images."""
    from share_diffusers import read_share, share_to_lora

    pipe = tiny_sd()
    random_share(pipe, tmp_path / "s.safetensors", components=["unet"], target_modules={"unet": PROJECTIONS["unet"] + ("conv1", "conv2")})
    assert read_share(tmp_path / "s.safetensors")[1]["config"]["conv_kernels"]["unet.down_blocks.0.resnets.0.conv1"] == [3, 3]
    base = generate(pipe)
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts({"cat": 0.6, "dog": 0.4})
    share = generate(pipe)
    pipe.unload_share()
    share_to_lora(tmp_path / "s.safetensors", {"cat": 0.6, "dog": 0.4}, tmp_path / "lora.safetensors", format=fmt)
    pipe.load_lora_weights(tmp_path / "lora.safetensors")
    assert (generate(pipe) - share).abs().max() <= 1e-4 and (share - base).abs().max() > 1e-2


def test_a_batch_of_different_concepts_equals_separate_calls(pipe, tmp_path):
    random_share(pipe, tmp_path / "s.safetensors")
    pipe.load_share(tmp_path / "s.safetensors")
    prompts = ["a cat", "a dog", "an owl"]
    selections = ["cat", {"dog": 0.5, "owl": 0.5}, None]
    pipe.set_share_concepts(selections)
    batch = generate(pipe, prompts, num_images_per_prompt=2, guidance_scale=5.0)
    separate = []
    for i, (prompt, sel) in enumerate(zip(prompts, selections)):
        pipe.set_share_concepts(sel)
        separate.append(generate(pipe, prompt, seed=2 * i, num_images_per_prompt=2, guidance_scale=5.0))
    torch.testing.assert_close(batch, torch.cat(separate), atol=1e-5, rtol=0)
    assert not torch.allclose(separate[0], separate[2], atol=1e-3)  # the concepts really differ


def test_per_call_selection_through_cross_attention_kwargs(tmp_path):
    pipe = tiny_sd()
    random_share(pipe, tmp_path / "s.safetensors", components=["unet"])
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts("cat")
    cat = generate(pipe)
    pipe.set_share_concepts("dog")
    per_call = generate(pipe, cross_attention_kwargs={"share": "cat"})
    torch.testing.assert_close(per_call, cat, atol=1e-6, rtol=0)
    assert not torch.allclose(generate(pipe), cat, atol=1e-4)  # the pipeline's own selection is back


def test_fuse_then_unfuse_restores_every_weight_bit_exactly(pipe, tmp_path):
    random_share(pipe, tmp_path / "s.safetensors")
    before = {k: v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts({"cat": 0.6, "dog": 0.6})
    unfused = generate(pipe)
    pipe.fuse_share()
    fused = generate(pipe)
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError, match="unfuse_share"):
        pipe.set_share_concepts("owl")
    pipe.unfuse_share()
    after = {k: v for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(generate(pipe), unfused, atol=0, rtol=0)


def test_peft_lora_and_share_both_take_effect(tmp_path):
    from peft import LoraConfig

    pipe = tiny_sd()
    random_share(pipe, tmp_path / "s.safetensors")
    # a PEFT LoRA on the same attention projections, saved and loaded the Diffusers way
    lora_unet = copy.deepcopy(pipe.unet)
    lora_unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian"))
    for name, prm in lora_unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(prm, std=0.2)
    from peft.utils import get_peft_model_state_dict

    type(pipe).save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(lora_unet))
    base = generate(pipe)
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts("cat")
    share_only = generate(pipe)
    pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    both = generate(pipe)
    pipe.set_share_concepts(None)
    lora_only = generate(pipe)
    for a, b in [(both, share_only), (both, lora_only), (lora_only, base), (share_only, base)]:
        assert (a - b).abs().max() > 1e-3
    # the two deltas add up: (both - lora_only) ≈ (share_only - base) to first order
    pipe.unload_lora_weights()
    pipe.set_share_concepts("cat")
    torch.testing.assert_close(generate(pipe), share_only, atol=1e-6, rtol=0)


def _snapshot(pipe):
    return {
        "processors": {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()},
        "adapter": hasattr(pipe.unet, "share_adapter"),
        "hooks": len(pipe.unet._forward_pre_hooks) + len(pipe.text_encoder._forward_pre_hooks),
        "concepts": [c.name for c in pipe.share_concepts],
    }


def test_bad_inputs_raise_clear_errors_and_leave_the_pipeline_alone(tmp_path):
    pipe = tiny_sd()
    good = tmp_path / "good.safetensors"
    random_share(pipe, good)
    pipe.load_share(good)
    pipe.set_share_concepts("cat")
    reference = generate(pipe)
    snapshot = _snapshot(pipe)

    other = tiny_sdxl()
    random_share(other, tmp_path / "xl.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    save_file({"basis.x.U": torch.zeros(2, 2)}, tmp_path / "nometa.safetensors")
    save_file({"unet.a.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    wrong_shapes = tmp_path / "wrong_shapes.safetensors"
    small = tiny_sd()
    small.unet = type(small.unet)(**{**small.unet.config, "cross_attention_dim": 16})
    random_share(small, wrong_shapes, components=["unet"])

    cases = [
        (tmp_path / "xl.safetensors", ShareFileError, "another base model"),
        (wrong_shapes, ShareFileError, r"\(32, 16\) in the file but \(32, 24\)"),
        (truncated, ShareFileError, "not a readable safetensors"),
        (tmp_path / "text.safetensors", ShareFileError, "not a readable safetensors"),
        (tmp_path / "nometa.safetensors", ShareFileError, "no 'share_diffusers' header"),
        (tmp_path / "lora.safetensors", ShareFileError, "is a LoRA file"),
        (tmp_path / "missing.safetensors", FileNotFoundError, "No Share file"),
        (123, TypeError, "path to a Share file"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            pipe.load_share(path)
        assert _snapshot(pipe) == snapshot, path
    for selection, error, message in [
        ("zebra", KeyError, "Unknown Share concept 'zebra'.*'cat', 'dog', 'owl'"),
        ({"cat": "1.0"}, TypeError, "weight of 'cat' must be a number"),
        ({"cat": True}, TypeError, "must be a number"),
        ({"cat": float("nan")}, ValueError, "weight of 'cat' must be a finite number"),
        ({"cat": float("inf")}, ValueError, "finite"),
        ({"cat": 1e30}, ValueError, "within ±1000"),
        (3.5, TypeError, "concept name"),
        ([], ValueError, "empty list"),
        (["cat", "zebra"], KeyError, "zebra"),
    ]:
        with pytest.raises(error, match=message):
            pipe.set_share_concepts(selection)
    assert _snapshot(pipe) == snapshot
    torch.testing.assert_close(generate(pipe), reference, atol=0, rtol=0)
    with pytest.raises(ValueError, match="3 entries"):
        pipe.set_share_concepts(["cat", "dog", "owl"])
        generate(pipe, ["a", "b"])


def test_replacing_the_processors_keeps_share_and_fused_qkv_is_reported_not_ignored(tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = tiny_sd()
    random_share(pipe, tmp_path / "s.safetensors")
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts("cat")
    cat = generate(pipe)
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # the delta lives on the projections, not the processor
    torch.testing.assert_close(generate(pipe), cat, atol=1e-6, rtol=0)
    pipe.unet.fuse_qkv_projections()
    with pytest.raises(RuntimeError, match="fused QKV"):
        generate(pipe)
    pipe.unload_share()
    with pytest.raises(ValueError, match="fused QKV"):
        pipe.load_share(tmp_path / "s.safetensors")
    assert not hasattr(pipe.unet, "share_adapter")


def test_install_never_overwrites_and_the_mixin_works(tmp_path):
    from diffusers import StableDiffusionPipeline

    from share_diffusers import ShareLoaderMixin, install

    class Custom(StableDiffusionPipeline):
        def load_share(self, *a):
            return "mine"

    with pytest.warns(UserWarning, match="already exists"):
        install(Custom)
    assert Custom.load_share(None) == "mine"
    assert install() == [
        "load_share", "set_share_concepts", "fuse_share", "unfuse_share", "unload_share", "get_active_share_concepts",
        "disable_share", "enable_share", "delete_share_concepts", "get_list_share_adapters", "share_concepts",
    ]

    class Mixed(StableDiffusionPipeline, ShareLoaderMixin):
        pass

    pipe = tiny_sd()
    mixed = Mixed(**pipe.components, requires_safety_checker=False)
    random_share(mixed, tmp_path / "s.safetensors")
    mixed.load_share(tmp_path / "s.safetensors")
    assert [(c.name, c.trigger) for c in mixed.share_concepts] == [("cat", "<cat>"), ("dog", "<dog>"), ("owl", "<owl>")]
