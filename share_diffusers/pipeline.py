"""Share on Diffusers pipelines: ``pipe.load_share(path)``, ``pipe.set_share_concepts(...)`` and friends.

The same operations exist as plain functions (``load_share(pipe, path)``), as `ShareLoaderMixin`
for pipeline subclasses, and, once ``share_diffusers`` is imported, as methods of every
``DiffusionPipeline`` (`install` never overwrites an attribute Diffusers already has).

A *selection* is a concept name, a ``{name: weight}`` mix, ``None`` (the base model), or a list
with one of those per prompt. It is set for the pipeline with ``set_share_concepts`` or for one
call with ``cross_attention_kwargs={"share": selection}`` (the UNet part; text encoders follow
the pipeline's selection, since Diffusers does not pass those kwargs to them).
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from .io import ShareFileError, read_share, resolve_path
from .processor import ShareAdapter, attach, detach, replaced_processors
from .subspace import ShareState
from .targets import COMPONENTS, pipeline_shapes, split_layer


@dataclass(frozen=True)
class ShareConcept:
    """A loaded concept as users see it."""

    name: str
    trigger: str | None
    prompt: str | None = None


def check_compatible(file_shapes: dict, have: dict, source: str = "This Share file") -> None:
    """Raise, naming the first mismatches, unless every layer of the file exists in ``have`` with its shape."""
    problems = []
    for name, shape in file_shapes.items():
        if name not in have:
            problems.append(f"{name} is not in this model")
        elif tuple(have[name]) != tuple(shape):
            problems.append(f"{name} is {tuple(shape)} in the file but {tuple(have[name])} in the model")
    if problems:
        raise ShareFileError(
            f"{source} was made for another base model: {len(problems)} of its {len(file_shapes)} layers do not "
            f"match, e.g. " + "; ".join(problems[:3]) + "."
        )


MAX_WEIGHT = 1e3  # a concept weight beyond this is a typo, not a mix (and overflows half precision)


def check_selection(selection, names: list[str]) -> dict[str, float] | None:
    """One selection (a name, a ``{name: weight}`` mix or ``None``) as a mix without zero weights;
    ``None`` is the base model. The one validator of selections (pipelines and the web UI): bad input
    raises, naming it — `KeyError` for an unknown concept, `TypeError` for a wrong type, `ValueError`
    for a weight that is not finite or beyond ±``MAX_WEIGHT``."""
    if selection is None:
        return None
    if isinstance(selection, str):
        selection = {selection: 1.0}
    if not isinstance(selection, Mapping):
        raise TypeError(
            f"A Share selection is a concept name, a {{name: weight}} dict, None, or a list of those per prompt; "
            f"got {type(selection).__name__}."
        )
    mix = {}
    for name, weight in selection.items():
        if not isinstance(name, str):
            raise TypeError(f"Concept names must be strings, got {name!r}.")
        if name not in names:
            known = ", ".join(repr(n) for n in names) or "none"
            raise KeyError(f"Unknown Share concept {name!r}; this file holds: {known}.")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"The weight of {name!r} must be a number, got {type(weight).__name__}.")
        weight = float(weight)
        if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            raise ValueError(f"The weight of {name!r} must be a finite number within ±{MAX_WEIGHT:g}, got {weight}.")
        if weight:
            mix[name] = weight
    return mix or None


def _weights(state: ShareState, selection) -> torch.Tensor:
    """One selection (not a list) as a ``(C,)`` weight vector."""
    return state.weights(check_selection(selection, state.names) or {})


def resolve_selection(state: ShareState, selection) -> tuple[torch.Tensor, list[int] | None]:
    """``(G, C)`` group weights and, for a per-prompt list, each prompt's group.

    A per-prompt list gets one group per prompt, equal entries included: the selection's
    shapes then depend only on the number of prompts, so a compiled UNet is not recompiled
    when the concepts change (and a k×k core per prompt costs nothing).
    """
    if isinstance(selection, (list, tuple)):
        if not selection:
            raise ValueError("An empty list selects nothing; pass None for the base model.")
        rows = [_weights(state, s) for s in selection]
        if len(rows) == 1:
            return rows[0][None], None
        return torch.stack(rows), list(range(len(rows)))
    return _weights(state, selection)[None], None


class ShareRuntime:
    """What `load_share` attaches to a pipeline: the state, one adapter per model, the selection."""

    def __init__(self, pipe, state: ShareState):
        self.pipe, self.state = pipe, state
        self.models: dict[str, torch.nn.Module] = {}
        self.handles = []
        self.weights, self.prompt_group = None, None
        self._call_selection = False
        self._warned_text = False
        by_component: dict[str, list[str]] = {}
        for name in state.layers:
            component, module = split_layer(name)
            by_component.setdefault(component, []).append(module)
        try:
            for component, modules in by_component.items():
                model = getattr(pipe, component)
                _refuse_sequential_offload(model, component)
                layers = [state.layers[f"{component}.{m}"] for m in modules]
                adapter = ShareAdapter(layers, device=model.device, dtype=model.dtype)
                attach(model, component, modules, adapter)
                self.models[component] = model
                if component == "unet":
                    self.handles.append(model.register_forward_pre_hook(self._unet_pre, with_kwargs=True))
                    self.handles.append(model.register_forward_hook(self._unet_post, with_kwargs=True, always_call=True))
                else:
                    self.handles.append(model.register_forward_pre_hook(self._text_pre, with_kwargs=True))
        except BaseException:
            self.close()
            raise

    @property
    def adapters(self) -> dict[str, ShareAdapter]:
        return {c: m.share_adapter for c, m in self.models.items()}

    # -- selection ---------------------------------------------------------------------------

    def select(self, selection) -> None:
        weights, prompt_group = resolve_selection(self.state, selection)
        if any(a.fused for a in self.adapters.values()):
            raise RuntimeError("Share is fused into the weights; call unfuse_share() before selecting concepts.")
        self._check_processors(force=True)
        for adapter in self.adapters.values():
            adapter.select(weights)
            adapter.index = None
        self.weights, self.prompt_group = weights, prompt_group

    def _check_processors(self, force: bool = False) -> None:
        unet = self.models.get("unet")
        if unet is None or not (force or unet.share_adapter.enabled):
            return
        replaced = replaced_processors(unet)
        if replaced:
            now = type(unet.get_submodule(replaced[0]).processor).__name__
            raise RuntimeError(
                f"Share's attention processors were replaced on {len(replaced)} attention modules (now {now}, e.g. "
                f"{replaced[0]}), by set_attn_processor, fuse_qkv_projections, an IP-Adapter or similar: the selected "
                "concepts would be silently ignored. Call unload_share() first, make that change, then load_share()."
            )

    def _index(self, prompt_group: list[int] | None, batch: int, cfg: int, device) -> torch.Tensor | None:
        """Each sample's group: prompts are repeated ``n`` times (images per prompt), ``cfg`` chunks."""
        if prompt_group is None:
            return None
        prompts = len(prompt_group)
        if batch % (cfg * prompts):
            raise ValueError(
                f"A per-prompt Share selection has {prompts} entries, but the model got a batch of {batch} "
                f"({'with' if cfg == 2 else 'without'} classifier-free guidance): pass one selection per prompt."
            )
        n = batch // (cfg * prompts)
        return torch.tensor(prompt_group, device=device).repeat_interleave(n).repeat(cfg)

    def _unet_pre(self, unet, args, kwargs):
        adapter = unet.share_adapter
        cak = kwargs.get("cross_attention_kwargs")
        prompt_group = self.prompt_group
        if cak and "share" in cak:
            if adapter.fused:
                raise RuntimeError("Share is fused into the weights; unfuse_share() before selecting per call.")
            kwargs = dict(kwargs, cross_attention_kwargs={k: v for k, v in cak.items() if k != "share"} or None)
            weights, prompt_group = resolve_selection(self.state, cak["share"])
            adapter.select(weights)
            self._call_selection = True
            if "text_encoder" in self.models and not self._warned_text:
                self._warned_text = True
                warnings.warn(
                    "cross_attention_kwargs['share'] selects concepts in the UNet; the text encoders use the "
                    "selection of set_share_concepts().",
                    stacklevel=2,
                )
        self._check_processors()
        sample = args[0] if args else kwargs["sample"]
        cfg = 2 if getattr(self.pipe, "do_classifier_free_guidance", False) else 1
        adapter.index = self._index(prompt_group, sample.shape[0], cfg, sample.device) if adapter.enabled else None
        return args, kwargs

    def _unet_post(self, unet, args, kwargs, output):
        if self._call_selection:
            self._call_selection = False
            unet.share_adapter.select(self.weights)
        unet.share_adapter.index = None

    def _text_pre(self, model, args, kwargs):
        adapter = model.share_adapter
        ids = args[0] if args else kwargs.get("input_ids")
        adapter.index = self._index(self.prompt_group, ids.shape[0], 1, ids.device) if adapter.enabled else None

    # -- fuse / unload -----------------------------------------------------------------------

    def fuse(self, components=None) -> None:
        if self.prompt_group is not None:
            raise ValueError("fuse_share needs one selection for the whole batch, not one per prompt.")
        for component, adapter in self.adapters.items():
            if components is None or component in components:
                adapter.fuse()

    def unfuse(self, components=None) -> None:
        for component, adapter in self.adapters.items():
            if components is None or component in components:
                adapter.unfuse()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for model in self.models.values():
            detach(model)
        self.handles, self.models = [], {}
        for component in COMPONENTS:  # a half-finished attach
            model = getattr(self.pipe, component, None)
            if model is not None and hasattr(model, "share_adapter"):
                detach(model)


