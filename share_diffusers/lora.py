"""LoRA files in and out: fold existing LoRAs into one Share file, export a concept as a LoRA.

Reading accepts the key styles people have: Diffusers (``unet.….lora.down.weight``, old
``….processor.to_q_lora.down.weight``, text-encoder ``lora_linear_layer``), PEFT (``lora_A`` /
``lora_B``, with or without ``base_model.model.``, a PEFT adapter folder with its
``adapter_config.json``) and kohya (``lora_unet_…``, ``lora_te_…`` with ``.alpha``); for Flux also the
original layouts (kohya/ComfyUI ``…double_blocks_0_img_attn_qkv…``, XLabs ``…processor.qkv_lora1…``),
which `FluxLoraLoaderMixin.lora_state_dict` renames and splits (fused qkv → ``to_q/k/v``) exactly as
``load_lora_weights`` does. Scaling
(``alpha / r``, rsLoRA ``alpha / √r``, alpha and rank patterns) is folded into the factors, so
each LoRA becomes plain ``{layer: (B n×r, A d×r)}`` with ``ΔW = B Aᵀ``. Diffusers' own key
converters do the renaming. A LoRA is a file, a folder, a state dict or a Hub repo id. Every layer
is held: Linears and convolutions (attention, ``proj_in``/``proj_out``, feed-forwards, text-encoder
MLPs, LoCon's 3×3 resnet convolutions, whose down factor is a map of each input patch); DoRA and
LyCORIS formats are refused by name. Writing gives Diffusers' layout or kohya's (A1111, ComfyUI),
convolution layers as 4-D tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers.loaders import FluxLoraLoaderMixin
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ShareConfig, stored_config
from .hub import is_repo_id, resolve_file
from .io import ShareFileError, atomic_write, read_share, save_share
from .subspace import ShareState, balance
from .targets import COMPONENTS, is_t5, kind, split_layer

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # Diffusers' file name (LORA_WEIGHT_NAME_SAFE)
PEFT_WEIGHT_NAME, PEFT_CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"  # a PEFT adapter folder
_SUFFIX = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")
_FLUX_ORIGINAL = re.compile(r"(^|[._])(double|single)_blocks[._]|^lora_transformer_")  # BFL's block names (kohya, ComfyUI, XLabs)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Raw tensors, safetensors metadata and (for a PEFT folder) adapter_config of a LoRA."""
    config = {}
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            config = json.loads((path / "adapter_config.json").read_text())
            path = path / "adapter_model.safetensors"
        else:
            path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"No LoRA safetensors file at {path}.")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}, config
    except Exception as e:
        raise ShareFileError(f"{path} is not a readable safetensors LoRA file: {e}") from e


def _fold_kohya_alphas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya keeps ``alpha`` beside each layer; fold ``alpha / r`` into the down weight."""
    sd = dict(sd)
    for key in [k for k in sd if k.endswith(".alpha")]:
        alpha = sd.pop(key).item()
        down = key[: -len(".alpha")] + ".lora_down.weight"
        if down in sd:
            sd[down] = sd[down] * (alpha / sd[down].shape[0])
    return sd


def _scale_rule(metadata: dict, config: dict):
    """``(component, module, rank) -> scale`` from PEFT config or Diffusers' LoRA metadata."""
    meta = json.loads(metadata["lora_adapter_metadata"]) if "lora_adapter_metadata" in metadata else {}

    def scale(component: str, module: str, rank: int) -> float:
        cfg = config or {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith(component + ".")}
        if not cfg or "lora_alpha" not in cfg:
            return 1.0  # Diffusers' default: alpha = rank
        alpha = cfg["lora_alpha"]
        for pattern, value in (cfg.get("alpha_pattern") or {}).items():
            if re.search(rf"(^|\.){pattern}$", module):
                alpha = value
        return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank

    return scale


