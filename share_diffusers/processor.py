"""Attaching Share to models: where the delta enters a Diffusers UNet or transformer (SD3, Flux) or a CLIP encoder.

* `ShareAdapter` is an ``nn.Module`` registered on the model as ``model.share_adapter`` (so it
  follows ``.to()`` and offloading). It holds, on the model's device, every adapted layer's basis,
  the coefficient bank of all concepts, and the current selection as ``(G, L, k, k)`` cores.
  Switching concepts rewrites the cores in place; nothing else moves.
* Every adapted layer (by default ``to_q/k/v/out.0`` of a UNet `Attention`, the joint-attention,
  feed-forward and single-block Linears of a transformer, ``q/k/v/out_proj`` of a text encoder;
  any Linear or convolution a file names) gets a forward hook that adds the delta to the output. The attention
  processor is left alone, so the delta does not depend on which processor computes attention
  (`AttnProcessor2_0`, `AttnProcessor`, `SlicedAttnProcessor`, xFormers, …), a PEFT LoRA wrapping
  the same Linear still works and stacks with Share, and nothing selected adds nothing: the
  hook returns ``None`` and the model is bit-identical to the base.
* What bypasses those Linears cannot compose: fused QKV projections and IP-Adapter processors
  are refused, by `attach` and by `bypassed`, which the pipeline checks on every switch and call.

This layer knows module structure, not files: it is given `LayerShare`s and a selection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models import attention_processor as _ap
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
from torch import Tensor, nn

from .subspace import LayerShare, NewConcept, dense_delta, share_delta
from .targets import DENOISERS, base_linear, is_conv, is_pointwise, kind, lookup, unwrap

# processors that do not call to_q/to_k/to_v/to_out.0 as they are (fused QKV) or add projections
# of their own beside them (IP-Adapter): with these the selected concepts would be silently wrong
BYPASSING = tuple(getattr(_ap, n) for n in dir(_ap) if n.endswith("Processor2_0") and n.startswith("Fused")) + tuple(
    getattr(_ap, n) for n in dir(_ap) if "IPAdapter" in n and isinstance(getattr(_ap, n), type) and n != "IPAdapterMaskProcessor"
) + (FluxIPAdapterAttnProcessor,)
_ATTENTION = (_ap.Attention, AttentionModuleMixin)  # modules with a processor that calls the projections


class ShareAdapter(nn.Module):
    """Everything one model needs on its device to add Share deltas to its layers.

    Layer ``i`` has buffers ``U`` (n×k_i), ``V`` (d×k_i); the bank holds every concept's
    coefficients padded to ``(C, L, k, p)``; ``cores`` ``(G, L, k, k)`` is the current selection,
    ``index`` maps samples to groups (``None``: all use group 0). Buffers are non-persistent, so
    the model's ``state_dict`` and ``save_pretrained`` never see them.
    """

    def __init__(self, layers: list[LayerShare], device=None, dtype=None):
        super().__init__()
        dtype = dtype or torch.float32
        kmax = max([l.k for l in layers] + [1])
        pmax = max([l.B.shape[2] for l in layers] + [1])
        C = layers[0].num_concepts if layers else 0
        bank_B = torch.zeros(C, len(layers), kmax, pmax)
        bank_A = torch.zeros(C, len(layers), kmax, pmax)
        self.bases = nn.ModuleList()
        for i, layer in enumerate(layers):
            basis = nn.Module()
            basis.register_buffer("U", layer.U.to(device, dtype), persistent=False)
            basis.register_buffer("V", layer.V.to(device, dtype), persistent=False)
            self.bases.append(basis)
            k, p = layer.B.shape[1:]
            bank_B[:, i, :k, :p] = layer.B
            bank_A[:, i, :k, :p] = layer.A
        self.register_buffer("bank_B", bank_B.to(device), persistent=False)
        self.register_buffer("bank_A", bank_A.to(device), persistent=False)
        self.register_buffer("cores", torch.zeros(1, len(layers), kmax, kmax, device=device, dtype=dtype), persistent=False)
        self.k = [l.k for l in layers]
        self.index: Tensor | None = None
        self.active = False  # a non-zero selection is set
        self.paused = False  # disable_share(): the selection is kept but not applied
        self._unscaled: Tensor | None = None  # the cores before a per-call scale
        self.fused = False  # the selection is folded into the weights
        self.trainer: NewConcept | None = None
        self.targets: list[nn.Module] = []  # the adapted modules, in layer order (plain list: not registered)
        self.attentions: list[tuple[str, nn.Module]] = []  # the UNet's `Attention`s that own the targets
        self.hooks = []
        self._refresh_views()

    def _refresh_views(self) -> None:
        """Per layer ``(U, V, cores[:, i, :k, :k])``, looked up once instead of on every call (the
        views follow in-place updates of ``cores``; rebuilt when a buffer is replaced)."""
        self._views = [(b.U, b.V, self.cores[:, i, :k, :k]) for i, (b, k) in enumerate(zip(self.bases, self.k))]

    def _apply(self, fn, recurse=True):  # .to(), .half(), …: new buffer tensors, so new views
        super()._apply(fn, recurse)
        self._refresh_views()
        return self

    @property
    def enabled(self) -> bool:
        return (self.active and not self.fused and not self.paused) or self.trainer is not None

    @torch.no_grad()
    def scale(self, s: float | None) -> None:
        """Scale the selection for one call (``None``: restore it); in place, so nothing recompiles."""
        if s is None:
            if self._unscaled is not None:
                self.cores.copy_(self._unscaled)
                self._unscaled = None
        elif s != 1.0 and self.enabled:
            self._unscaled = self.cores.clone()
            self.cores.mul_(s)

    @torch.no_grad()
    def select(self, weights: Tensor | None) -> None:
        """Set the selection from a ``(G, C)`` weight matrix (``None`` or all-zero: the base model).

        Only the concepts with a non-zero weight are read, so the cost does not grow with C.
        The cores are rewritten in place when the group count is unchanged (no recompilation
        under ``torch.compile``).
        """
        if weights is None or not torch.count_nonzero(weights):
            self.active = False
            return
        used = torch.nonzero(weights.abs().sum(0)).flatten()
        w = weights[:, used].to(self.bank_B)
        Bs, As = self.bank_B[used.to(self.bank_B.device)], self.bank_A[used.to(self.bank_A.device)]
        s, L, k, p = Bs.shape
        Bw = torch.einsum("gs,slkp->glksp", w, Bs).reshape(w.shape[0], L, k, s * p)
        cores = (Bw @ As.permute(1, 2, 0, 3).reshape(L, k, s * p).mT).to(self.cores.dtype)
        if cores.shape == self.cores.shape:
            self.cores.copy_(cores)
        else:
            self.cores = cores
            self._refresh_views()
        self.active = True

    def delta(self, i: int, x: Tensor, out: Tensor | None = None) -> Tensor:
        """The delta of layer ``i`` for input ``x``: the new concept being trained, else the selection.

        With ``out`` (the layer's output), the delta is added into it in place and ``out`` returned.
        """
        if self.trainer is not None:
            return self.trainer.layers[i](x, out)
        U, V, cores = self._views[i]
        if not U.shape[-1] and out is not None:  # k = 0: no concept changes this layer (e.g. SD3's last add_q_proj, never read)
            return out
        return share_delta(x, U, V, cores, self.index, out)

    def dense(self, i: int) -> Tensor:
        """Dense ΔW of layer ``i`` for the current (single-group) selection."""
        U, V, cores = self._views[i]
        return dense_delta(U.float(), V.float(), cores[0].float())

    # -- fusing: fold the selection into W0, and restore W0 bit-exactly ----------------------

    @torch.no_grad()
    def fuse(self) -> None:
        if self.fused or not self.active:
            return
        if self.index is not None or self.cores.shape[0] != 1:
            raise ValueError("fuse_share needs one selection for the whole batch, not one per prompt.")
        self._saved = []
        for i, module in enumerate(self.targets):
            weight = base_linear(module).weight
            self._saved.append(weight.detach().to("cpu", copy=True))
            weight += self.dense(i).to(weight).view_as(weight)
        self.fused = True

    @torch.no_grad()
    def unfuse(self) -> None:
        if not self.fused:
            return
        for i, (module, original) in enumerate(zip(self.targets, self._saved)):
            weight = base_linear(module).weight
            expected = original.to(weight.device) + self.dense(i).to(weight).view_as(weight)
            if not torch.equal(weight, expected):
                name = getattr(module, "_share_name", i)
                raise RuntimeError(
                    f"The weight of {name} changed after fuse_share (another adapter fused or the weights were "
                    "edited); unfuse that first, so that unfuse_share can restore the original weights exactly."
                )
        for module, original in zip(self.targets, self._saved):
            base_linear(module).weight.copy_(original)
        del self._saved
        self.fused = False


def attach(model: nn.Module, component: str, names: list[str], adapter: ShareAdapter) -> None:
    """Register ``adapter`` on ``model`` (the pipeline's ``component``; a compiled model's original
    module) and hook its layers ``names`` (module names, in adapter order).

    Raises before changing anything if a layer is missing or an attention module bypasses its
    projections (fused QKV, IP-Adapter): silently dropping the delta would give wrong images.
    """
    model = unwrap(model)
    targets = lookup(model, component, names)
    missing = [n for n in names if n not in targets]
    if missing:
        raise ValueError(f"Share layers not found in the {component}: {missing[:3]}")
    attentions = []
    if kind(component) in DENOISERS:
        owners = sorted({owner for owner in map(_attention_owner(model), names) if owner is not None})
        attentions = [(owner, model.get_submodule(owner)) for owner in owners]
        problem = _bypassing(attentions)
        if problem:
            raise ValueError(problem + " Undo that first (unfuse_qkv_projections() / unload_ip_adapter()); any other "
                             "attention processor composes with Share.")
    adapter.targets = [targets[n] for n in names]
    adapter.attentions = attentions
    for name, module in zip(names, adapter.targets):
        module._share_name = name
    adapter.hooks = [
        base_linear(module).register_forward_hook(_delta_hook(adapter, i, base_linear(module))) for i, module in enumerate(adapter.targets)
    ]
    model.share_adapter = adapter


def _attention_owner(model: nn.Module):
    """``name -> `` the name of the attention module (Diffusers `Attention`, Flux's `FluxAttention`, …) the
    layer ``name`` belongs to, or ``None`` for a layer outside attention (a feed-forward, Flux's ``proj_mlp``)."""

    def owner(name: str) -> str | None:
        parts = name.split(".")
        for end in range(len(parts) - 1, 0, -1):
            if isinstance(model.get_submodule(".".join(parts[:end])), _ATTENTION):
                return ".".join(parts[:end])
        return None

    return owner


def _delta_hook(adapter: ShareAdapter, i: int, layer: nn.Module):
    pointwise = is_conv(layer) and is_pointwise(layer)
    patches = is_conv(layer) and not pointwise

    def hook(module, args, output):
        if adapter.enabled:
            if pointwise:  # a 1×1 convolution: the same map on the channel axis
                return adapter.delta(i, args[0].movedim(1, -1), out=output.movedim(1, -1)).movedim(-1, 1)
            if patches:  # a k×k convolution: the map of each output pixel's input patch (im2col)
                x = F.unfold(args[0], layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (B, in·kh·kw, H'W')
                return output + adapter.delta(i, x.mT).mT.reshape(output.shape)
            return adapter.delta(i, args[0], out=output)

    return hook


def _bypassing(attentions) -> str | None:
    for owner, attn in attentions:
        processor = attn.processor
        if isinstance(attn, AttentionModuleMixin) and attn.fused_projections:  # Flux's processor reads the flag, not its class
            return (f"{owner} uses fused QKV projections (to_qkv, {type(processor).__name__}), which bypass the to_q/to_k/to_v "
                    "layers Share adapts, so the selected concepts would be silently wrong.")
        if isinstance(processor, BYPASSING):
            name = type(processor).__name__
            what = f"fused QKV projections ({name})" if name.startswith("Fused") else name
            return (f"{owner} uses {what}, which bypasses the to_q/to_k/to_v/to_out.0 layers Share adapts, so the "
                    "selected concepts would be silently wrong.")
    return None


def bypassed(model: nn.Module) -> str | None:
    """Why Share's deltas would not reach the model's attention now (``None`` when they do).

    Checked on every switch and call, so it looks only at the attention modules `attach` found
    (walking the model would cost milliseconds).
    """
    adapter = getattr(unwrap(model), "share_adapter", None)
    return None if adapter is None else _bypassing(adapter.attentions)


def detach(model: nn.Module) -> None:
    """Undo `attach`: hooks removed, fused weights restored, adapter deleted."""
    model = unwrap(model)
    adapter = getattr(model, "share_adapter", None)
    if adapter is None:
        return
    adapter.unfuse()
    for handle in adapter.hooks:
        handle.remove()
    adapter.hooks, adapter.attentions = [], []
    for module in adapter.targets:
        module.__dict__.pop("_share_name", None)
    del model.share_adapter