def _refuse_sequential_offload(model, component):
    if any(hasattr(m, "_hf_hook") and m is not model for m in model.modules()):
        raise NotImplementedError(
            f"{component} uses sequential CPU offload, which Share does not support; use enable_model_cpu_offload()."
        )


def _runtime(pipe) -> ShareRuntime:
    runtime = getattr(pipe, "_share_runtime", None)
    if runtime is None:
        raise RuntimeError("No Share file is loaded on this pipeline; call pipe.load_share(path) first.")
    return runtime


# -- the public API (functions; also installed as pipeline methods) ------------------------------


def load_share(
    pipe, pretrained_model_name_or_path_or_state: str | os.PathLike | ShareState, weight_name: str | None = None
) -> None:
    """Load a Share file (a path, or a folder holding ``share.safetensors``) or a `ShareState` into the pipeline.

    Every concept becomes available at once; none is selected (the pipeline still gives the
    base model's images until `set_share_concepts`). A Share file already loaded is replaced.
    The file is validated against the pipeline first: on any error nothing is changed.
    """
    if isinstance(pretrained_model_name_or_path_or_state, ShareState):
        state, path = pretrained_model_name_or_path_or_state, "<in-memory ShareState>"
    else:
        path = resolve_path(pretrained_model_name_or_path_or_state, weight_name)
        state, _ = read_share(path)
    check_compatible(state.shapes, pipeline_shapes(pipe), f"The Share file {path}")
    previous = getattr(pipe, "_share_runtime", None)
    if previous is not None:
        previous.close()
        pipe._share_runtime = None
    pipe._share_runtime = ShareRuntime(pipe, state)


