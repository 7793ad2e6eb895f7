"""The Share file: one ``.safetensors`` holding the bases, every concept's coefficients and a JSON header.

Tensors (key names never contain "lora", so Diffusers' LoRA loader cannot mistake the file)::

    basis.<layer>.U            n × k      shared output-side basis
    basis.<layer>.V            d × k      shared input-side basis
    concepts.<key>.<layer>.B   k × p_c    concept coefficients (balanced)
    concepts.<key>.<layer>.A   k × p_c

Header metadata ``share_diffusers`` (JSON): format version, base-model fingerprint (adapted module
names and shapes), k per layer, the training configuration, and per concept its name, tensor
key, trigger token, prompt, steps, date and merge-error history.

Writes are atomic (temporary file, fsync, rename): a crash leaves the previous file intact.
Reads validate everything and name the problem; no code is ever executed (safetensors only).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .subspace import LayerShare, ShareState

FORMAT = "share-diffusers"
FORMAT_VERSION = 1
METADATA_KEY = "share_diffusers"
DEFAULT_WEIGHT_NAME = "share.safetensors"


class ShareFileError(ValueError):
    """A file that is not a valid Share file (or not one for this model)."""


def fingerprint(shapes: dict[str, tuple[int, int]]) -> str:
    """A short hash of the adapted module names and shapes: what makes a base model compatible."""
    text = json.dumps(sorted((name, list(shape)) for name, shape in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _trimmed_width(B: torch.Tensor, A: torch.Tensor) -> int:
    """Columns actually used by a concept's balanced coefficients (trailing zero columns dropped)."""
    used = (B.abs().sum(-2) + A.abs().sum(-2)) > 0
    return int(used.nonzero().max()) + 1 if used.any() else 0