def _source(lora, weight_name: str | None = None, **hub_kwargs) -> tuple[dict[str, torch.Tensor], dict, dict, str]:
    """Tensors, metadata, adapter config and a printable name of a LoRA: a state dict, a file or
    PEFT folder, or a Hub repo id (its ``weight_name``, default ``pytorch_lora_weights.safetensors``)."""
    if isinstance(lora, Mapping):
        bad = [k for k, v in lora.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"A LoRA state dict maps key names to tensors; got {bad[0]!r}: {type(lora[bad[0]]).__name__}.")
        return dict(lora), {}, {}, "<LoRA state dict>"
    if isinstance(lora, (str, os.PathLike)) and not Path(lora).exists() and is_repo_id(lora):
        try:
            lora = resolve_file(lora, weight_name, LORA_WEIGHT_NAME, "LoRA file", **hub_kwargs)
        except FileNotFoundError:
            if weight_name is not None:
                raise
            try:  # a PEFT adapter repo: adapter_model.safetensors beside its adapter_config.json (one snapshot folder)
                resolve_file(lora, PEFT_CONFIG_NAME, PEFT_CONFIG_NAME, "LoRA file", **hub_kwargs)
                lora = resolve_file(lora, PEFT_WEIGHT_NAME, PEFT_WEIGHT_NAME, "LoRA file", **hub_kwargs).parent
            except FileNotFoundError:
                raise FileNotFoundError(f"The Hub repo {lora} has neither {LORA_WEIGHT_NAME} nor a PEFT adapter ({PEFT_WEIGHT_NAME} "
                                        "with adapter_config.json) that can be loaded; name the file with weight_name=.") from None
    elif isinstance(lora, (str, os.PathLike)) and weight_name and Path(lora).is_dir():
        lora = Path(lora) / (hub_kwargs.get("subfolder") or "") / weight_name
    elif not isinstance(lora, (str, os.PathLike)):
        raise TypeError(f"Expected a LoRA file, folder, Hub repo id or state dict, got {type(lora).__name__}.")
    return *_load(Path(lora)), str(lora)


# formats Share cannot hold as U B Aᵀ Vᵀ: (key fragment, name); checked before any key renaming
_OTHER_FORMATS = (
    ("lora_magnitude_vector", "DoRA (weight-decomposed LoRA: its magnitude vectors rescale W0 + ΔW, which is not a low-rank delta)"),
    ("dora_scale", "DoRA (kohya/LyCORIS dora_scale: magnitudes that rescale W0 + ΔW, not a low-rank delta)"),
    ("hada_w1_", "LoHa (LyCORIS Hadamard-product adapter)"),
    ("lokr_w1", "LoKr (LyCORIS Kronecker-product adapter)"),
    ("oft_", "OFT/BOFT (orthogonal fine-tuning)"),
    ("lora_mid", "LyCORIS LoCon with a Tucker core (lora_mid)"),
    (".diff", "LyCORIS full/diff weights"),
    (".a1.weight", "GLoRA (LyCORIS)"),
)


def _check_format(sd: dict, path) -> None:
    """Refuse adapter formats that are not plain LoRA, naming the format (not a key-renaming error)."""
    for fragment, name in _OTHER_FORMATS:
        key = next((k for k in sd if fragment in k), None)
        if key is not None:
            raise ShareFileError(f"{path} is a {name}, not a plain LoRA (e.g. key {key!r}); Share imports LoRA only: "
                                 "merge it into the base model or convert it to a LoRA first.")


