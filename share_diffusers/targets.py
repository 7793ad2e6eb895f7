"""Which modules Share adapts, in which model: the one registry of targets.

A pipeline component (``unet``, ``text_encoder``, ``text_encoder_2``) has a *kind*, and a kind has
its target projections, named as in PEFT's ``target_modules`` (the last part of a module name):

* ``unet``: ``to_q/to_k/to_v/to_out.0`` of every Diffusers `Attention`, what Diffusers'
  ``train_dreambooth_lora.py`` targets;
* ``text``: ``self_attn.{q,k,v,out}_proj`` of a transformers CLIP text encoder, named without the
  leading ``text_model.`` so both transformers layouts share one naming, or ``SelfAttention.{q,k,v,o}``
  of a T5 encoder (Flux's ``text_encoder_2``, SD3's ``text_encoder_3``; `TEXT_TARGETS`, by model class);
* ``transformer`` (SD3, Flux): the Linears inside the blocks whose names end in one of the model
  class's `TRANSFORMER_TARGETS` (joint attention ``to_q/k/v/out.0``, ``add_{q,k,v}_proj``,
  ``to_add_out``, the feed-forwards, Flux's single-block ``proj_mlp``/``proj_out``): what Diffusers'
  ``train_dreambooth_lora_{sd3,flux}.py`` and kohya/XLabs LoRAs target. A new transformer pipeline
  is one entry there.

Those are the defaults. Like PEFT's ``target_modules``, `find_targets` also takes other names (a
module matches when its name is the entry or ends in ``.<entry>``) or one regular expression (matched
against the whole name): any ``nn.Linear`` or ``nn.Conv2d`` can be adapted, e.g. the UNet's
``proj_in``/``proj_out`` and feed-forwards or the text encoders' ``mlp.fc1``/``mlp.fc2``, the
layers kohya's trainers and many Diffusers LoRAs adapt beside attention (`LORA_EXTRA`), or the
resnets' 3×3 ``conv1``/``conv2`` that LoCon adapts. A 1×1 convolution is the linear map of its
channels, so Share treats it as an ``n × d`` layer; a k×k one maps each output pixel's input patch,
an ``out × (in·k·k)`` layer, in the order of PyTorch's ``unfold`` and of the conv weight itself.

A Share layer is named ``<component>.<module>``, e.g. ``unet.down_blocks.1.attentions.0.
transformer_blocks.0.attn1.to_q``. Everything else in the package (attachment, file checks, LoRA
import and export, training) asks this module, so a new architecture is a new entry here.
"""

from __future__ import annotations

import re

from torch import nn

_JOINT_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
TRANSFORMER_TARGETS = {  # by model class; a module is a target if its name ends in ".<entry>" (inside a block)
    "SD3Transformer2DModel": _JOINT_ATTENTION + _FEED_FORWARD,
    "FluxTransformer2DModel": _JOINT_ATTENTION + _FEED_FORWARD + ("proj_mlp", "proj_out"),
}
_CLIP_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
TEXT_TARGETS = {  # by model class, as TRANSFORMER_TARGETS; another class gets PROJECTIONS["text"] (CLIP's)
    "CLIPTextModel": _CLIP_ATTENTION,
    "CLIPTextModelWithProjection": _CLIP_ATTENTION,
    "T5EncoderModel": ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o"),
}
PROJECTIONS = {
    "unet": ("to_q", "to_k", "to_v", "to_out.0"),
    "text": _CLIP_ATTENTION,
    "transformer": tuple(dict.fromkeys(t for targets in TRANSFORMER_TARGETS.values() for t in targets)),
}
LORA_EXTRA = {  # beside the defaults, what LoRAs in the wild adapt (kohya's defaults; --target_modules of Diffusers' scripts)
    "unet": ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    "text": ("mlp.fc1", "mlp.fc2"),
    "transformer": (),
}
COMPONENTS = {"unet": "unet", "text_encoder": "text", "text_encoder_2": "text", "text_encoder_3": "text", "transformer": "transformer"}
DENOISERS = {"unet": "cross_attention_kwargs", "transformer": "joint_attention_kwargs"}  # and the forward kwarg of attention kwargs


def denoiser(pipe) -> str:
    """The pipeline's denoising component: ``"transformer"`` (SD3, Flux) or ``"unet"``."""
    return next(c for c in DENOISERS if getattr(pipe, c, None) is not None)


def kind(component: str) -> str:
    """The kind (``"unet"``, ``"transformer"`` or ``"text"``) of a pipeline component; unknown components raise."""
    if component not in COMPONENTS:
        raise ValueError(f"Share adapts the components {', '.join(COMPONENTS)}; got {component!r}.")
    return COMPONENTS[component]


def is_t5(module_name: str) -> bool:
    """Whether a text encoder's Share module name is a T5 encoder's (``encoder.block.…``; CLIP's are ``encoder.layers.…``)."""
    return module_name.startswith("encoder.block.")


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


def is_conv(module: nn.Module) -> bool:
    """Whether a target layer is a convolution rather than a Linear."""
    return isinstance(base_linear(module), nn.Conv2d)


def is_pointwise(module: nn.Module) -> bool:
    """A 1×1 convolution with stride 1 and no padding: the same linear map at every pixel."""
    layer = base_linear(module)
    return layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding in ((0, 0), "valid")


