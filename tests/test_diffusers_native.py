"""Share composes with what Diffusers users do to a pipeline: both torch.compile idioms (and
fullgraph), compiling before load_share, ``AutoPipeline….from_pipe``, any stock attention processor."""

import random

import pytest
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import share_diffusers  # noqa: F401  (installs pipe.load_share & co.)
from share_lab.tiny_pipelines import random_share, tiny_sd, tiny_sdxl

NAMES = [f"c{i}" for i in range(6)]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate(pipe, prompt="a photo of a cat", seed=0, **kw):
    n = (len(prompt) if isinstance(prompt, list) else 1) * kw.get("num_images_per_prompt", 1)
    kw.setdefault("num_inference_steps", 2)
    return pipe(prompt, generator=[torch.Generator().manual_seed(seed + i) for i in range(n)], output_type="pt", **kw).images


def unet_args(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    return torch.randn(batch, 4, size, size, generator=g), torch.tensor(10), torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)


# ----------------------------------------------------------------------------- torch.compile


def _graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _selection(rng):
    """A random selection: a concept, a two-concept mix, or one per prompt (2 prompts)."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(NAMES)
    if kind == 1:
        return {rng.choice(NAMES): 0.6, rng.choice(NAMES): -0.3}
    return [rng.choice(NAMES), rng.choice([*NAMES, None, {NAMES[0]: 0.5, NAMES[1]: 0.5}])]


@pytest.mark.parametrize("idiom", ["unet.compile()", "torch.compile(unet)", "torch.compile(unet) before load_share", "fullgraph"])
def test_every_compile_idiom_switches_without_recompiling_and_matches_eager(idiom, tmp_path):
    """Whole pipeline calls with classifier-free guidance. Before this fix, torch.compile(unet) after
    load_share crashed (the UNet hook read the pipeline while Dynamo traced it) and compiling before
    load_share gave "made for another base model" (the compiled UNet's names start ``_orig_mod.``)."""
    import torch._dynamo

    torch._dynamo.reset()
    pipe = tiny_sd()
    random_share(pipe, tmp_path / "s.safetensors", names=NAMES, p=1)
    if idiom.endswith("before load_share"):
        pipe.unet = torch.compile(pipe.unet, backend="eager")
    pipe.load_share(tmp_path / "s.safetensors")
    if idiom == "unet.compile()":
        pipe.unet.compile(backend="eager")
    elif idiom == "torch.compile(unet)":
        pipe.unet = torch.compile(pipe.unet, backend="eager")
    elif idiom == "fullgraph":
        pipe.unet = torch.compile(pipe.unet, backend="eager", fullgraph=True)
    prompts, rng = ["a", "b"], random.Random(0)

    def run(selection):
        pipe.set_share_concepts(selection)
        return generate(pipe, prompts, num_inference_steps=1, guidance_scale=5.0)

    try:
        for warm in ("c0", ["c0", "c1"]):  # one graph for a selection for the batch, one for a per-prompt list
            run(warm)
        graphs = _graphs()
        for _ in range(100):
            run(_selection(rng))
        assert _graphs() == graphs  # 100 random switches: no recompilation
        for selection in ("c1", ["c2", {"c3": 0.5, "c4": 0.5}]):
            compiled = run(selection)
            with torch.compiler.set_stance("force_eager"):
                eager = run(selection)
            assert (compiled - eager).abs().max() <= 1e-4
        assert (run("c2")[0] - compiled[0]).abs().max() <= 1e-4  # the per-prompt list gave prompt 0 its concept
        assert (run("c2")[1] - compiled[1]).abs().max() > 1e-3  # and prompt 1 another
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- from_pipe


def test_from_pipe_shares_and_controls_the_same_share_state(tmp_path):
    pipe = tiny_sd()
    base = generate(pipe)
    random_share(pipe, tmp_path / "s.safetensors")
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts("cat")
    cat = generate(pipe)
    t2i = AutoPipelineForText2Image.from_pipe(pipe)
    i2i = AutoPipelineForImage2Image.from_pipe(pipe)
    for other in (t2i, i2i):  # before this fix: [], "no Share file is loaded", unload did nothing
        assert [c.name for c in other.share_concepts] == ["cat", "dog", "owl"]
    assert torch.equal(generate(t2i), cat)
    t2i.set_share_concepts("dog")  # one state: the source pipeline follows
    dog = generate(pipe)
    assert not torch.allclose(dog, cat, atol=1e-4) and torch.equal(generate(t2i), dog)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    i2i_dog = generate(i2i, image=image, strength=0.9, num_inference_steps=3)
    i2i.set_share_concepts(None)
    assert not torch.allclose(generate(i2i, image=image, strength=0.9, num_inference_steps=3), i2i_dog, atol=1e-4)
    i2i.load_share(tmp_path / "s.safetensors", adapter_name="default_0", hotswap=True)  # replaces the shared state
    i2i.unload_share()
    assert pipe.share_concepts == [] and t2i.share_concepts == []
    assert torch.equal(generate(pipe), base) and not hasattr(pipe.unet, "share_adapter")


def test_a_per_prompt_list_uses_the_guidance_of_the_pipeline_that_calls(tmp_path):
    pipe = tiny_sd()
    random_share(pipe, tmp_path / "s.safetensors")
    pipe.load_share(tmp_path / "s.safetensors")
    generate(pipe, guidance_scale=1.0)  # the source pipeline's last call had no classifier-free guidance
    other = AutoPipelineForText2Image.from_pipe(pipe)
    selections = ["cat", "owl"]
    other.set_share_concepts(selections)
    batch = generate(other, ["a", "b"], num_images_per_prompt=1, guidance_scale=5.0)
    for i, sel in enumerate(selections):  # before this fix: the batch was indexed as if without guidance
        other.set_share_concepts(sel)
        assert (batch[i] - generate(other, ["a", "b"][i], seed=i, guidance_scale=5.0)[0]).abs().max() <= 1e-5


def test_a_per_prompt_list_of_the_wrong_length_raises(tmp_path):
    pipe = tiny_sd()
    random_share(pipe, tmp_path / "s.safetensors", components=["unet"])
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts(["cat", "dog"])
    with pytest.raises(ValueError, match="2 entries, but the pipeline got 4 prompts"):  # was [cat, cat, dog, dog]
        generate(pipe, ["a", "b", "c", "d"])
    generate(pipe, ["a", "b"], num_images_per_prompt=2)  # images per prompt are not prompts


# ----------------------------------------------------------------------------- attention processors


PROCESSORS = {
    "AttnProcessor": lambda pipe: pipe.unet.set_attn_processor(AttnProcessor()),
    "AttnProcessor2_0": lambda pipe: pipe.unet.set_attn_processor(AttnProcessor2_0()),
    "enable_attention_slicing": lambda pipe: pipe.enable_attention_slicing(1),
}


@pytest.mark.parametrize("builder", [tiny_sd, tiny_sdxl])
@pytest.mark.parametrize("processor", list(PROCESSORS))
@pytest.mark.parametrize("when", ["before", "after"])
def test_any_stock_attention_processor_composes_with_share(builder, processor, when, tmp_path):
    pipe = builder()
    random_share(pipe, tmp_path / "s.safetensors")
    args = unet_args(pipe.unet)
    kw = {}
    if pipe.unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    with torch.no_grad():
        pipe.load_share(tmp_path / "s.safetensors")
        pipe.set_share_concepts(["cat", {"dog": 0.5, "owl": 0.5}])
        reference = pipe.unet(*args, **kw).sample  # Share on the default processors
        pipe.unload_share()
        if when == "before":
            PROCESSORS[processor](pipe)  # before this fix: refused by load_share
        base = pipe.unet(*args, **kw).sample
        pipe.load_share(tmp_path / "s.safetensors")
        if when == "after":
            PROCESSORS[processor](pipe)  # before this fix: "processors were replaced"
            base = pipe.unet(*args, **kw).sample
        assert torch.equal(pipe.unet(*args, **kw).sample, base)  # nothing selected: bit-identical
        pipe.set_share_concepts(["cat", {"dog": 0.5, "owl": 0.5}])
        assert (pipe.unet(*args, **kw).sample - reference).abs().max() <= 1e-5


def test_fused_qkv_projections_are_refused_with_what_to_do(tmp_path):
    pipe = tiny_sd()
    random_share(pipe, tmp_path / "s.safetensors")
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts("cat")
    pipe.unet.fuse_qkv_projections()
    with pytest.raises(RuntimeError, match="fused QKV projections.*unfuse_qkv_projections"):
        generate(pipe)
    with pytest.raises(RuntimeError, match="fused QKV"):
        pipe.set_share_concepts("dog")
    pipe.unet.unfuse_qkv_projections()
    pipe.set_share_concepts("dog")
    generate(pipe)
    pipe.unload_share()
    pipe.unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused QKV projections.*unfuse_qkv_projections"):
        pipe.load_share(tmp_path / "s.safetensors")
    assert not hasattr(pipe.unet, "share_adapter")


# ----------------------------------------------------------------------------- Diffusers' adapter API


def test_active_concepts_disable_enable_and_delete(tmp_path):
    pipe = tiny_sd()
    base = generate(pipe)
    random_share(pipe, tmp_path / "s.safetensors")
    pipe.load_share(tmp_path / "s.safetensors")
    assert pipe.get_active_share_concepts() is None
    pipe.set_share_concepts({"cat": 0.6, "dog": 0.4})
    assert pipe.get_active_share_concepts() == {"cat": 0.6, "dog": 0.4}
    mix = generate(pipe)
    pipe.disable_share()  # like disable_lora(): the base model, the selection kept
    assert torch.equal(generate(pipe), base) and pipe.get_active_share_concepts() == {"cat": 0.6, "dog": 0.4}
    pipe.enable_share()
    assert torch.equal(generate(pipe), mix)
    pipe.set_share_concepts("cat")
    cat = generate(pipe)
    pipe.set_share_concepts(["cat", {"dog": 1.0, "owl": 0.5}])
    pipe.delete_share_concepts("dog")  # in memory: the others stay exact, the selection loses it
    assert [c.name for c in pipe.share_concepts] == ["cat", "owl"]
    assert pipe.get_active_share_concepts() == [{"cat": 1.0}, {"owl": 0.5}]
    pipe.set_share_concepts("cat")
    assert (generate(pipe) - cat).abs().max() <= 1e-6
    with pytest.raises(KeyError, match="'zebra'"):
        pipe.delete_share_concepts(["owl", "zebra"])
    assert [c.name for c in pipe.share_concepts] == ["cat", "owl"]


def test_a_global_strength_through_cross_attention_kwargs_and_fuse_lora_scale(tmp_path):
    pipe = tiny_sd()
    random_share(pipe, tmp_path / "s.safetensors")
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts({"cat": 0.5})
    half = generate(pipe)
    pipe.set_share_concepts("cat")
    full = generate(pipe)
    scaled = generate(pipe, cross_attention_kwargs={"scale": 0.5})  # before: ignored
    assert (scaled - half).abs().max() <= 1e-5 and (scaled - full).abs().max() > 1e-3
    assert torch.equal(generate(pipe), full)  # the strength was for that call only
    pipe.fuse_share(lora_scale=0.5)  # before: refused
    assert (generate(pipe) - half).abs().max() <= 1e-4
    pipe.unfuse_share()
    assert torch.equal(generate(pipe), full)


def test_fusing_a_component_the_file_does_not_adapt_raises(tmp_path):
    pipe = tiny_sd()
    random_share(pipe, tmp_path / "s.safetensors", components=["unet"])
    pipe.load_share(tmp_path / "s.safetensors")
    pipe.set_share_concepts("cat")
    with pytest.raises(ValueError, match="adapts unet, not text_encoder"):  # before: silently nothing
        pipe.fuse_share(["text_encoder"])


# ----------------------------------------------------------------------------- sources: Hub, bytes; several files


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty local Hub cache with HF_HUB_OFFLINE on: nothing can reach the network."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_load_share_from_a_hub_repo_offline_its_bytes_and_revisions(tmp_path, offline_hub):
    from share_lab.tiny_pipelines import fake_hub_repo

    pipe = tiny_sd()
    random_share(pipe, tmp_path / "a.safetensors")
    random_share(pipe, tmp_path / "b.safetensors", seed=1)
    fake_hub_repo(offline_hub, "owner/concepts", {"share.safetensors": tmp_path / "a.safetensors",
                                                 "v2/mine.safetensors": tmp_path / "b.safetensors"})
    fake_hub_repo(offline_hub, "owner/concepts", {"share.safetensors": tmp_path / "b.safetensors"}, revision="v1")
    pipe.load_share(tmp_path / "a.safetensors")
    pipe.set_share_concepts("cat")
    want_a = generate(pipe)
    pipe.unload_share()
    pipe.load_share(tmp_path / "b.safetensors")
    pipe.set_share_concepts("cat")
    want_b = generate(pipe)
    pipe.unload_share()
    for source, kwargs, want in [
        ("owner/concepts", {}, want_a),  # before: "No Share file at owner/concepts"
        ("owner/concepts", {"weight_name": "mine.safetensors", "subfolder": "v2"}, want_b),
        ("owner/concepts", {"revision": "v1"}, want_b),
        ((tmp_path / "a.safetensors").read_bytes(), {}, want_a),  # the file's bytes, e.g. an upload
    ]:
        pipe.load_share(source, **kwargs)
        pipe.set_share_concepts("cat")
        assert torch.equal(generate(pipe), want), kwargs
        pipe.unload_share()
    with pytest.raises(FileNotFoundError, match="'share.safetensors' of the Hub repo owner/absent.*HF_HUB_OFFLINE"):
        pipe.load_share("owner/absent")
    with pytest.raises(FileNotFoundError, match="'nope.safetensors' of the Hub repo owner/concepts"):
        pipe.load_share("owner/concepts", weight_name="nope.safetensors")
    with pytest.raises(share_diffusers.ShareFileError, match="<in-memory Share file>: not a readable"):
        pipe.load_share(b"\x00" * 16)
    from safetensors.torch import load_file

    with pytest.raises(TypeError, match="tensors alone lack its header.*bytes"):
        pipe.load_share(load_file(tmp_path / "a.safetensors"))
    assert pipe.share_concepts == []


def test_adapter_name_loads_several_share_files_side_by_side(tmp_path):
    """Before: a second load_share silently replaced the first file. Now, as load_lora_weights, each
    file is an adapter (default_0, default_1, … or adapter_name=), their concepts exact side by side."""
    pipe = tiny_sd()
    base = generate(pipe)
    random_share(pipe, tmp_path / "pets.safetensors", names=("cat", "dog"))
    random_share(pipe, tmp_path / "birds.safetensors", names=("owl", "jay"), seed=1, components=["unet"])
    alone = {}
    for path, names in ((tmp_path / "pets.safetensors", ("cat", "dog")), (tmp_path / "birds.safetensors", ("owl", "jay"))):
        pipe.load_share(path)
        for name in names:
            pipe.set_share_concepts(name)
            alone[name] = generate(pipe)
        pipe.unload_share()
    pipe.load_share(tmp_path / "pets.safetensors")
    pipe.set_share_concepts("dog")
    pipe.load_share(tmp_path / "birds.safetensors", adapter_name="birds")
    assert pipe.get_list_share_adapters() == ["default_0", "birds"]
    assert [(c.name, c.adapter) for c in pipe.share_concepts] == [("cat", "default_0"), ("dog", "default_0"), ("owl", "birds"),
                                                                 ("jay", "birds")]
    assert pipe.get_active_share_concepts() == {"dog": 1.0}  # loading another file keeps the selection
    for name in ("cat", "dog", "owl", "jay"):
        pipe.set_share_concepts(name)
        assert (generate(pipe) - alone[name]).abs().max() <= 1e-5, name
    pipe.set_share_concepts({"cat": 1.0, "owl": 1.0})  # a mix across files: neither file alone, nor the base
    mix = generate(pipe)
    assert min((mix - alone["cat"]).abs().max(), (mix - alone["owl"]).abs().max(), (mix - base).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="already loaded as adapter 'birds'.*hotswap=True"):
        pipe.load_share(tmp_path / "birds.safetensors", adapter_name="birds")
    with pytest.raises(ValueError, match="loaded as 'default_0' and 'default_1' both have a concept named 'cat'"):
        pipe.load_share(tmp_path / "pets.safetensors")
    with pytest.raises(ValueError, match="none is loaded as 'fish'"):
        pipe.load_share(tmp_path / "birds.safetensors", adapter_name="fish", hotswap=True)
    assert pipe.get_list_share_adapters() == ["default_0", "birds"]  # the refusals changed nothing
    pipe.set_share_concepts("cat")
    pipe.unload_share("birds")  # like delete_adapters: the other file stays exact
    assert torch.equal(generate(pipe), alone["cat"]) and pipe.get_list_share_adapters() == ["default_0"]
    pipe.load_share(tmp_path / "birds.safetensors", adapter_name="default_0", hotswap=True)  # replaces that file
    assert [c.name for c in pipe.share_concepts] == ["owl", "jay"] and pipe.get_active_share_concepts() is None
    pipe.unload_share()
    assert torch.equal(generate(pipe), base)
