"""Share on Diffusers pipelines: ``pipe.load_share(path)``, ``pipe.set_share_concepts(...)`` and friends.

The same operations exist as plain functions (``load_share(pipe, path)``), as `ShareLoaderMixin`
for pipeline subclasses, and, once ``share_diffusers`` is imported, as methods of every
``DiffusionPipeline`` (`install` never overwrites an attribute Diffusers already has).

A *selection* is a concept name, a ``{name: weight}`` mix, ``None`` (the base model), or a list
with one of those per prompt. It is set for the pipeline with ``set_share_concepts`` or for one
call with ``cross_attention_kwargs={"share": selection}`` (``joint_attention_kwargs`` on SD3 and Flux:
the UNet's or transformer's part; text encoders follow
the pipeline's selection, since Diffusers does not pass those kwargs to them).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from .hub import resolve_file
from .io import DEFAULT_WEIGHT_NAME, read_share, read_share_bytes
from .runtime import ShareRuntime, adaptable_models, find_runtime, require_runtime
from .selection import check_compatible, check_selection  # noqa: F401  (re-exported: app, train)
from .subspace import LayerShare, ShareState
from .targets import pipeline_shapes


@dataclass(frozen=True)
class ShareConcept:
    """A loaded concept as users see it."""

    name: str
    trigger: str | None
    prompt: str | None = None
    adapter: str | None = None  # the adapter_name of the Share file it comes from


# -- the public API (functions; also installed as pipeline methods) ------------------------------


def load_share(
    pipe,
    pretrained_model_name_or_path_or_state: str | os.PathLike | ShareState | bytes,
    weight_name: str | None = None,
    adapter_name: str | None = None,
    hotswap: bool = False,
    **hub_kwargs,
) -> None:
    """Load a Share file into the pipeline, as ``load_lora_weights`` loads a LoRA.

    The source is a file, a folder holding ``weight_name`` (default ``share.safetensors``), a Hub
    repo id (``subfolder=``, ``revision=``, ``cache_dir=``, ``local_files_only=``, ``token=``, as
    `hub.resolve_file` resolves it; ``HF_HUB_OFFLINE`` is honoured), the file's bytes, or a `ShareState`.
    Every concept becomes available at once; none is selected. Several files can be loaded, each
    under its ``adapter_name`` (default ``default_0``, ``default_1``, …), their concepts side by side
    (concept names must differ across files); a name already loaded raises unless ``hotswap=True``,
    which replaces that file. The file is validated against the pipeline first: on any error nothing
    is changed.
    """
    source = pretrained_model_name_or_path_or_state
    if isinstance(source, ShareState):
        state, path = source, "<in-memory ShareState>"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        path = "<in-memory Share file>"
        state, _ = read_share_bytes(source, path)
    elif isinstance(source, dict):
        raise TypeError("load_share got a dict: a Share file's tensors alone lack its header (concept names, layout); pass the "
                        "file's bytes, its path or Hub id, or a ShareState (share_diffusers.read_share).")
    else:
        path = resolve_file(source, weight_name, DEFAULT_WEIGHT_NAME, "Share file", **hub_kwargs)
        state, _ = read_share(path)
    check_compatible(state.shapes, pipeline_shapes(pipe) | pipeline_shapes(pipe, layers=state.shapes), f"The Share file {path}")
    previous = find_runtime(pipe)
    files = dict(previous.files) if previous is not None else {}
    if adapter_name is None and hotswap:
        raise ValueError("hotswap=True replaces a loaded Share file: name it with adapter_name=.")
    if adapter_name is None:
        adapter_name = next(f"default_{i}" for i in range(len(files) + 1) if f"default_{i}" not in files)
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"adapter_name must be a non-empty string, got {adapter_name!r}.")
    if hotswap and adapter_name not in files:
        raise ValueError(f"hotswap=True replaces a loaded Share file, but none is loaded as {adapter_name!r} "
                         f"(loaded: {', '.join(map(repr, files)) or 'none'}).")
    if adapter_name in files and not hotswap:
        raise ValueError(f"A Share file is already loaded as adapter {adapter_name!r}; pass another adapter_name to load "
                         f"both, hotswap=True to replace it, or unload_share() first.")
    files[adapter_name] = state
    _rebuild(pipe, previous, files)


def _rebuild(pipe, previous: ShareRuntime | None, files: dict[str, ShareState]) -> None:
    """Attach the Share files ``files`` (replacing ``previous``), keeping the selection's concepts that remain."""
    state = combine(files)  # raises on a concept name in two files: nothing changed yet
    selection, paused = None, False
    if previous is not None:
        if any(a.fused for a in previous.adapters.values()):
            raise RuntimeError("Share is fused into the weights; call unfuse_share() before loading or unloading Share files.")
        selection, paused = previous.selection, any(a.paused for a in previous.adapters.values())
        previous.close()
    if not files:
        return
    runtime = ShareRuntime(adaptable_models(pipe), state)
    runtime.files = files

    def prune(mix):
        return {n: w for n, w in mix.items() if n in state.names} or None if mix else None

    runtime.select([prune(m) for m in selection] if isinstance(selection, list) else prune(selection))
    runtime.pause(paused)


