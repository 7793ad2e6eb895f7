"""What `load_share` attaches to a pipeline's models: the Share state, one adapter per model, the
selection, and the forward hooks that route each call's selection to the adapters.

`pipeline.py` is the public API over it; the maths of one layer is in `processor.py`.
"""

from __future__ import annotations

import functools
import sys
import warnings

import torch
from diffusers import DiffusionPipeline

from .processor import ShareAdapter, attach, bypassed, detach
from .selection import public_selection, resolve_selection
from .subspace import ShareState
from .targets import COMPONENTS, DENOISERS, split_layer, unwrap


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
            if any(c not in DENOISERS for c in self.models) and not self._warned_text:
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


def adaptable_models(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's components Share can adapt, each under its ``torch.compile`` wrapper if any."""
    models = {c: getattr(pipe, c, None) for c in COMPONENTS}
    return {c: unwrap(m) for c, m in models.items() if isinstance(m, torch.nn.Module)}


def find_runtime(pipe) -> ShareRuntime | None:
    """The Share state on the pipeline's components (shared by every pipeline made of them)."""
    for model in adaptable_models(pipe).values():
        runtime = model.__dict__.get("_share_runtime")
        if runtime is not None:
            return runtime
    return None


def require_runtime(pipe) -> ShareRuntime:
    runtime = find_runtime(pipe)
    if runtime is None:
        raise RuntimeError("No Share file is loaded on this pipeline; call pipe.load_share(path) first.")
    return runtime
