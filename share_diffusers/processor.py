"""Attaching Share to models: where the delta enters a Diffusers UNet or a transformers CLIP encoder.

* `ShareAdapter` is an ``nn.Module`` registered on the model as ``model.share_adapter`` (so it
  follows ``.to()`` and offloading). It holds, on the model's device, every adapted layer's basis,
  the coefficient bank of all concepts, and the current selection as ``(G, L, k, k)`` cores.
  Switching concepts rewrites the cores in place; nothing else moves.
* `ShareAttnProcessor` is the default attention processor plus the Share delta on ``to_q``,
  ``to_k``, ``to_v`` and ``to_out.0``. The UNet's own Linear modules stay in place, so a PEFT LoRA
  wrapping them still works and stacks with Share.
* Text encoders have no processor API, so their ``q/k/v/out_proj`` get a forward hook instead.

This layer knows module structure, not files: it is given `LayerShare`s and a selection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import Tensor, nn

from .subspace import LayerShare, NewConcept, dense_delta, share_delta
from .targets import PROJECTIONS, base_linear, find_targets, kind

SUPPORTED_PROCESSORS = (AttnProcessor2_0, AttnProcessor)


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
        self.fused = False  # the selection is folded into the weights
        self.trainer: NewConcept | None = None
        self.targets: list[nn.Module] = []  # the adapted modules, in layer order (plain list: not registered)
        self.processors: list[tuple[str, nn.Module, ShareAttnProcessor]] = []  # (name, Attention, ours)
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
        return (self.active and not self.fused) or self.trainer is not None

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
            weight += self.dense(i).to(weight)
        self.fused = True

    @torch.no_grad()
    def unfuse(self) -> None:
        if not self.fused:
            return
        for i, (module, original) in enumerate(zip(self.targets, self._saved)):
            weight = base_linear(module).weight
            expected = original.to(weight.device) + self.dense(i).to(weight)
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


class ShareAttnProcessor:
    """`AttnProcessor2_0` with the Share delta added to ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``.

    ``slots`` maps a projection name to its layer index in the adapter. When Share is inactive
    the original processor runs unchanged, so outputs are bit-identical to the base model's.
    """

    def __init__(self, adapter: ShareAdapter, slots: dict[str, int], original):
        self.adapter = adapter
        self.slots = slots
        self.original = original

    def _project(self, name: str, module: nn.Module, x: Tensor) -> Tensor:
        y = module(x)
        i = self.slots.get(name)
        return y if i is None else self.adapter.delta(i, x, out=y)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if not self.adapter.enabled:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = self._project("to_q", attn.to_q, hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = self._project("to_k", attn.to_k, encoder_hidden_states)
        value = self._project("to_v", attn.to_v, encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states = self._project("to_out.0", attn.to_out[0], hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attach(model: nn.Module, component: str, names: list[str], adapter: ShareAdapter) -> None:
    """Register ``adapter`` on ``model`` (the pipeline's ``component``) and route its layers ``names``
    (module names, in adapter order) through it.

    Raises before changing anything if a layer is missing or an attention module uses a
    processor Share cannot extend (IP-Adapter, fused QKV, …): silently dropping either would
    give wrong images.
    """
    targets = find_targets(model, component)
    missing = [n for n in names if n not in targets]
    if missing:
        raise ValueError(f"Share layers not found in the {component}: {missing[:3]}")
    adapter.targets = [targets[n] for n in names]
    for name, module in zip(names, adapter.targets):
        module._share_name = name
    if kind(component) == "unet":
        by_attention: dict[str, dict[str, int]] = {}
        for i, name in enumerate(names):
            owner, proj = _split_projection(name)
            by_attention.setdefault(owner, {})[proj] = i
        for owner in by_attention:
            attn = model.get_submodule(owner)
            if getattr(attn, "fused_projections", False) or not isinstance(attn.processor, SUPPORTED_PROCESSORS):
                raise ValueError(
                    f"{owner} uses {type(attn.processor).__name__}"
                    + (" with fused QKV projections" if getattr(attn, "fused_projections", False) else "")
                    + "; Share extends the default attention processors only. Load Share before changing "
                    "attention processors (or undo that change, e.g. unfuse_qkv_projections / unload_ip_adapter)."
                )
        for owner, slots in by_attention.items():
            attn = model.get_submodule(owner)
            processor = ShareAttnProcessor(adapter, slots, attn.processor)
            attn.set_processor(processor)
            adapter.processors.append((owner, attn, processor))
    else:
        adapter.hooks = [
            base_linear(module).register_forward_hook(_text_hook(adapter, i)) for i, module in enumerate(adapter.targets)
        ]
    model.share_adapter = adapter


def _split_projection(name: str) -> tuple[str, str]:
    for proj in PROJECTIONS["unet"]:
        if name.endswith("." + proj):
            return name[: -len(proj) - 1], proj
    raise ValueError(f"{name} is not an attention projection ({', '.join(PROJECTIONS['unet'])}).")


def _text_hook(adapter: ShareAdapter, i: int):
    def hook(module, args, output):
        if adapter.enabled:
            return adapter.delta(i, args[0], out=output)

    return hook


def replaced_processors(model: nn.Module) -> list[str]:
    """Attention modules whose Share processor was replaced since `attach` (empty when intact).

    Checked on every concept switch, so it only compares the processors `attach` installed
    (walking the model, e.g. through ``attn_processors``, would cost milliseconds).
    """
    adapter = getattr(model, "share_adapter", None)
    if adapter is None:
        return []
    return sorted(name for name, attn, processor in adapter.processors if attn.processor is not processor)


def detach(model: nn.Module) -> None:
    """Undo `attach`: original processors back, hooks removed, adapter deleted."""
    adapter = getattr(model, "share_adapter", None)
    if adapter is None:
        return
    adapter.unfuse()
    for _, attn, processor in adapter.processors:
        if attn.processor is processor:
            attn.set_processor(processor.original)
    adapter.processors = []
    for handle in getattr(adapter, "hooks", []):
        handle.remove()
    for module in adapter.targets:
        module.__dict__.pop("_share_name", None)
    del model.share_adapter
