"""The strict-continual peers' defining mechanisms (share_lab.baselines), on the shipped base's UNet:
a merge is the LoRA's own delta, C-LoRA's penalty vanishes where no earlier concept changed a
weight, orthogonal initialisation is orthogonal to the earlier adapter, magnitude selection keeps
the larger entry."""

import pytest
import torch
from diffusers import UNet2DConditionModel

import share_lab
from share_lab import baselines


@pytest.fixture
def unet():
    unet = UNet2DConditionModel.from_pretrained(share_lab.TINY_BASE / "unet", local_files_only=True)
    baselines.add_lora(unet, "new", rank=4, seed=0)
    with torch.no_grad():  # a trained-looking adapter: B is zero at initialisation
        for layer in baselines.lora_layers(unet, "new").values():
            layer.lora_B["new"].weight.normal_(0, 0.05)
    return unet


def run(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    text = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), text).sample


def test_merging_the_deltas_reproduces_the_adapter(unet):
    with_adapter = run(unet)
    deltas = baselines.lora_deltas(unet, "new")
    assert len(deltas) == 24 + 18  # the attention projections and the ResNet convolutions
    unet.delete_adapters("new")
    assert not torch.allclose(run(unet), with_adapter, atol=1e-4)  # the adapter mattered
    baselines.add_to_weights(unet, deltas)
    torch.testing.assert_close(run(unet), with_adapter, atol=1e-5, rtol=1e-5)
    baselines.add_to_weights(unet, deltas, sign=-1.0)
    unet_base = UNet2DConditionModel.from_pretrained(share_lab.TINY_BASE / "unet", local_files_only=True)
    torch.testing.assert_close(run(unet), run(unet_base), atol=1e-5, rtol=1e-5)  # float rounding of W + Δ - Δ


def test_clora_penalty_is_zero_where_no_earlier_concept_changed_a_weight(unet):
    layers = baselines.lora_layers(unet, "new")
    zeros = {n: torch.zeros_like(m.get_delta_weight("new")) for n, m in layers.items()}
    assert baselines.clora_penalty(unet, "new", zeros, weight=1e6)().item() == 0.0
    first = next(iter(layers))
    past = dict(zeros, **{first: torch.ones_like(zeros[first])})  # one earlier layer changed, everywhere
    penalty = baselines.clora_penalty(unet, "new", past, weight=2.0)()
    expected = 2.0 * layers[first].get_delta_weight("new").pow(2).sum()
    torch.testing.assert_close(penalty, expected)
    penalty.backward()  # only the changed layer's factors are pushed
    grads = {n: m.lora_B["new"].weight.grad for n, m in layers.items()}
    assert grads[first].abs().sum() > 0
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n != first)


def test_orthogonal_init_is_orthogonal_to_the_earlier_adapter_column_by_column(unet):
    previous = {n: m.lora_A["new"].weight.detach().clone() for n, m in baselines.lora_layers(unet, "new").items()}
    baselines.orthogonal_init(unet, "new", previous)
    for name, layer in baselines.lora_layers(unet, "new").items():
        A = layer.lora_A["new"].weight.flatten(1)  # a convolution's: its patch flattened
        torch.testing.assert_close((A * previous[name].flatten(1)).sum(0), torch.zeros(A.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(A.norm(dim=0), torch.ones(A.shape[1]))
        assert layer.lora_B["new"].weight.abs().sum() == 0


def test_magnitude_merge_keeps_the_larger_entry_ties_to_the_new():
    old = torch.tensor([1.0, -3.0, 2.0, 0.0])
    new = torch.tensor([-2.0, 1.0, 2.0, 0.5])
    assert baselines.magnitude_merge(old, new).tolist() == [-2.0, -3.0, 2.0, 0.5]


def test_a_recipe_lora_saved_for_diffusers_loads_every_layer(tmp_path):
    """The reference recipe's LoRA (attention and convolutions) through save_lora_weights and stock
    load_lora_weights gives what the trained adapter gave (Diffusers' old-format renaming of only the
    attention keys would drop them on load)."""
    from diffusers import StableDiffusionPipeline

    from share_diffusers.training import read_instance_images
    from share_lab import world

    concept = world.list_concepts(share_lab.CONCEPTS)[0]
    pipe = StableDiffusionPipeline.from_pretrained(share_lab.TINY_BASE, local_files_only=True)
    before = run(pipe.unet)
    state = baselines.train_lora_baseline(pipe, "recipe", read_instance_images(concept.path / "train", None), 2, 1e-2)
    trained = run(pipe.unet)
    assert not torch.allclose(trained, before, atol=1e-4)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state)
    loaded = StableDiffusionPipeline.from_pretrained(share_lab.TINY_BASE, local_files_only=True)
    loaded.load_lora_weights(tmp_path)
    assert len(baselines.lora_layers(loaded.unet, "default_0")) == 24 + 18
    torch.testing.assert_close(run(loaded.unet), trained, atol=1e-5, rtol=1e-5)


def test_the_learning_rate_schedule_is_applied_step_by_step():
    """train_lora_baseline(lr_scheduler=...): a cosine schedule's first step is the constant one's (full
    rate), its second is not; an unknown schedule is refused by Diffusers' get_scheduler."""
    from diffusers import StableDiffusionPipeline

    from share_diffusers.training import read_instance_images
    from share_lab import world

    examples = read_instance_images(world.list_concepts(share_lab.CONCEPTS)[0].path / "train", None)

    def trained(steps, schedule):
        pipe = StableDiffusionPipeline.from_pretrained(share_lab.TINY_BASE, local_files_only=True)
        return baselines.train_lora_baseline(pipe, "s", examples, steps, 1e-2, batch_size=2, lr_scheduler=schedule)

    constant, cosine = trained(1, "constant"), trained(1, "cosine")
    assert all(torch.equal(constant[n], cosine[n]) for n in constant)
    constant, cosine = trained(2, "constant"), trained(2, "cosine")
    assert any(not torch.equal(constant[n], cosine[n]) for n in constant)
    with pytest.raises(ValueError):
        trained(1, "bogus")