def read_lora_parts(path, weight_name: str | None = None, **hub_kwargs) -> tuple[Factors, dict[str, tuple[int, int]]]:
    """A LoRA's layers as factors (a convolution's down factor flattened over its ``in × kh × kw``
    patch), and the kernel size of each layer that is a convolution. Tensors that are not LoRA
    factors at all raise, naming them: nothing is ever dropped."""
    sd, metadata, config, path = _source(path, weight_name, **hub_kwargs)
    _check_format(sd, path)
    t5 = [k for k in sd if k.startswith(("text_encoders.t5xxl.", "lora_te3_"))]
    if t5:  # Diffusers' Flux converter filters these out: importing the rest would drop them unmeasured
        raise ShareFileError(f"{path} has LoRA layers for the T5 text encoder (e.g. {t5[0]!r}), which Diffusers' converters drop "
                             "(load_lora_weights ignores them too); Share does not import T5 LoRA layers yet.")
    if any(_FLUX_ORIGINAL.search(k) for k in sd):
        sd = FluxLoraLoaderMixin.lora_state_dict(sd)  # to transformer.…lora_A/B, alphas folded
        unconverted = [k for k in sd if k.partition(".")[0] not in COMPONENTS]
        if unconverted:
            raise ShareFileError(f"{path}: a Flux LoRA layout that Diffusers' FluxLoraLoaderMixin does not convert (so "
                                 f"load_lora_weights cannot load it either), e.g. {unconverted[:2]}.")
    elif all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in sd):
        sd, _ = _convert_non_diffusers_lora_to_diffusers(_fold_kohya_alphas(sd))
    scale = _scale_rule(metadata, config)
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        key = key.removeprefix("base_model.model.")
        component, _, rest = key.partition(".")
        if component not in COMPONENTS:  # un-prefixed PEFT state dict: guess from the path
            component = "unet" if re.match(r"(down_blocks|mid_block|up_blocks)\.", key) else "text_encoder"
            component = "transformer" if re.match(r"(single_)?transformer_blocks\.", key) else component
            rest = key
        by_component.setdefault(component, {})[rest] = value

    factors: Factors = {}
    kernels: dict[str, tuple[int, int]] = {}
    unknown = []
    for component, part in by_component.items():
        if component == "unet":
            part = convert_unet_state_dict_to_peft(part)
        elif any("_lora." in k for k in part):
            part = convert_state_dict_to_peft(part, StateDictType.DIFFUSERS_OLD)
        elif any("lora_linear_layer" in k for k in part):
            part = convert_state_dict_to_peft(part, StateDictType.DIFFUSERS)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in part.items():
            m = _SUFFIX.match(key)
            if m is None:
                unknown.append(f"{component}.{key}")
                continue
            module = m["module"].removeprefix("text_model.")
            pairs.setdefault(module, {})[m["side"]] = value.float()
        for module, pair in pairs.items():
            if set(pair) != {"A", "B"}:
                unknown.append(f"{component}.{module} (lora_{'A' if 'A' in pair else 'B'} without its pair)")
                continue
            up, down = pair["B"], pair["A"]  # up: n×r(×1×1), down: r×d(×kh×kw)
            r = down.shape[0]
            if up.ndim < 2 or up.shape[1] != r or up.numel() != up.shape[0] * r:
                raise ShareFileError(f"{path}: {component}.{module} has LoRA shapes {tuple(up.shape)} / {tuple(down.shape)}.")
            if down.ndim not in (2, 4):
                raise ShareFileError(f"{path}: {component}.{module} has LoRA shapes {tuple(up.shape)} / {tuple(down.shape)}.")
            up = up.reshape(up.shape[0], r) * scale(component, module, r)
            factors[f"{component}.{module}"] = (up, down.reshape(r, -1).mT.contiguous())
            if down.ndim == 4:  # a convolution (LoCon's k×k ones too): ΔW maps each input patch
                kernels[f"{component}.{module}"] = tuple(down.shape[2:])
    if unknown:
        raise ShareFileError(f"{path}: {len(unknown)} tensors are not LoRA factors Share can read, e.g. {unknown[:3]}.")
    if not factors:
        raise ShareFileError(f"{path}: no LoRA layers were found.")
    return factors, kernels


def read_lora(path, weight_name: str | None = None, **hub_kwargs) -> Factors:
    """A LoRA (file, PEFT folder, Hub repo id or state dict) as ``{layer: (B n×r, A d×r)}`` in Share's
    layer naming, scale folded in (a convolution's ``A`` over its flattened input patch)."""
    return read_lora_parts(path, weight_name, **hub_kwargs)[0]


