"""The PEFT LoRA that every Share figure is measured against (the "reference LoRA" of a concept),
and the mechanisms of the strict-continual peers built on it.

Why here and not in the library: they are yardsticks, not features. They use the library's data
pipeline and loss (`share_diffusers.training`), so "same data, same loss, same steps" as
``learn_concept.py`` holds by construction.

The peers (``benchmarks/continual.py`` runs them), each passing only the model, or one adapter,
from one concept to the next:
- consecutive merging ("Merge & Init", arXiv 2410.04891): W ← W + B_t A_t after each concept,
  then a fresh LoRA;
- orthogonal initialisation (ibid., code ``luk-st/continual-lora``): one adapter of summed factors
  (ΣB, ΣA), fused into the weights while the next concept trains; the new A's column j is a unit
  vector orthogonal to column j of ΣA (`orthogonal_init`), B = 0; afterwards ΣA += A, ΣB += B;
- magnitude selection (ibid., MagMax-style): the task vector τ = W − W_0 keeps, entry by entry,
  whichever of the old τ and the new B_t A_t is larger in magnitude (`magnitude_merge`);
- C-LoRA's self-regularisation (arXiv 2304.06027): the new LoRA's loss gains
  λ ‖(Σ_{t'<t} ΔW_t') ⊙ B_t A_t‖², which is zero where no earlier concept changed a weight
  (`clora_penalty`); its update is then merged.
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from share_diffusers.targets import PROJECTIONS
from share_diffusers.training import Example, train_in_process

# The layers of the reference recipe, and of every method the benchmarks compare (Share included):
# the attention projections Diffusers' train_dreambooth_lora.py targets, plus the ResNet blocks' 3×3
# conv1/conv2, as LoCon adapts them. The tiny base has no attention at its 16×16 level, where outlines,
# dots and stripes are drawn; with the convolutions the same 400 steps draw a concept about 20 points
# more often, and 800 steps draw the one concept 400 missed, a thin outline (benchmarks/recipe.py,
# docs/results/recipes-v6.json). Every method is trained for RECIPE_STEPS per concept, Share included.
RESNET_CONVS = ("conv1", "conv2")
LORA_TARGETS = [*PROJECTIONS["unet"], *RESNET_CONVS]
RECIPE_STEPS = 800


def train_lora_baseline(pipe, adapter_name: str, examples: list[Example], steps: int, lr: float, batch_size: int = 4,
                        rank: int = 4, seed: int = 0, center_crop: bool = True,
                        target_modules: list[str] = LORA_TARGETS, penalty=None,
                        lr_scheduler: str = "constant") -> dict[str, torch.Tensor]:
    """Train a PEFT LoRA (``lora_alpha = rank``) on the recipe's layers (`LORA_TARGETS`), the yardstick
    Share is measured against; returns its state dict for ``save_lora_weights``.

    Same data pipeline, loss, batch size, optimizer and clipping as ``learn_concept.py``. A new
    adapter is added, or an existing ``adapter_name`` keeps training (naive sequential fine-tuning).
    The base stays frozen and the adapter stays active on ``pipe``. Other ``target_modules`` are for
    measuring what an adapter can reach (train/pilot_bases.py, benchmarks/recipe.py).
    ``penalty()`` is added to every step's loss (C-LoRA).
    """
    unet = pipe.unet
    if adapter_name not in getattr(unet, "peft_config", {}):
        add_lora(unet, adapter_name, rank, seed, target_modules)
    unet.set_adapter(adapter_name)
    unet.requires_grad_(False)
    params = [p for name, p in unet.named_parameters() if f".{adapter_name}." in name and "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    train_in_process(pipe, params, examples, steps, lr, batch_size=batch_size, seed=seed, center_crop=center_crop, penalty=penalty,
                     lr_scheduler=lr_scheduler)
    for p in params:
        p.requires_grad_(False)
    # PEFT's keys, which save_lora_weights / load_lora_weights take as they are. (convert_state_dict_to_diffusers
    # would rename only the attention keys to the old format, and load_lora_weights then skips them, with a warning.)
    return get_peft_model_state_dict(unet, adapter_name=adapter_name)


def add_lora(unet, adapter_name: str, rank: int = 4, seed: int = 0, target_modules=LORA_TARGETS) -> None:
    """A fresh PEFT LoRA (Gaussian A, B = 0, ``lora_alpha = rank``), drawn from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(target_modules))
        unet.add_adapter(config, adapter_name=adapter_name)


# -- the strict-continual peers ----------------------------------------------------------------


def lora_layers(unet, adapter_name: str) -> dict[str, LoraLayer]:
    """The PEFT layers that carry ``adapter_name``, by module name."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}


def lora_deltas(unet, adapter_name: str) -> dict[str, torch.Tensor]:
    """ΔW = scale · B A of every layer the adapter changes."""
    return {name: m.get_delta_weight(adapter_name).detach().clone(memory_format=torch.contiguous_format)  # a conv's is strided
            for name, m in lora_layers(unet, adapter_name).items()}


def base_weights(unet, names) -> dict[str, torch.Tensor]:
    """The (frozen) weight tensors of the named layers, under any PEFT wrapper: edit them in place."""
    modules = dict(unet.named_modules())
    return {n: (modules[n].get_base_layer() if isinstance(modules[n], LoraLayer) else modules[n]).weight.data for n in names}


@torch.no_grad()
def add_to_weights(unet, deltas: dict[str, torch.Tensor], sign: float = 1.0) -> None:
    """W ← W + sign · ΔW, layer by layer (a merge; ``sign=-1`` takes it out again)."""
    for name, weight in base_weights(unet, deltas).items():
        weight += sign * deltas[name].to(weight)


def magnitude_merge(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Entry by entry the larger in magnitude of the old task vector and the new update (ties: new)."""
    return torch.where(new.abs() >= old.abs(), new, old)


@torch.no_grad()
def orthogonal_init(unet, adapter_name: str, previous_A: dict[str, torch.Tensor]) -> None:
    """Set the adapter's A so that its column j is a unit vector orthogonal to column j of the
    previous (summed) A, and B = 0 (luk-st/continual-lora's ``init_lora_with_checkpoint_rotate``)."""
    for name, layer in lora_layers(unet, adapter_name).items():
        weight = layer.lora_A[adapter_name].weight
        A = weight.view(len(weight), -1)  # r x in (a convolution's in: its patch, in_channels · kh · kw)
        for j, v in enumerate(previous_A[name].to(A).reshape(A.shape).T):  # v: column j, in R^r
            A[:, j] = torch.linalg.svd(v[None])[2][-1]  # the last right-singular vector: ⟂ v, unit
        layer.lora_B[adapter_name].weight.zero_()


def clora_penalty(unet, adapter_name: str, past: dict[str, torch.Tensor], weight: float):
    """C-LoRA's forgetting loss, weight · Σ_layers ‖past ⊙ (scale · B A)‖², as a function for
    `train_in_process`. ``past`` holds the summed updates of the earlier concepts."""
    layers = lora_layers(unet, adapter_name)
    pairs = [(layers[name], p) for name, p in past.items()]

    def penalty() -> torch.Tensor:
        return weight * sum((p * m.get_delta_weight(adapter_name)).pow(2).sum() for m, p in pairs)

    return penalty