def adaptable(module: nn.Module) -> bool:
    """A layer Share can adapt: a Linear, or a convolution without groups (a k×k one, as LoCon adapts
    resnets, is the linear map of each output pixel's ``in × k × k`` input patch)."""
    layer = base_linear(module)
    if isinstance(layer, nn.Linear):
        return True
    return (isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros"
            and (is_pointwise(layer) or not isinstance(layer.padding, str)))


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a target layer; a convolution's ``in`` is its patch, ``in_channels · kh · kw``."""
    weight = base_linear(module).weight
    return weight.shape[0], weight[0].numel()


def _named_layers(model: nn.Module, component: str):
    """``(Share's name, module)`` of every module of a component; text encoders without ``text_model.``."""
    for name, module in unwrap(model).named_modules():
        if name:
            yield (name.removeprefix("text_model.") if kind(component) == "text" else name), module


def _defaults(model: nn.Module, component: str) -> dict[str, nn.Module]:
    """The kind's default targets (the module docstring)."""
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
    else:  # suffixes of the model class's targets, inside its blocks
        registry = TRANSFORMER_TARGETS if kind(component) == "transformer" else TEXT_TARGETS
        suffixes = tuple("." + p for p in registry.get(type(model).__name__, projections))
        for name, module in model.named_modules():
            if name.endswith(suffixes) and isinstance(base_linear(module), nn.Linear):
                targets[name.removeprefix("text_model.")] = module
    return targets


def _full(model: nn.Module, component: str, name: str) -> str:
    """A Share module name back to the model's own (text encoders keep ``text_model.`` if they have it)."""
    if kind(component) == "text" and hasattr(unwrap(model), "text_model"):
        return "text_model." + name
    return name


def _matcher(target_modules):
    """PEFT's rule: a list of names (the whole name or its last parts) or one regex (the whole name)."""
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name: pattern.fullmatch(name) is not None
    entries = tuple(target_modules)
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise ValueError(f"target_modules must be a regex or a non-empty list of module names, got {target_modules!r}.")
    return lambda name: any(name == e or name.endswith("." + e) for e in entries)


def find_targets(model: nn.Module, component: str, target_modules: str | list[str] | None = None) -> dict[str, nn.Module]:
    """Share's target modules of one pipeline component, by Share's module name.

    ``target_modules`` ``None``: the defaults (the module docstring); else PEFT's names or regex.
    A matched module Share cannot adapt (e.g. a 3×3 convolution) raises, naming it, as does a
    ``target_modules`` that matches nothing.
    """
    if target_modules is None:
        return _defaults(model, component)
    match = _matcher(target_modules)
    found = {n: m for n, m in _named_layers(model, component) if match(n) and not _inside_peft(n)}
    if not found:
        raise ValueError(f"target_modules {target_modules!r} matches no layer of the {component}.")
    bad = [f"{n} ({_describe(m)})" for n, m in found.items() if not adaptable(m)]
    if bad:
        raise ValueError(f"target_modules {target_modules!r} matches layers Share cannot adapt in the {component}: "
                         f"{', '.join(bad[:3])}; Share adapts Linear and Conv2d layers (without groups).")
    return found


def _inside_peft(name: str) -> bool:
    """A PEFT wrapper's own sub-layers (``….base_layer``, ``….lora_A.default``) are never targets."""
    return any(part in ("base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") for part in name.split("."))


def _describe(module: nn.Module) -> str:
    layer = base_linear(module)
    if isinstance(layer, nn.Conv2d):
        return f"a {'×'.join(map(str, layer.kernel_size))} Conv2d"
    return f"a {type(layer).__name__}"


def lookup(model: nn.Module, component: str, names) -> dict[str, nn.Module]:
    """The adaptable modules of a component named ``names`` (Share's module names; e.g. a file's layers)
    that the model has; the rest are left out, for the caller to name."""
    model = unwrap(model)
    found = {}
    for name in names:
        try:
            module = model.get_submodule(_full(model, component, name))
        except AttributeError:
            continue
        if adaptable(module):
            found[name] = module
    return found


def model_shapes(models: dict[str, nn.Module], target_modules=None, layers=None) -> dict[str, tuple[int, int]]:
    """Share's layers of some components: ``{"unet.<module>": (n, d), …}`` for ``{"unet": unet, …}``:
    the defaults or ``target_modules`` (`find_targets`), or of the named ``layers`` those the models have."""
    shapes = {}
    for component, model in models.items():
        if layers is not None:
            names = [module for c, module in map(split_layer, layers) if c == component]
            found = lookup(model, component, names)
        else:
            found = find_targets(model, component, target_modules)
        shapes.update({f"{component}.{name}": layer_shape(module) for name, module in found.items()})
    return shapes


def pipeline_shapes(pipe, components=None, target_modules=None, layers=None) -> dict[str, tuple[int, int]]:
    """`model_shapes` of a pipeline's UNet or transformer and text encoders (or of ``components``)."""
    models = {c: getattr(pipe, c, None) for c in COMPONENTS if components is None or c in components}
    return model_shapes({c: m for c, m in models.items() if m is not None}, target_modules, layers)


def conv_kernels(models: dict[str, nn.Module], layers) -> dict[str, tuple[int, int]]:
    """Share's ``layers`` that are convolutions in ``models``, with their kernel sizes (a LoRA export
    writes them 4-D: `ShareConfig.with_convolutions` stores them)."""
    out = {}
    for component, model in models.items():
        names = [module for c, module in map(split_layer, layers) if c == component]
        out |= {f"{component}.{n}": tuple(base_linear(m).kernel_size) for n, m in lookup(model, component, names).items() if is_conv(m)}
    return out