def loras_to_share(
    lora_files: list,
    output_path: str | os.PathLike,
    names: list[str] | None = None,
    shapes: dict[str, tuple[int, int]] | None = None,
    basis_rank: int = 64,
    energy: float | None = None,
    triggers: list[str | None] | None = None,
    weight_name: str | None = None,
    **hub_kwargs,
) -> dict[str, dict]:
    """Fold LoRAs (files, PEFT folders, Hub repo ids with ``weight_name=``/``revision=``/…, or state
    dicts) into one Share file, one concept per LoRA; no training data needed.

    The basis is the top-``basis_rank`` subspace of all LoRAs' deltas (see `LayerShare.merge`),
    every LoRA is projected on it, and the returned report gives each LoRA's relative
    reconstruction error ``‖ΔW − ΔŴ‖_F / ‖ΔW‖_F`` (overall and per layer). ``shapes`` lists the
    base model's adapted layers (``{layer: (n, d)}``); by default, the layers the LoRAs touch.

    Every layer of a LoRA is held: Linears and convolutions (attention, ``proj_in``/``proj_out``,
    feed-forwards, text-encoder MLPs, LoCon's 3×3 convolutions; the file records which layers are
    convolutions and their kernels, so exports are 4-D again). DoRA and LyCORIS (LoHa, LoKr, …) files
    are refused, naming the format.
    """
    if names is None and any(isinstance(f, Mapping) for f in lora_files):
        raise ValueError("LoRA state dicts have no file name: pass names=, one concept name per LoRA.")
    names = names or [Path(f).stem for f in lora_files]
    if len(names) != len(lora_files) or len(set(names)) != len(names):
        raise ValueError("Need one unique concept name per LoRA file.")
    loras, kernels = {}, {}
    for name, f in zip(names, lora_files):
        loras[name], found = read_lora_parts(f, weight_name, **hub_kwargs)
        kernels |= found
    if shapes is None:
        shapes = {}
        for factors in loras.values():
            for layer, (B, A) in factors.items():
                shape = (B.shape[0], A.shape[0])
                if shapes.setdefault(layer, shape) != shape:
                    raise ShareFileError(f"LoRAs disagree on the shape of {layer}: {shapes[layer]} vs {shape}.")
    for name, factors in loras.items():
        for layer, (B, A) in factors.items():
            if layer not in shapes:
                raise ShareFileError(f"LoRA {name!r} adapts {layer}, which shapes= does not list (for a pipeline's layers beyond "
                                     "the defaults: pipeline_shapes(pipe, target_modules=…), or leave shapes out).")
            if shapes[layer] != (B.shape[0], A.shape[0]):
                raise ShareFileError(f"LoRA {name!r}: layer {layer} {(B.shape[0], A.shape[0])} does not fit the base model.")
    sources = ["<LoRA state dict>" if isinstance(f, Mapping) else str(f) for f in lora_files]
    meta = {name: {"trigger": t, "source": s} for name, s, t in zip(names, sources, triggers or [None] * len(names))}
    state, report = ShareState.empty(shapes).merge(loras, meta=meta, k_max=basis_rank, energy=energy)
    config = ShareConfig(basis_rank=basis_rank, basis_energy=energy).with_convolutions({n: k for n, k in kernels.items() if n in shapes})
    save_share(state, output_path, config=config.to_dict())
    return report


def lora_factors(state: ShareState, selection: str | dict[str, float]) -> Factors:
    """One concept (or a weighted mix) as exact low-rank factors per layer (rank ≤ Σ p)."""
    mix = {selection: 1.0} if isinstance(selection, str) else dict(selection)
    w = state.weights(mix)
    used = torch.nonzero(w).flatten()
    factors = {}
    for name, layer in state.layers.items():
        if layer.k == 0 or len(used) == 0:
            continue
        Bs = (layer.B[used] * w[used, None, None]).permute(1, 0, 2).reshape(layer.k, -1)
        As = layer.A[used].permute(1, 0, 2).reshape(layer.k, -1)
        Bb, Ab = balance(Bs.double(), As.double())
        r = int((Bb.norm(dim=0) > 1e-12 * max(Bb.norm().item(), 1e-30)).sum())
        if r:
            factors[name] = ((layer.U.double() @ Bb[:, :r]).float(), (layer.V.double() @ Ab[:, :r]).float())
    return factors


LORA_FORMATS = ("diffusers", "kohya")


