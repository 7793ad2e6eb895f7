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
converters do the renaming.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from diffusers.loaders import FluxLoraLoaderMixin
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ShareConfig
from .io import ShareFileError, atomic_write, read_share, save_share
from .subspace import ShareState, balance
from .targets import COMPONENTS, PROJECTIONS, kind, split_layer

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
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


def read_lora(path: str | os.PathLike) -> Factors:
    """A LoRA file (or folder) as ``{layer: (B n×r, A d×r)}`` in Share's layer naming, scale folded in."""
    sd, metadata, config = _load(Path(path))
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
    skipped = []
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
                skipped.append(f"{component}.{key}")
                continue
            module = m["module"].removeprefix("text_model.")
            pairs.setdefault(module, {})[m["side"]] = value.float()
        targets = PROJECTIONS[kind(component)]
        for module, pair in pairs.items():
            if not module.endswith(tuple("." + t for t in targets)) or set(pair) != {"A", "B"}:
                skipped.append(f"{component}.{module}")
                continue
            up, down = pair["B"], pair["A"]  # up: n×r, down: r×d
            if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
                raise ShareFileError(f"{path}: {component}.{module} has LoRA shapes {tuple(up.shape)} / {tuple(down.shape)}.")
            factors[f"{component}.{module}"] = (up * scale(component, module, up.shape[1]), down.mT.contiguous())
    if not factors:
        found = f" (it has {', '.join(skipped[:3])}…)" if skipped else ""
        raise ShareFileError(f"{path}: no LoRA layers on attention projections were found{found}.")
    if skipped:
        warnings.warn(
            f"{path}: {len(skipped)} LoRA tensors/layers outside Share's targets (attention projections) "
            f"were not folded in, e.g. {skipped[:3]}.",
            stacklevel=2,
        )
    return factors


def loras_to_share(
    lora_files: list[str | os.PathLike],
    output_path: str | os.PathLike,
    names: list[str] | None = None,
    shapes: dict[str, tuple[int, int]] | None = None,
    basis_rank: int = 64,
    energy: float | None = None,
    triggers: list[str | None] | None = None,
) -> dict[str, dict]:
    """Fold LoRA files into one Share file, one concept per LoRA; no training data needed.

    The basis is the top-``basis_rank`` subspace of all LoRAs' deltas (see `LayerShare.merge`),
    every LoRA is projected on it, and the returned report gives each LoRA's relative
    reconstruction error ``‖ΔW − ΔŴ‖_F / ‖ΔW‖_F`` (overall and per layer). ``shapes`` lists the
    base model's adapted layers (``{layer: (n, d)}``); by default, the layers the LoRAs touch.
    """
    names = names or [Path(f).stem for f in lora_files]
    if len(names) != len(lora_files) or len(set(names)) != len(names):
        raise ValueError("Need one unique concept name per LoRA file.")
    loras = {name: read_lora(f) for name, f in zip(names, lora_files)}
    if shapes is None:
        shapes = {}
        for factors in loras.values():
            for layer, (B, A) in factors.items():
                shape = (B.shape[0], A.shape[0])
                if shapes.setdefault(layer, shape) != shape:
                    raise ShareFileError(f"LoRAs disagree on the shape of {layer}: {shapes[layer]} vs {shape}.")
    for name, factors in loras.items():
        for layer, (B, A) in factors.items():
            if layer not in shapes or shapes[layer] != (B.shape[0], A.shape[0]):
                raise ShareFileError(f"LoRA {name!r}: layer {layer} {(B.shape[0], A.shape[0])} does not fit the base model.")
    meta = {name: {"trigger": t, "source": str(f)} for name, f, t in zip(names, lora_files, triggers or [None] * len(names))}
    state, report = ShareState.empty(shapes).merge(loras, meta=meta, k_max=basis_rank, energy=energy)
    save_share(state, output_path, config=ShareConfig(basis_rank=basis_rank, basis_energy=energy).to_dict())
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


def write_lora(factors: Factors, output_path: str | os.PathLike) -> Path:
    """Write ``{layer: (B n×r, A d×r)}`` as a standard Diffusers LoRA file (scale 1), atomically.

    Keys are PEFT-style (``unet.<module>.lora_A.weight``); text-encoder modules go under
    ``text_model.`` (Diffusers drops that level for text encoders that do not have it), so
    ``pipe.load_lora_weights(output_path)`` reproduces the delta exactly.
    """
    tensors = {}
    for layer, (B, A) in factors.items():
        component, module = split_layer(layer)
        if kind(component) == "text":
            module = "text_model." + module
        tensors[f"{component}.{module}.lora_A.weight"] = A.mT.contiguous()
        tensors[f"{component}.{module}.lora_B.weight"] = B.contiguous()
    output_path = Path(output_path)
    atomic_write(output_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return output_path


def share_to_lora(
    share_path: str | os.PathLike, concept: str | dict[str, float], output_path: str | os.PathLike
) -> Path:
    """Write one concept (or a ``{name: weight}`` mix) of a Share file as a standard Diffusers LoRA file."""
    state, _ = read_share(share_path)
    return write_lora(lora_factors(state, concept), output_path)