def save_share(state: ShareState, path: str | os.PathLike, config: dict | None = None) -> Path:
    """Write ``state`` to ``path`` atomically; returns the path.

    ``config`` (e.g. ``coef_rank``, ``num_extra_directions``, ``basis_rank``, base-model path)
    is stored in the header for the next training run.
    """
    path = Path(path)
    tensors, concepts = {}, []
    for name, layer in state.layers.items():
        if "lora" in name.lower():
            raise ShareFileError(f"Layer name {name!r} contains 'lora', which Share files never use.")
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
        "format_version": FORMAT_VERSION,
        "base_model": {"fingerprint": fingerprint(state.shapes), "layers": {n: list(s) for n, s in state.shapes.items()}},
        "k": {name: layer.k for name, layer in state.layers.items()},
        "config": config or {},
        "concepts": concepts,
    }
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(header)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the result over ``path`` (fsynced; never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def resolve_path(path: str | os.PathLike, weight_name: str | None = None) -> Path:
    """A Share file from a file path or a directory (+ ``weight_name``, default ``share.safetensors``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected a path to a Share file, got {type(path).__name__}.")
    path = Path(path)
    if path.is_dir():
        path = path / (weight_name or DEFAULT_WEIGHT_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"No Share file at {path}.")
    return path


def read_share(path: str | os.PathLike, weight_name: str | None = None) -> tuple[ShareState, dict]:
    """Read and validate a Share file; returns the state and its header."""
    path = resolve_path(path, weight_name)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for bad files
        raise ShareFileError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e
    if METADATA_KEY not in metadata:
        if any("lora" in k for k in tensors):
            raise ShareFileError(f"{path} is a LoRA file, not a Share file; fold it in with share_diffusers.loras_to_share().")
        raise ShareFileError(f"{path} has no '{METADATA_KEY}' header metadata: it is not a Share file.")
    try:
        header = json.loads(metadata[METADATA_KEY])
        return _build_state(header, tensors, path), header
    except ShareFileError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ShareFileError(f"{path}: malformed Share header ({type(e).__name__}: {e}).") from e


def _build_state(header: dict, tensors: dict[str, torch.Tensor], path: Path) -> ShareState:
    def bad(msg):
        return ShareFileError(f"{path}: {msg}")

    if header.get("format") != FORMAT:
        raise bad(f"header format is {header.get('format')!r}, expected {FORMAT!r}.")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise bad(f"format version {header['format_version']} is newer than this share-diffusers reads ({FORMAT_VERSION}).")

    def tensor(key, shape):
        if key not in tensors:
            raise bad(f"tensor {key} is missing.")
        t = tensors.pop(key)
        if not t.is_floating_point():
            raise bad(f"tensor {key} has dtype {t.dtype}; Share tensors are floating point.")
        if tuple(t.shape) != tuple(shape):
            raise bad(f"tensor {key} has shape {tuple(t.shape)}, expected {tuple(shape)}.")
        if not torch.isfinite(t).all():
            raise bad(f"tensor {key} contains NaN or Inf.")
        return t.to(torch.float32, copy=True)  # never keep the file memory-mapped (an in-place overwrite would SIGBUS)

    layers_meta = header["base_model"]["layers"]
    concepts = header["concepts"]
    names = [c["name"] for c in concepts]
    if len(set(names)) != len(names):
        raise bad("duplicate concept names.")
    layers = {}
    for name, (n, d) in layers_meta.items():
        k = int(header["k"][name])
        U, V = tensor(f"basis.{name}.U", (n, k)), tensor(f"basis.{name}.V", (d, k))
        p = max([int(c["p"]) for c in concepts] + [1])
        B, A = torch.zeros(len(concepts), k, p), torch.zeros(len(concepts), k, p)
        for i, c in enumerate(concepts):
            B[i, :, : c["p"]] = tensor(f"concepts.{c['key']}.{name}.B", (k, c["p"]))
            A[i, :, : c["p"]] = tensor(f"concepts.{c['key']}.{name}.A", (k, c["p"]))
        layers[name] = LayerShare(U, V, B, A)
    if tensors:
        raise bad(f"unexpected tensors not described by the header: {sorted(tensors)[:3]}")
    meta = [{k: v for k, v in c.items() if k not in ("key", "p")} for c in concepts]
    return ShareState(layers, meta)


CARD_MARKER = "<!-- share-diffusers model card -->"


def write_model_card(share_path: str | os.PathLike, state: ShareState, config: dict | None = None) -> Path:
    """Write the model card (``README.md``) beside a Share file: its concepts, triggers and history.

    A ``README.md`` that share-diffusers did not write is never replaced; the card then goes to
    ``<name>.README.md``.
    """
    share_path, config = Path(share_path), config or {}
    rows = "\n".join(
        f"| {c['name']} | `{c.get('trigger') or '-'}` | {c.get('date', '-')} | {c.get('steps', '-')} | "
        f"{', '.join(f'{e:.4f}' for e in c.get('merge_errors', []))} |"
        for c in state.concepts
    )
    example = state.concepts[-1]["name"] if state.concepts else "name"
    card = f"""{CARD_MARKER}
# Share file `{share_path.name}`

{len(state.concepts)} concepts in one shared low-rank subspace (Share, arXiv 2602.06043), made with
share-diffusers for the base model `{config.get('base_model', 'unknown')}`: up to
{config.get('basis_rank', '?')} shared directions per layer, each concept rank {config.get('coef_rank', '?')} per layer.

| concept | trigger | learned | steps | merge error after each merge |
|---|---|---|---|---|
{rows}

```python
import share_diffusers  # adds pipe.load_share & co. to every DiffusionPipeline
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{config.get('base_model', 'path/to/base')}")
pipe.load_share("{share_path.name}")
pipe.set_share_concepts("{example}")  # or {{"a": 0.5, "b": 0.5}}, or a list with one per prompt
```
"""
    path = share_path.parent / "README.md"
    if path.exists() and not path.read_text(errors="replace").startswith(CARD_MARKER):
        path = share_path.with_name(share_path.stem + ".README.md")
    atomic_write(path, lambda tmp: Path(tmp).write_text(card))
    return path
