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

import functools
import os
import sys
import warnings
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from .hub import resolve_file
from .io import DEFAULT_WEIGHT_NAME, read_share, read_share_bytes
from .processor import ShareAdapter, attach, bypassed, detach
from .selection import check_compatible, check_selection, public_selection, resolve_selection  # noqa: F401  (re-exported: app, train)
from .subspace import LayerShare, ShareState
from .targets import COMPONENTS, DENOISERS, pipeline_shapes, split_layer, unwrap


@dataclass(frozen=True)
class ShareConcept:
    """A loaded concept as users see it."""

    name: str
    trigger: str | None
    prompt: str | None = None
    adapter: str | None = None  # the adapter_name of the Share file it comes from


class ShareRuntime:
    """What `load_share` attaches: the state, one adapter per model, the selection.

    It lives on the models (``model._share_runtime``), not on a pipeline, so every pipeline made of
    the same components (``AutoPipelineForImage2Image.from_pipe(pipe)``) shares and controls it.
    The hooks never read a pipeline inside the UNet call, which ``torch.compile`` traces: the
    classifier-free-guidance factor a per-prompt list needs is taken from the pipeline that is
    calling (found on the call stack) in the text encoder's hook or an eager UNet call, and the
    traced hook reads it as a plain ``int``.
    """

    def __init__(self, models: dict[str, torch.nn.Module], state: ShareState):
        self.state = state
        self.files: dict[str, ShareState] = {"default_0": state}  # by adapter_name (`load_share` sets it)
        self.models: dict[str, torch.nn.Module] = {}
        self.handles, self.hooked = [], []
        self.weights, self.prompt_group, self.selection = None, None, None
        self.cfg = 1  # chunks of the calling pipeline's UNet batch: 2 with classifier-free guidance
        self._call_selection = False
        self._warned_text = False
        by_component: dict[str, list[str]] = {}
        for name in state.layers:
            component, module = split_layer(name)
            by_component.setdefault(component, []).append(module)
        try:
            for component, modules in by_component.items():
                model = models[component]
                _refuse_sequential_offload(model, component)
                layers = [state.layers[f"{component}.{m}"] for m in modules]
                adapter = ShareAdapter(layers, device=model.device, dtype=model.dtype)
                attach(model, component, modules, adapter)
                self.models[component] = model
            for component, model in models.items():  # every text encoder tells who calls, even unadapted
                if component in DENOISERS and component in self.models:
                    pre = functools.partial(self._unet_pre, key=DENOISERS[component])
                    self.handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
                    self.handles.append(model.register_forward_hook(self._unet_post, with_kwargs=True, always_call=True))
                elif component not in DENOISERS:
                    self.handles.append(model.register_forward_pre_hook(self._text_pre, with_kwargs=True))
                    if component in self.models:
                        self.handles.append(model.register_forward_hook(self._text_post, always_call=True))
                else:
                    continue
                model._share_runtime = self
                self.hooked.append(model)
        except BaseException:
            self.close(list(models.values()))
            raise

    @property
    def adapters(self) -> dict[str, ShareAdapter]:
        return {c: m.share_adapter for c, m in self.models.items()}

    # -- selection ---------------------------------------------------------------------------

    def select(self, selection) -> None:
        weights, prompt_group = resolve_selection(self.state, selection)
        if any(a.fused for a in self.adapters.values()):
            raise RuntimeError("Share is fused into the weights; call unfuse_share() before selecting concepts.")
        self._check_attention(force=True)
        for adapter in self.adapters.values():
            adapter.select(weights)
            adapter.index = None
        self.weights, self.prompt_group = weights, prompt_group
        self.selection = public_selection(selection, self.state.names)

    def pause(self, paused: bool) -> None:
        if paused and any(a.fused for a in self.adapters.values()):
            raise RuntimeError("Share is fused into the weights; call unfuse_share() before disable_share().")
        for adapter in self.adapters.values():
            adapter.paused = paused

    def _check_attention(self, force: bool = False) -> None:
        for component in DENOISERS:
            self._check_denoiser(self.models.get(component), force)

    def _check_denoiser(self, unet, force: bool) -> None:
        if unet is None or not (force or unet.share_adapter.enabled):
            return
        problem = bypassed(unet)
        if problem:
            raise RuntimeError(
                problem + " Call unfuse_qkv_projections() / unload_ip_adapter() (or unload_share() first, "
                "then make that change)."
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

    @torch.compiler.disable  # it may run eagerly inside a compiled call, after a graph break: never trace it
    def _note_caller(self, model) -> DiffusionPipeline | None:
        """Find the pipeline calling ``model`` on the stack and keep its guidance factor (eager code only)."""
        frame = sys._getframe(2)
        for _ in range(_MAX_DEPTH):
            if frame is None:
                return None
            caller = frame.f_locals.get("self")
            if isinstance(caller, DiffusionPipeline) and any(
                unwrap(getattr(caller, c, None)) is model for c in COMPONENTS
            ):
                self.cfg = 2 if getattr(caller, "do_classifier_free_guidance", False) else 1
                return caller
            frame = frame.f_back
        return None

    def _unet_pre(self, unet, args, kwargs, key="cross_attention_kwargs"):
        """The UNet's or transformer's pre-hook; ``key`` names its attention kwargs (``joint_attention_kwargs``)."""
        adapter = unet.share_adapter
        cak = kwargs.get(key)
        prompt_group = self.prompt_group
        if cak and "share" in cak:
            if adapter.fused:
                raise RuntimeError("Share is fused into the weights; unfuse_share() before selecting per call.")
            kwargs = dict(kwargs, **{key: {k: v for k, v in cak.items() if k != "share"} or None})
            weights, prompt_group = resolve_selection(self.state, cak["share"])
            adapter.select(weights)
            self._call_selection = True
            if "text_encoder" in self.models and not self._warned_text:
                self._warned_text = True
                warnings.warn(
                    f"{key}['share'] selects concepts in the {'UNet' if key == DENOISERS['unet'] else 'transformer'}; the text encoders use the "
                    "selection of set_share_concepts().",
                    stacklevel=2,
                )
        adapter.scale(cak.get("scale") if cak else None)  # Diffusers' LoRA strength, kept for PEFT LoRAs too
        self._check_attention()
        if prompt_group is None or not adapter.enabled:
            adapter.index = None
            return args, kwargs
        if not torch.compiler.is_compiling():  # traced, the hook must not touch the pipeline
            self._note_caller(unet)
        sample = args[0] if args else kwargs["sample" if "sample" in kwargs else "hidden_states"]
        cfg = 1 if kwargs.get("skip_layers") is not None else self.cfg  # SD3's skip-layer guidance: the conditional half only
        adapter.index = self._index(prompt_group, sample.shape[0], cfg, sample.device)
        return args, kwargs

    def _unet_post(self, unet, args, kwargs, output):
        unet.share_adapter.scale(None)
        if self._call_selection:
            self._call_selection = False
            unet.share_adapter.select(self.weights)
        unet.share_adapter.index = None

    def _text_pre(self, model, args, kwargs):
        caller = self._note_caller(model)
        adapter = getattr(model, "share_adapter", None)
        ids = args[0] if args else kwargs.get("input_ids")
        if self.prompt_group is not None and caller is not None and ids.shape[0] != len(self.prompt_group):
            raise ValueError(
                f"A per-prompt Share selection has {len(self.prompt_group)} entries, but the pipeline got "
                f"{ids.shape[0]} prompts: pass one selection per prompt."
            )
        if adapter is not None:
            adapter.scale(None)  # a call that raised leaves no scale behind
            call_kwargs = getattr(caller, "cross_attention_kwargs", None) or getattr(caller, "joint_attention_kwargs", None)
            adapter.scale((call_kwargs or {}).get("scale"))
            adapter.index = self._index(self.prompt_group, ids.shape[0], 1, ids.device) if adapter.enabled else None

    def _text_post(self, model, args, output):
        model.share_adapter.scale(None)

    # -- fuse / unload -----------------------------------------------------------------------

    def _components(self, components) -> list[str]:
        if components is None:
            return list(self.adapters)
        components = [components] if isinstance(components, str) else list(components)
        unknown = [c for c in components if c not in self.adapters]
        if unknown:
            raise ValueError(f"This Share file adapts {', '.join(self.adapters)}, not {', '.join(unknown)}.")
        return components

    def fuse(self, components=None, lora_scale: float = 1.0) -> None:
        if self.prompt_group is not None:
            raise ValueError("fuse_share needs one selection for the whole batch, not one per prompt.")
        if any(a.paused for a in self.adapters.values()):
            raise RuntimeError("Share is disabled; call enable_share() before fuse_share().")
        for component in self._components(components):
            adapter = self.adapters[component]
            if not adapter.fused and lora_scale != 1.0:
                adapter.select(None if self.weights is None else self.weights * float(lora_scale))
            adapter.fuse()

    def unfuse(self, components=None) -> None:
        for component in self._components(components):
            self.adapters[component].unfuse()
            self.adapters[component].select(self.weights)  # unscaled again

    def close(self, models=()) -> None:
        for handle in self.handles:
            handle.remove()
        for model in self.models.values():
            detach(model)
        for model in [*self.hooked, *models]:  # and a half-finished attach
            if hasattr(model, "share_adapter"):
                detach(model)
            if model.__dict__.get("_share_runtime") is self:
                del model._share_runtime
        self.handles, self.models, self.hooked = [], {}, []


_MAX_DEPTH = 80  # frames between a model's hook and the pipeline method that calls it, with room to spare


def _refuse_sequential_offload(model, component):
    if any(hasattr(m, "_hf_hook") and m is not model for m in model.modules()):
        raise NotImplementedError(
            f"{component} uses sequential CPU offload, which Share does not support; use enable_model_cpu_offload()."
        )


def _models(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's components Share can adapt, each under its ``torch.compile`` wrapper if any."""
    models = {c: getattr(pipe, c, None) for c in COMPONENTS}
    return {c: unwrap(m) for c, m in models.items() if isinstance(m, torch.nn.Module)}


def _find(pipe) -> ShareRuntime | None:
    """The Share state on the pipeline's components (shared by every pipeline made of them)."""
    for model in _models(pipe).values():
        runtime = model.__dict__.get("_share_runtime")
        if runtime is not None:
            return runtime
    return None


def _runtime(pipe) -> ShareRuntime:
    runtime = _find(pipe)
    if runtime is None:
        raise RuntimeError("No Share file is loaded on this pipeline; call pipe.load_share(path) first.")
    return runtime


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
    check_compatible(state.shapes, pipeline_shapes(pipe), f"The Share file {path}")
    previous = _find(pipe)
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
    runtime = ShareRuntime(_models(pipe), state)
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
    _runtime(pipe).select(selection)


def fuse_share(pipe, components: list[str] | None = None, lora_scale: float = 1.0) -> None:
    """Fold the current selection, times ``lora_scale``, into the weights (zero overhead); `unfuse_share`
    restores them exactly. A component the file does not adapt raises, naming it."""
    _runtime(pipe).fuse(components, lora_scale)


def unfuse_share(pipe, components: list[str] | None = None) -> None:
    """Restore the weights `fuse_share` changed, bit-exactly."""
    _runtime(pipe).unfuse(components)


def unload_share(pipe, adapter_names: str | list[str] | None = None) -> None:
    """Remove Share from the pipeline (the base model again, bit-exactly), or only the files loaded
    as ``adapter_names`` (like ``delete_adapters``; the other files' concepts stay exact)."""
    runtime = _find(pipe)
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
    return _runtime(pipe).selection


def disable_share(pipe) -> None:
    """Give the base model's images, keeping the selection (`enable_share` applies it again)."""
    _runtime(pipe).pause(True)


def enable_share(pipe) -> None:
    """Apply the selection again after `disable_share`."""
    _runtime(pipe).pause(False)


def delete_share_concepts(pipe, names: str | list[str]) -> None:
    """Remove concepts from the loaded state, in memory (the file is untouched; the others stay exact).

    The selection keeps its other concepts; an entry left with none selects the base model.
    """
    runtime = _runtime(pipe)
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
    runtime = _find(pipe)
    return [] if runtime is None else list(runtime.files)


def share_concepts(pipe) -> list[ShareConcept]:
    """The loaded concepts with their trigger tokens (empty when no Share file is loaded)."""
    runtime = _find(pipe)
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
