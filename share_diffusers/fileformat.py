"""The Share file's format: what a valid header declares, checked before anything is allocated.

Format version 2 (what is written)::

    basis.<layer>.U            n × k        shared output-side basis
    basis.<layer>.V            d × k        shared input-side basis
    coefficients.<layer>.B     C × k × P    every concept's coefficients (balanced), stacked
    coefficients.<layer>.A     C × k × P

Version 1 (still read) stored ``concepts.<key>.<layer>.B``/``.A``, one small tensor per concept
per layer. Key names never contain "lora", so Diffusers' LoRA loader cannot mistake the file.
Every check raises `_Invalid`, which the reader and the writer turn into `ShareFileError` naming
the file: the writer runs the reader's checks, so it never writes what it would refuse to read.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

FORMAT = "share-diffusers"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
METADATA_KEY = "share_diffusers"
DEFAULT_WEIGHT_NAME = "share.safetensors"

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
MAX_DIM = 1 << 20  # largest layer side, rank or width accepted (the largest real layers are ~10⁴)
MAX_ABS = 1e6  # largest |value| of any tensor: balanced coefficients of real concepts are below ~10²
MAX_EXPANSION = 16  # v1: stacking (zero-padding to the widest concept) may grow the stored coefficients
MIN_STACKED = 1 << 26  # this many times, or to this many (256 MiB of float32), whichever is more
DTYPES = {"F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2)}


class ShareFileError(ValueError):
    """A file that is not a valid Share file (or not one for this model)."""


class ShareFileChangedError(ShareFileError):
    """The file on disk is no longer the one that was read: writing would drop another writer's changes."""


class _Invalid(Exception):
    """A fact a Share file breaks; `read_share` and `save_share` turn it into a `ShareFileError` naming the file."""