def set_share_concepts(pipe, selection) -> None:
    """Select concepts: a name, a ``{name: weight}`` mix, ``None`` (base model), or a list, one per prompt.

    With a list, prompt ``i`` of the next call (all its images, and both halves of
    classifier-free guidance) uses entry ``i``. Switching rewrites small tensors in place.
    """
    _runtime(pipe).select(selection)


def fuse_share(pipe, components: list[str] | None = None) -> None:
    """Fold the current selection into the weights (zero overhead); `unfuse_share` restores them exactly."""
    _runtime(pipe).fuse(components)


def unfuse_share(pipe, components: list[str] | None = None) -> None:
    """Restore the weights `fuse_share` changed, bit-exactly."""
    _runtime(pipe).unfuse(components)


def unload_share(pipe) -> None:
    """Remove Share from the pipeline; it is the base model again, bit-exactly."""
    runtime = getattr(pipe, "_share_runtime", None)
    if runtime is not None:
        runtime.close()
        pipe._share_runtime = None


def share_concepts(pipe) -> list[ShareConcept]:
    """The loaded concepts with their trigger tokens (empty when no Share file is loaded)."""
    runtime = getattr(pipe, "_share_runtime", None)
    if runtime is None:
        return []
    return [ShareConcept(c["name"], c.get("trigger"), c.get("prompt")) for c in runtime.state.concepts]


class ShareLoaderMixin:
    """Share's loader methods, for pipeline subclasses: ``class MyPipe(StableDiffusionPipeline, ShareLoaderMixin)``."""

    load_share = load_share
    set_share_concepts = set_share_concepts
    fuse_share = fuse_share
    unfuse_share = unfuse_share
    unload_share = unload_share
    share_concepts = property(share_concepts)


def install(cls=DiffusionPipeline) -> list[str]:
    """Add the mixin's methods to ``cls`` (idempotent); an attribute ``cls`` already has is never replaced."""
    added = []
    for name, value in vars(ShareLoaderMixin).items():
        if name.startswith("_"):
            continue
        existing = getattr(cls, name, None)
        if existing is not None and existing is not value:
            warnings.warn(f"{cls.__name__}.{name} already exists; share_diffusers leaves it alone.", stacklevel=2)
            continue
        setattr(cls, name, value)
        added.append(name)
    return added
