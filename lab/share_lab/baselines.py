"""The PEFT LoRA that every Share figure is measured against (the "reference LoRA" of a concept).

Why here and not in the library: it is a yardstick, not a feature. It uses the library's data
pipeline and loss (`share_diffusers.training`), so "same data, same loss, same steps" as
``learn_concept.py`` holds by construction.
"""

from __future__ import annotations

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from share_diffusers.targets import PROJECTIONS
from share_diffusers.training import Example, train_in_process

LORA_TARGETS = list(PROJECTIONS["unet"])  # what Diffusers' train_dreambooth_lora.py targets


def train_lora_baseline(pipe, adapter_name: str, examples: list[Example], steps: int, lr: float, batch_size: int = 4,
                        rank: int = 4, seed: int = 0, center_crop: bool = True,
                        target_modules: list[str] = LORA_TARGETS) -> dict[str, torch.Tensor]:
    """Train a PEFT LoRA (``lora_alpha = rank``) on the UNet's attention projections, the yardstick
    Share is measured against; returns its state dict in Diffusers format (``save_lora_weights``).

    Same data pipeline, loss, batch size, optimizer and clipping as ``learn_concept.py``. A new
    adapter is added, or an existing ``adapter_name`` keeps training (naive sequential fine-tuning).
    The base stays frozen and the adapter stays active on ``pipe``. ``target_modules`` other than
    the attention projections are for measuring what an adapter can reach (train/pilot_bases.py).
    """
    unet = pipe.unet
    if adapter_name not in getattr(unet, "peft_config", {}):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(target_modules))
            unet.add_adapter(config, adapter_name=adapter_name)
    unet.set_adapter(adapter_name)
    unet.requires_grad_(False)
    params = [p for name, p in unet.named_parameters() if f".{adapter_name}." in name and "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    train_in_process(pipe, params, examples, steps, lr, batch_size=batch_size, seed=seed, center_crop=center_crop)
    for p in params:
        p.requires_grad_(False)
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter_name))
