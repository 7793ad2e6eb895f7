"""The version-1 Share file writer, as share_diffusers/io.py had it before format version 2.

Kept (here, not in the library, which no longer writes v1) so the tests can check that files of
the old layout still load, and benchmarks/file_scale.py can time that layout against version 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from share_diffusers.io import FORMAT, METADATA_KEY, fingerprint
from share_diffusers.subspace import ShareState


def _trimmed_width(B: torch.Tensor, A: torch.Tensor) -> int:
    """Columns actually used by a concept's balanced coefficients (trailing zero columns dropped)."""
    used = (B.abs().sum(-2) + A.abs().sum(-2)) > 0
    return int(used.nonzero().max()) + 1 if used.any() else 0


def save_share_v1(state: ShareState, path: str | os.PathLike, config: dict | None = None) -> Path:
    """Write ``state`` in the version-1 layout: one k × p tensor per concept per layer."""
    path = Path(path)
    tensors, concepts = {}, []
    for name, layer in state.layers.items():
        tensors[f"basis.{name}.U"] = layer.U
        tensors[f"basis.{name}.V"] = layer.V
    for c, meta in enumerate(state.concepts):
        key = f"c{c:04d}"
        p = max([_trimmed_width(l.B[c], l.A[c]) for l in state.layers.values()] + [1])
        for name, layer in state.layers.items():
            tensors[f"concepts.{key}.{name}.B"] = layer.B[c, :, :p]
            tensors[f"concepts.{key}.{name}.A"] = layer.A[c, :, :p]
        concepts.append(dict(meta, key=key, p=p))
    header = {
        "format": FORMAT,
        "format_version": 1,
        "base_model": {"fingerprint": fingerprint(state.shapes), "layers": {n: list(s) for n, s in state.shapes.items()}},
        "k": {name: layer.k for name, layer in state.layers.items()},
        "config": config or {},
        "concepts": concepts,
    }
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, path, metadata={"format": "pt", METADATA_KEY: json.dumps(header)})
    return path
