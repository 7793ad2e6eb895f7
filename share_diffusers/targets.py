"""Which modules Share adapts, in which model: the one registry of targets.

A pipeline component (``unet``, ``text_encoder``, ``text_encoder_2``) has a *kind*, and a kind has
its target projections, named as in PEFT's ``target_modules`` (the last part of a module name):

* ``unet``: ``to_q/to_k/to_v/to_out.0`` of every Diffusers `Attention`, what Diffusers'
  ``train_dreambooth_lora.py`` targets;
* ``text``: ``self_attn.{q,k,v,out}_proj`` of a transformers CLIP text encoder, named without the
  leading ``text_model.`` so both transformers layouts share one naming;
* ``transformer`` (SD3, Flux): the Linears inside the blocks whose names end in one of the model
  class's `TRANSFORMER_TARGETS` (joint attention ``to_q/k/v/out.0``, ``add_{q,k,v}_proj``,
  ``to_add_out``, the feed-forwards, Flux's single-block ``proj_mlp``/``proj_out``): what Diffusers'
  ``train_dreambooth_lora_{sd3,flux}.py`` and kohya/XLabs LoRAs target. A new transformer pipeline
  is one entry there.

A Share layer is named ``<component>.<module>``, e.g. ``unet.down_blocks.1.attentions.0.
transformer_blocks.0.attn1.to_q``. Everything else in the package (attachment, file checks, LoRA
import and export, training) asks this module, so a new architecture is a new entry here.
"""

from __future__ import annotations

from torch import nn

_JOINT_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
TRANSFORMER_TARGETS = {  # by model class; a module is a target if its name ends in ".<entry>" (inside a block)
    "SD3Transformer2DModel": _JOINT_ATTENTION + _FEED_FORWARD,
    "FluxTransformer2DModel": _JOINT_ATTENTION + _FEED_FORWARD + ("proj_mlp", "proj_out"),
}
PROJECTIONS = {
    "unet": ("to_q", "to_k", "to_v", "to_out.0"),
    "text": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "transformer": tuple(dict.fromkeys(t for targets in TRANSFORMER_TARGETS.values() for t in targets)),
}
COMPONENTS = {"unet": "unet", "text_encoder": "text", "text_encoder_2": "text", "transformer": "transformer"}
DENOISERS = {"unet": "cross_attention_kwargs", "transformer": "joint_attention_kwargs"}  # and the forward kwarg of attention kwargs


def denoiser(pipe) -> str:
    """The pipeline's denoising component: ``"transformer"`` (SD3, Flux) or ``"unet"``."""
    return next(c for c in DENOISERS if getattr(pipe, c, None) is not None)


def kind(component: str) -> str:
    """The kind (``"unet"``, ``"transformer"`` or ``"text"``) of a pipeline component; unknown components raise."""
    if component not in COMPONENTS:
        raise ValueError(f"Share adapts the components {', '.join(COMPONENTS)}; got {component!r}.")
    return COMPONENTS[component]


def split_layer(name: str) -> tuple[str, str]:
    """``"unet.down_blocks.….to_q"`` → ``("unet", "down_blocks.….to_q")``."""
    component, _, module = name.partition(".")
    return component, module


def unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile``'s `OptimizedModule` (whose names start ``_orig_mod.``), or the model itself."""
    return getattr(model, "_orig_mod", model)


def base_linear(module: nn.Module) -> nn.Module:
    """The plain layer under a PEFT wrapper (or the module itself)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a target layer."""
    return tuple(base_linear(module).weight.shape)


def find_targets(model: nn.Module, component: str) -> dict[str, nn.Module]:
    """Share's target modules of one pipeline component, by module name (see the module docstring)."""
    from diffusers.models.attention_processor import Attention

    model = unwrap(model)
    projections = PROJECTIONS[kind(component)]
    targets = {}
    if kind(component) == "unet":
        for name, module in model.named_modules():
            if isinstance(module, Attention):
                for proj in projections:
                    sub = module.get_submodule(proj)
                    if isinstance(base_linear(sub), nn.Linear):
                        targets[f"{name}.{proj}"] = sub
    elif kind(component) == "transformer":
        suffixes = tuple("." + p for p in TRANSFORMER_TARGETS.get(type(model).__name__, projections))
        for name, module in model.named_modules():
            if name.endswith(suffixes) and isinstance(base_linear(module), nn.Linear):
                targets[name] = module
    else:
        for name, module in model.named_modules():
            parent, _, leaf = name.rpartition(".")
            if leaf in projections and parent.endswith("self_attn") and isinstance(base_linear(module), nn.Linear):
                targets[name.removeprefix("text_model.")] = module
    return targets


def model_shapes(models: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """Share's layers of some components: ``{"unet.<module>": (n, d), …}`` for ``{"unet": unet, …}``."""
    return {
        f"{component}.{name}": layer_shape(module)
        for component, model in models.items()
        for name, module in find_targets(model, component).items()
    }


def pipeline_shapes(pipe, components=None) -> dict[str, tuple[int, int]]:
    """Share's layers of a pipeline's UNet or transformer and text encoders (or of ``components``)."""
    models = {c: getattr(pipe, c, None) for c in COMPONENTS if components is None or c in components}
    return model_shapes({c: m for c, m in models.items() if m is not None})