def combine(files: dict[str, ShareState]) -> ShareState:
    """Several Share files as one state: per layer the files' bases side by side and each file's
    coefficients in its own block, so every concept's ΔW is exactly the one of its file (the joined
    bases need not be orthonormal: nothing refits them). One file is returned as it is."""
    concepts, owner = [], {}
    for adapter, state in files.items():
        for c in state.concepts:
            if c["name"] in owner:
                raise ValueError(f"The Share files loaded as {owner[c['name']]!r} and {adapter!r} both have a concept "
                                 f"named {c['name']!r}: concept names select concepts, so they must differ across files.")
            owner[c["name"]] = adapter
            concepts.append({**c, "adapter": adapter})
    if len(files) == 1:
        (state,) = files.values()
        return ShareState(state.layers, concepts)
    shapes = {name: shape for state in files.values() for name, shape in state.shapes.items()}
    C = len(concepts)
    layers = {}
    for name, (n, d) in shapes.items():
        parts = [state.layers.get(name) for state in files.values()]
        sizes = [len(state.concepts) for state in files.values()]
        k = sum(l.k for l in parts if l is not None)
        p = max([l.B.shape[2] for l in parts if l is not None] + [1])
        U, V = torch.zeros(n, k), torch.zeros(d, k)
        B, A = torch.zeros(C, k, p), torch.zeros(C, k, p)
        c0 = k0 = 0
        for layer, size in zip(parts, sizes):
            if layer is not None:
                k1, pw = k0 + layer.k, layer.B.shape[2]
                U[:, k0:k1], V[:, k0:k1] = layer.U, layer.V
                B[c0 : c0 + size, k0:k1, :pw], A[c0 : c0 + size, k0:k1, :pw] = layer.B, layer.A
                k0 = k1
            c0 += size
        layers[name] = LayerShare(U, V, B, A)
    return ShareState(layers, concepts)


def set_share_concepts(pipe, selection) -> None:
    """Select concepts: a name, a ``{name: weight}`` mix, ``None`` (base model), or a list, one per prompt.

    With a list, prompt ``i`` of the next call (all its images, and both halves of
    classifier-free guidance) uses entry ``i``. Switching rewrites small tensors in place.
    """
    require_runtime(pipe).select(selection)


def fuse_share(pipe, components: list[str] | None = None, lora_scale: float = 1.0) -> None:
    """Fold the current selection, times ``lora_scale``, into the weights (zero overhead); `unfuse_share`
    restores them exactly. A component the file does not adapt raises, naming it."""
    require_runtime(pipe).fuse(components, lora_scale)


def unfuse_share(pipe, components: list[str] | None = None) -> None:
    """Restore the weights `fuse_share` changed, bit-exactly."""
    require_runtime(pipe).unfuse(components)


def unload_share(pipe, adapter_names: str | list[str] | None = None) -> None:
    """Remove Share from the pipeline (the base model again, bit-exactly), or only the files loaded
    as ``adapter_names`` (like ``delete_adapters``; the other files' concepts stay exact)."""
    runtime = find_runtime(pipe)
    if runtime is None:
        return
    if adapter_names is None:
        runtime.close()
        return
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    unknown = [n for n in names if n not in runtime.files]
    if unknown:
        raise ValueError(f"No Share file is loaded as {', '.join(map(repr, unknown))}; loaded: {', '.join(map(repr, runtime.files))}.")
    _rebuild(pipe, runtime, {n: s for n, s in runtime.files.items() if n not in names})


def get_active_share_concepts(pipe):
    """The selection set with `set_share_concepts`: ``None``, ``{name: weight}``, or a list of those per prompt."""
    return require_runtime(pipe).selection


def disable_share(pipe) -> None:
    """Give the base model's images, keeping the selection (`enable_share` applies it again)."""
    require_runtime(pipe).pause(True)


def enable_share(pipe) -> None:
    """Apply the selection again after `disable_share`."""
    require_runtime(pipe).pause(False)


def delete_share_concepts(pipe, names: str | list[str]) -> None:
    """Remove concepts from the loaded state, in memory (the file is untouched; the others stay exact).

    The selection keeps its other concepts; an entry left with none selects the base model.
    """
    runtime = require_runtime(pipe)
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        runtime.state.index(name)  # KeyError naming it
    if any(a.fused for a in runtime.adapters.values()):
        raise RuntimeError("Share is fused into the weights; call unfuse_share() before deleting concepts.")
    files = {}
    for adapter, state in runtime.files.items():
        keep = [i for i, n in enumerate(state.names) if n not in names]
        files[adapter] = ShareState({n: layer.subset(keep) for n, layer in state.layers.items()}, [state.concepts[i] for i in keep])
    _rebuild(pipe, runtime, files)


def get_list_share_adapters(pipe) -> list[str]:
    """The adapter names of the loaded Share files (like ``get_list_adapters``; empty when none is loaded)."""
    runtime = find_runtime(pipe)
    return [] if runtime is None else list(runtime.files)


def share_concepts(pipe) -> list[ShareConcept]:
    """The loaded concepts with their trigger tokens (empty when no Share file is loaded)."""
    runtime = find_runtime(pipe)
    if runtime is None:
        return []
    return [ShareConcept(c["name"], c.get("trigger"), c.get("prompt"), c.get("adapter")) for c in runtime.state.concepts]


class ShareLoaderMixin:
    """Share's loader methods, for pipeline subclasses: ``class MyPipe(StableDiffusionPipeline, ShareLoaderMixin)``."""

    load_share = load_share
    set_share_concepts = set_share_concepts
    fuse_share = fuse_share
    unfuse_share = unfuse_share
    unload_share = unload_share
    get_active_share_concepts = get_active_share_concepts
    disable_share = disable_share
    enable_share = enable_share
    delete_share_concepts = delete_share_concepts
    get_list_share_adapters = get_list_share_adapters
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