def write_lora(factors: Factors, output_path: str | os.PathLike, format: str = "diffusers", name: str | None = None,
               conv_layers=(), conv_kernels=None) -> Path:
    """Write ``{layer: (B n×r, A d×r)}`` as a LoRA file (scale 1), atomically; ``conv_layers`` are
    1×1 convolutions in the base model, written as ``r×d×1×1`` / ``n×r×1×1`` as LoRA trainers do,
    ``conv_kernels`` ``{layer: (kh, kw)}`` its k×k ones, written as LoCon does: ``r×in×kh×kw`` / ``n×r×1×1``.

    ``format="diffusers"``: PEFT-style keys (``unet.<module>.lora_A.weight``); text-encoder modules go
    under ``text_model.`` (Diffusers drops that level for text encoders that do not have it), so
    ``pipe.load_lora_weights(output_path)`` reproduces the delta exactly. ``format="kohya"``: the keys
    A1111, ComfyUI and kohya's scripts use (``lora_unet_<module>.lora_down.weight`` / ``lora_up.weight`` /
    ``alpha``, ``lora_te_`` or, with two text encoders, ``lora_te1_``/``lora_te2_``), alpha = rank per
    layer, and kohya's ``ss_*`` metadata; Diffusers' ``load_lora_weights`` reads it through its kohya converter.
    """
    if format not in LORA_FORMATS:
        raise ValueError(f"format must be one of {', '.join(LORA_FORMATS)}; got {format!r}.")
    if format == "kohya" and any(split_layer(layer)[0] == "transformer" for layer in factors):
        raise ValueError("format='kohya' writes UNet pipelines' LoRAs (SD 1.x/2.x, SDXL); export SD3/Flux concepts with "
                         "format='diffusers', which their load_lora_weights reads.")
    t5 = sorted({c for c, m in map(split_layer, factors) if kind(c) == "text" and is_t5(m)})
    if t5:
        raise ValueError(f"This concept adapts the T5 text encoder ({', '.join(t5)}), which Diffusers' load_lora_weights does not "
                         "load (it reads the transformer's and the CLIP text encoders' LoRA layers only), so a LoRA file would "
                         "silently lose that part; use the concept from its Share file with pipe.load_share.")
    tensors = {}
    two_encoders = any(split_layer(layer)[0] == "text_encoder_2" for layer in factors)
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if two_encoders else "lora_te_", "text_encoder_2": "lora_te2_"}
    for layer, (B, A) in factors.items():
        component, module = split_layer(layer)
        if kind(component) == "text":
            module = "text_model." + module
        down, up = A.mT.contiguous(), B.contiguous()  # r×d, n×r
        if layer in conv_layers:
            down, up = down[..., None, None], up[..., None, None]
        elif layer in (conv_kernels or {}):
            kh, kw = conv_kernels[layer]
            down, up = down.reshape(down.shape[0], -1, kh, kw), up[..., None, None]
        if format == "kohya":
            key = kohya_prefix[component] + module.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(B.shape[1]))  # alpha = rank: scale 1
        else:
            tensors[f"{component}.{module}.lora_A.weight"] = down
            tensors[f"{component}.{module}.lora_B.weight"] = up
    metadata = {"format": "pt"}
    if format == "kohya":
        ranks = sorted({B.shape[1] for B, _ in factors.values()})
        metadata |= {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks[-1]), "ss_network_alpha": str(ranks[-1]),
                     "ss_base_model_version": "sdxl_base_v1-0" if two_encoders else "sd_v1"}
    if name:
        metadata["share_diffusers_concept"] = name
    output_path = Path(output_path)
    atomic_write(output_path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return output_path


def share_to_lora(
    share_path: str | os.PathLike, concept: str | dict[str, float], output_path: str | os.PathLike, format: str = "diffusers"
) -> Path:
    """Write one concept (or a ``{name: weight}`` mix) of a Share file as a LoRA file: Diffusers' layout
    (``format="diffusers"``) or kohya's, as A1111 and ComfyUI load it (``format="kohya"``)."""
    if format not in LORA_FORMATS:
        raise ValueError(f"format must be one of {', '.join(LORA_FORMATS)}; got {format!r}.")
    state, header = read_share(share_path)
    label = concept if isinstance(concept, str) else json.dumps(concept)
    config = stored_config(header)
    return write_lora(lora_factors(state, concept), output_path, format=format, name=label, conv_layers=config.conv_layers,
                      conv_kernels=config.conv_kernels)