def fingerprint(shapes: dict[str, tuple[int, int]]) -> str:
    """A short hash of the adapted module names and shapes: what makes a base model compatible."""
    text = json.dumps(sorted((name, list(shape)) for name, shape in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the header's facts


@dataclass
class _Layout:
    """What a valid Share header declares: every tensor's name and shape, and how to stack them."""

    version: int
    layers: dict[str, tuple[int, int, int]]  # name → (n, d, k)
    widths: list[int]  # p of each concept
    keys: list[str] | None  # v1: each concept's tensor key
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return max(self.widths, default=1)

    def expect(self, name: str, shape: tuple[int, ...]) -> None:
        if name in self.shapes:
            raise _Invalid(f"tensor name {name} is claimed twice (concept keys and layer names overlap).")
        self.shapes[name] = shape


def _int(value, what: str, lo: int, hi: int = MAX_DIM) -> int:
    """An integer in [lo, hi]; booleans, floats (``2e7``) and strings are refused, not converted."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"{what} must be an integer, got {value!r} ({type(value).__name__}).")
    if not lo <= value <= hi:
        raise _Invalid(f"{what} is {value}, outside [{lo}, {hi}].")
    return value


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise _Invalid(f"{what} must be a JSON object, got {type(value).__name__}.")
    return value


def _check_version(header: dict) -> int:
    version = header.get("format_version")
    integer = isinstance(version, int) and not isinstance(version, bool)  # 1.0, True and "2" are not versions
    if integer and version > FORMAT_VERSION:
        raise _Invalid(f"format version {version} is newer than this share-diffusers reads ({FORMAT_VERSION}); upgrade it.")
    if not integer or version not in READABLE_VERSIONS:
        raise _Invalid(f"format version {version!r} is not a Share file version (this share-diffusers reads "
                       f"{', '.join(map(str, READABLE_VERSIONS))}).")
    return version


def _check_layers(base_model) -> dict[str, tuple[int, int]]:
    base_model = _object(base_model, "base_model")
    layers = _object(base_model.get("layers"), "base_model.layers")
    shapes = {}
    for name, shape in layers.items():
        if not name or "lora" in name.lower():
            raise _Invalid(f"layer name {name!r} is empty or contains 'lora', which Share files never use.")
        if not isinstance(shape, list) or len(shape) != 2:
            raise _Invalid(f"layer {name} has shape {shape!r}; expected [n, d].")
        shapes[name] = (_int(shape[0], f"layer {name} n", 1), _int(shape[1], f"layer {name} d", 1))
    if base_model.get("fingerprint") != fingerprint(shapes):
        raise _Invalid(f"base_model.fingerprint {base_model.get('fingerprint')!r} does not match its layers ({fingerprint(shapes)}).")
    return shapes


def _check_ranks(ks, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    ks = _object(ks, "k")
    if set(ks) != set(shapes):
        raise _Invalid(f"k lists layers {sorted(set(ks) ^ set(shapes))[:3]} that base_model.layers does not (or the reverse).")
    return {name: _int(ks[name], f"k of layer {name}", 0, min(n, d)) for name, (n, d) in shapes.items()}


def _check_concept(c, i: int, version: int) -> tuple[str, int, str | None]:
    """One concept entry: its name, width p and (v1) tensor key."""
    c = _object(c, f"concept {i}")
    name = c.get("name")
    if not isinstance(name, str) or not name:
        raise _Invalid(f"concept {i} has name {name!r}; names are non-empty strings.")
    p = _int(c.get("p"), f"p of concept {name!r}", 1)
    trigger = c.get("trigger")
    if trigger is not None and not isinstance(trigger, str):
        raise _Invalid(f"concept {name!r} has trigger {trigger!r}; triggers are strings.")
    errors = c.get("merge_errors", [])
    if not isinstance(errors, list) or not all(
        isinstance(e, (int, float)) and not isinstance(e, bool) and abs(e) <= MAX_ABS for e in errors
    ):
        raise _Invalid(f"concept {name!r} has merge_errors {str(errors)[:80]}; expected a list of finite numbers.")
    key = c.get("key")
    if version == 1 and (not isinstance(key, str) or not key):
        raise _Invalid(f"concept {name!r} has tensor key {key!r}; version 1 files name every concept's tensors by a string key.")
    return name, p, key


def _check_unique(what: str, values: list) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise _Invalid(f"duplicate {what}: {v!r}.")
        seen.add(v)


def _check_header(header) -> _Layout:
    """Every fact of a Share header on its own, then the tensors it declares."""
    header = _object(header, f"the '{METADATA_KEY}' metadata")
    if header.get("format") != FORMAT:
        raise _Invalid(f"header format is {header.get('format')!r}, expected {FORMAT!r}.")
    version = _check_version(header)
    shapes = _check_layers(header.get("base_model"))
    ks = _check_ranks(header.get("k"), shapes)
    if "config" in header:
        _object(header["config"], "config")
    concepts = header.get("concepts")
    if not isinstance(concepts, list):
        raise _Invalid(f"concepts must be a list, got {type(concepts).__name__}.")
    entries = [_check_concept(c, i, version) for i, c in enumerate(concepts)]
    _check_unique("concept names", [e[0] for e in entries])
    if version == 1:
        _check_unique("concept keys", [e[2] for e in entries])
    layout = _Layout(version, {n: (*shapes[n], ks[n]) for n in shapes}, [e[1] for e in entries],
                     [e[2] for e in entries] if version == 1 else None)
    C, P = len(entries), layout.width
    for name, (n, d, k) in layout.layers.items():
        layout.expect(f"basis.{name}.U", (n, k))
        layout.expect(f"basis.{name}.V", (d, k))
        if version == 1:
            for key, p in zip(layout.keys, layout.widths):
                layout.expect(f"concepts.{key}.{name}.B", (k, p))
                layout.expect(f"concepts.{key}.{name}.A", (k, p))
        else:
            layout.expect(f"coefficients.{name}.B", (C, k, P))
            layout.expect(f"coefficients.{name}.A", (C, k, P))
    return layout


# ----------------------------------------------------------------------------- the safetensors container


@dataclass
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _parse_json(text: bytes | str, what: str):
    """JSON with duplicate keys refused (Python keeps the last one silently)."""

    def no_duplicates(pairs):
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen = set()
            raise _Invalid(f"{what} has the key {next(k for k, _ in pairs if k in seen or seen.add(k))!r} twice.")
        return obj

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, a 5000-digit integer, deep nesting
        raise _Invalid(f"{what} is not valid JSON ({type(e).__name__}: {str(e)[:120]}).") from None


def _check_entry(name: str, entry) -> _Entry:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _Invalid(f"not a readable safetensors file (corrupted?): the entry of tensor {name} is {str(entry)[:80]}.")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _Invalid(f"tensor {name} has dtype {dtype!r}; Share tensors are floating point ({', '.join(DTYPES)}).")
    if not isinstance(shape, list) or len(shape) > 8 or not isinstance(offsets, list) or len(offsets) != 2:
        raise _Invalid(f"not a readable safetensors file (corrupted?): tensor {name} has shape {shape!r}, offsets {offsets!r}.")
    shape = tuple(_int(s, f"a dimension of tensor {name}", 0, 1 << 62) for s in shape)
    start, end = (_int(o, f"an offset of tensor {name}", 0, 1 << 62) for o in offsets)
    numel = 1
    for s in shape:
        numel *= s
    if end - start != numel * DTYPES[dtype][1]:
        raise _Invalid(f"not a readable safetensors file (corrupted?): tensor {name} of shape {shape} {dtype} "
                       f"spans {end - start} bytes, not {numel * DTYPES[dtype][1]}.")
    return _Entry(dtype, shape, start, end)


def _check_offsets(entries: dict[str, _Entry], data_bytes: int) -> None:
    """The tensors tile the data section exactly: nothing overlaps, nothing is past the end (truncation)."""
    position = 0
    for name, e in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if e.start != position:
            raise _Invalid(f"not a readable safetensors file (corrupted?): tensor {name} starts at byte {e.start}, not {position}.")
        position = e.end
    if position != data_bytes:
        raise _Invalid(f"not a readable safetensors file (truncated or corrupted?): the tensors take {position} bytes, "
                       f"the file has {data_bytes} after its header.")


def _check_tensors(layout: _Layout, entries: dict[str, tuple[int, ...]]) -> None:
    """The file holds exactly the tensors the header declares, with their shapes, and they stack boundedly."""
    missing = [name for name in layout.shapes if name not in entries]
    if missing:
        raise _Invalid(f"tensor {missing[0]} is missing" + (f" (and {len(missing) - 1} more)." if len(missing) > 1 else "."))
    extra = sorted(set(entries) - set(layout.shapes))
    if extra:
        raise _Invalid(f"unexpected tensors not described by the header: {extra[:3]}")
    for name, shape in layout.shapes.items():
        if tuple(entries[name]) != shape:
            raise _Invalid(f"tensor {name} has shape {tuple(entries[name])}, the header says {shape}.")
    stored = sum(math.prod(shape) for name, shape in layout.shapes.items() if not name.startswith("basis."))
    stacked = sum(2 * len(layout.widths) * k * layout.width for _, _, k in layout.layers.values())  # B and A
    if stacked > max(MAX_EXPANSION * stored, MIN_STACKED):
        raise _Invalid(f"its concepts' widths p (up to {layout.width}) would stack to {stacked} coefficients from "
                       f"{stored} stored; refused (corrupted header?).")


def _check_values(what: str, t: torch.Tensor, names: list[str] | None = None) -> None:
    """Finite and at most MAX_ABS in magnitude (``names``: the concepts along dim 0, to name the culprit)."""
    bad = ~(t.abs() <= MAX_ABS)  # NaN compares false
    if not bad.any():
        return
    where = f" (concept {names[int(bad.flatten(1).any(1).nonzero()[0])]!r})" if names and t.dim() == 3 else ""
    if not torch.isfinite(t).all():
        raise _Invalid(f"tensor {what}{where} contains NaN or Inf.")
    raise _Invalid(f"tensor {what}{where} has values up to {t.abs().max().item():.3g}; refused: |x| ≤ {MAX_ABS:g} "
                   "in any Share file (corrupted or diverged?).")


def _check_padding(what: str, t: torch.Tensor, widths: list[int], names: list[str]) -> None:
    """Columns past each concept's own width p are zero (else the header's p is wrong)."""
    if not t.numel():
        return
    past = torch.arange(t.shape[2])[None, :] >= torch.tensor(widths)[:, None]  # (C, P)
    used = t.abs().amax(1) > 0
    if (used & past).any():
        i = int((used & past).any(1).nonzero()[0])
        raise _Invalid(f"tensor {what}: concept {names[i]!r} has coefficients past its width p = {widths[i]}.")
