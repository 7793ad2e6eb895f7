"""The Share file: one ``.safetensors`` holding the bases, every concept's coefficients and a JSON header.

Tensors, format version 2 (key names never contain "lora", so Diffusers' LoRA loader cannot
mistake the file)::

    basis.<layer>.U            n × k        shared output-side basis
    basis.<layer>.V            d × k        shared input-side basis
    coefficients.<layer>.B     C × k × P    every concept's coefficients (balanced), stacked
    coefficients.<layer>.A     C × k × P

Four tensors per layer whatever the number of concepts C: the file is the in-memory layout of
`LayerShare`, so reading and writing cost a few large copies. Version 1 stored one ``k × p``
tensor per concept per layer (``concepts.<key>.<layer>.B``/``.A``), C × L small tensors, and took
14 s to read and 20 s to write at 1000 concepts; it is still read, never written. Concept ``i``
uses the first ``p_i`` of the P columns (``p`` in its header entry, P the largest); the others
are zero.

Header metadata ``share_diffusers`` (JSON): format version, base-model fingerprint (adapted module
names and shapes), k per layer, the training configuration, and per concept its name, width p,
trigger token, prompt, steps, date and merge-error history.

Reads are bounded and validated before anything is allocated. The safetensors header (8-byte
length, JSON) is parsed here: every size it declares is checked against the Share header and
against the file's length before a byte of tensor data is read, so reading never allocates more
than a small multiple of the file's own size, and a few changed header bytes cannot ask for
gigabytes. Every malformed file raises `ShareFileError` naming the problem; values are bounded
too (finite, ``|x| ≤ MAX_ABS``). No code is ever executed (safetensors only). ``read_share``
returns the header with ``file_token``: the SHA-256 of the bytes it read.

Writes are atomic (temporary file, fsync, rename): a crash leaves the previous file intact. The
file keeps its permission bits (a new one gets the umask's), a failed write removes its
temporary, and ``save_share`` sweeps temporaries a killed writer left. The writer validates with
the reader's own checks, so it never writes a file it would refuse to read.

Concurrent writers (two training runs, the web UI) must not drop each other's concepts. Every
``save_share`` holds an advisory lock (``fcntl.flock`` on the sidecar ``<file>.lock``, which is
left in place; without fcntl, writes go unlocked with a warning), waits for it at most
``timeout`` seconds, then raises `ShareFileLockedError`. Two ways to update a file safely:

    with locked(path) as current:            # other writers wait; the file is read under the lock
        state = current.state or ShareState.empty(shapes)    # None when there is no file yet
        state, report = state.merge({name: factors}, meta={name: meta})
        current.save(state, config)          # then e.g. write_model_card(path, state, config)

or, when the work between reading and writing is long (training), without holding the lock::

    state, header = read_share(path)         # or token = file_token(path) when there is no file
    ...                                      # train for minutes
    save_share(new_state, path, config, expected=header["file_token"])

where `ShareFileChangedError` means another writer saved the file in between: take the lock,
re-read, merge the new concept into what is there now, save.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from .subspace import LayerShare, ShareState

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, see _flock
    fcntl = None

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
ABSENT = "absent"  # the file token of a path with no file
LOCK_TIMEOUT = 120.0  # seconds a writer waits for another one to finish


class ShareFileError(ValueError):
    """A file that is not a valid Share file (or not one for this model)."""


class ShareFileChangedError(ShareFileError):
    """The file on disk is no longer the one that was read: writing would drop another writer's changes."""


class ShareFileLockedError(TimeoutError):
    """Another writer held the Share file's lock for longer than the timeout."""


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


# ----------------------------------------------------------------------------- reading


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
    """Read and validate a Share file (version 1 or 2); returns the state and its header.

    The header gains ``file_token`` (SHA-256 of the file), for ``save_share(..., expected=)``.
    """
    path = resolve_path(path, weight_name)
    try:
        with open(path, "rb") as f:
            return _read(f)
    except _Invalid as e:
        raise ShareFileError(f"{path}: {e}") from None
    except OSError as e:
        raise ShareFileError(f"{path} is not a readable safetensors file: {e}") from e


def _read(f) -> tuple[ShareState, dict]:
    size = os.fstat(f.fileno()).st_size
    length = f.read(8)
    n = int.from_bytes(length, "little") if len(length) == 8 else -1
    if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
        raise _Invalid(f"not a readable safetensors file (truncated or corrupted?): a header of {n} bytes in a file of {size}.")
    head = f.read(n)
    table = _object(_parse_json(head, "the safetensors header"), "the safetensors header")
    metadata = _object(table.pop("__metadata__", {}), "the safetensors metadata")
    if not all(isinstance(v, str) for v in metadata.values()):
        raise _Invalid("not a readable safetensors file (corrupted?): metadata values must be strings.")
    if METADATA_KEY not in metadata:
        if any("lora" in k for k in table):
            raise _Invalid("this is a LoRA file, not a Share file; fold it in with share_diffusers.loras_to_share().")
        raise _Invalid(f"no '{METADATA_KEY}' header metadata: it is not a Share file.")
    entries = {name: _check_entry(name, e) for name, e in table.items()}
    _check_offsets(entries, size - 8 - n)
    header = _parse_json(metadata[METADATA_KEY], "the Share header")
    layout = _check_header(header)
    _check_tensors(layout, {name: e.shape for name, e in entries.items()})

    # only now is anything allocated: the data section, whose size the checks above tie to the header
    data = torch.empty(size - 8 - n, dtype=torch.uint8)
    if f.readinto(memoryview(data.numpy())) != data.numel():
        raise _Invalid("not a readable safetensors file: it changed (shrank) while being read.")
    token = hashlib.sha256(length + head)
    token.update(memoryview(data.numpy()))

    def tensor(name: str) -> torch.Tensor:
        e = entries[name]
        dtype, itemsize = DTYPES[e.dtype]
        raw = data[e.start : e.end]
        return (raw if e.start % itemsize == 0 else raw.clone()).view(dtype).reshape(e.shape)

    names = [c["name"] for c in header["concepts"]]
    C, P = len(names), layout.width
    layers = {}
    for lname, (_n, _d, k) in layout.layers.items():
        U, V = tensor(f"basis.{lname}.U"), tensor(f"basis.{lname}.V")
        if layout.version == 1:
            B, A = torch.zeros(C, k, P), torch.zeros(C, k, P)
            for i, (key, p) in enumerate(zip(layout.keys, layout.widths)):
                B[i, :, :p] = tensor(f"concepts.{key}.{lname}.B")
                A[i, :, :p] = tensor(f"concepts.{key}.{lname}.A")
        else:
            B, A = tensor(f"coefficients.{lname}.B"), tensor(f"coefficients.{lname}.A")
        for what, t in (("U", U), ("V", V), ("B", B), ("A", A)):
            _check_values(f"{what} of layer {lname}", t, names)
        _check_padding(f"coefficients.{lname}.B", B, layout.widths, names)
        _check_padding(f"coefficients.{lname}.A", A, layout.widths, names)
        # float32 copies: never keep views of the file's bytes (nor memory-map it: an in-place overwrite would SIGBUS)
        layers[lname] = LayerShare(*(t.to(torch.float32, copy=True) for t in (U, V, B, A)))
    meta = [{k: v for k, v in c.items() if k not in ("key", "p")} for c in header["concepts"]]
    header.setdefault("config", {})
    header["file_token"] = token.hexdigest()
    return ShareState(layers, meta), header


# ----------------------------------------------------------------------------- writing


def _widths(state: ShareState) -> list[int]:
    """Each concept's width p: the columns it uses in any layer (trailing zero columns dropped), at least 1."""
    width = torch.ones(len(state.concepts), dtype=torch.long)
    for layer in state.layers.values():
        if layer.B.shape[-1]:
            used = ((layer.B.abs().sum(-2) + layer.A.abs().sum(-2)) > 0).cpu()  # (C, p)
            width = torch.maximum(width, (used * torch.arange(1, used.shape[1] + 1)).amax(-1))
    return width.tolist()


def _check_state(state: ShareState) -> None:
    """In memory: every layer's U, V, B, A fit each other and the concept list (the file checks do the rest)."""
    C = len(state.concepts)
    for name, layer in state.layers.items():
        U, V, B, A = (tuple(t.shape) for t in (layer.U, layer.V, layer.B, layer.A))
        if len(U) != 2 or len(V) != 2 or len(B) != 3 or B != A or not U[1] == V[1] == B[1] or B[0] != C:
            raise _Invalid(f"layer {name}: U {U}, V {V}, B {B}, A {A} do not fit each other and {C} concepts.")
        for what, t in (("U", layer.U), ("V", layer.V), ("B", layer.B), ("A", layer.A)):
            _check_values(f"{what} of layer {name}", t.detach(), state.names if what in "BA" else None)


def _encode(state: ShareState, config: Mapping | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The version-2 tensors and metadata of ``state``, checked as the reader will check them."""
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {type(config).__name__}.")
    _check_state(state)
    widths = _widths(state)
    P = max(widths, default=1)
    tensors = {}
    for name, layer in state.layers.items():
        tensors[f"basis.{name}.U"] = layer.U
        tensors[f"basis.{name}.V"] = layer.V
        for what, t in (("B", layer.B), ("A", layer.A)):
            t = t[:, :, :P] if t.shape[2] >= P else torch.nn.functional.pad(t, (0, P - t.shape[2]))
            tensors[f"coefficients.{name}.{what}"] = t
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": {"fingerprint": fingerprint(state.shapes), "layers": {n: list(s) for n, s in state.shapes.items()}},
        "k": {name: layer.k for name, layer in state.layers.items()},
        "config": dict(config or {}),
        "concepts": [dict({k: v for k, v in c.items() if k != "key"}, p=p) for c, p in zip(state.concepts, widths)],
    }
    text = json.dumps(header)
    _check_tensors(_check_header(_parse_json(text, "the Share header")), {k: tuple(t.shape) for k, t in tensors.items()})
    tensors = {k: t.detach().to("cpu", torch.float32).contiguous().clone() for k, t in tensors.items()}
    return tensors, {"format": "pt", METADATA_KEY: text}


def file_token(path: str | os.PathLike) -> str:
    """What identifies the file now at ``path``: the SHA-256 of its bytes, or ``ABSENT``."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        return ABSENT
    return h.hexdigest()


def _check_unchanged(path: Path, expected: str) -> None:
    if not isinstance(expected, str):
        raise TypeError(f"expected must be a file token (read_share's header['file_token'] or file_token()), got {expected!r}.")
    now = file_token(path)
    if now == expected:
        return
    what = ("was deleted" if now == ABSENT else "was created by another writer" if expected == ABSENT
            else "was changed by another writer")
    raise ShareFileChangedError(
        f"{path} {what} since it was read (expected {expected[:12]}, found {now[:12]}); not overwriting it, which "
        "would drop that writer's changes. Re-read it (share_diffusers.io.locked) and merge again."
    )


def save_share(
    state: ShareState,
    path: str | os.PathLike,
    config: Mapping | None = None,
    *,
    expected: str | None = None,
    timeout: float = LOCK_TIMEOUT,
) -> Path:
    """Write ``state`` to ``path`` atomically (format version 2), under the file's lock; returns the path.

    ``config`` (e.g. ``coef_rank``, ``num_extra_directions``, ``basis_rank``, base-model path)
    is stored in the header for the next training run. With ``expected`` (a file token, from
    ``read_share``'s ``header["file_token"]`` or `file_token`), the file is written only if it is
    still that file, else `ShareFileChangedError`. `ShareFileLockedError` after ``timeout`` s.
    """
    path = Path(os.path.realpath(path))  # through a symlink, replace its target, not the link
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; save the Share file to a file path (e.g. {path / DEFAULT_WEIGHT_NAME}).")
    try:
        tensors, metadata = _encode(state, config)
    except _Invalid as e:
        raise ShareFileError(f"Cannot save {path}: {e}") from None
    with _lock(path, timeout):
        if expected is not None:
            _check_unchanged(path, expected)
        _sweep_temporaries(path)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def save_file(tensors: dict[str, torch.Tensor], filename: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, but into ``filename`` itself: safetensors' own writes a hidden
    temporary ``.tmpXXXXXX`` (mode 0600) beside it and renames that, which a killed writer leaves behind."""
    with open(filename, "wb") as f:
        f.write(safetensors.torch.save(tensors, metadata=metadata))


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def _sweep_temporaries(path: Path) -> None:
    """Remove the temporaries of writers killed mid-write (SIGKILL runs no cleanup). Only under the lock."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{16}}\.tmp")
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if pattern.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the result over ``path`` (fsynced; never half-written).

    The file keeps its permission bits; a new one gets the umask's. On any failure (also
    KeyboardInterrupt) the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = None
    tmp, created = _temporary(path), False
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as to any new file
        created = True
        if mode is None:
            mode = os.stat(tmp).st_mode & 0o7777
        write(str(tmp))
        os.chmod(tmp, mode)  # in case ``write`` replaced the file (safetensors' own save_file makes it 0600)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        created = False
    finally:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ----------------------------------------------------------------------------- concurrent writers


_held = threading.local()  # this thread's locks: path → depth (flock would block on a second fd of ours)


def lock_path(path: str | os.PathLike) -> Path:
    """The sidecar lock file of a Share file: ``<file>.lock`` (kept; deleting it would break the lock)."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def _lock(path: Path, timeout: float = LOCK_TIMEOUT):
    """Hold the advisory lock of ``path`` (re-entrant within a thread)."""
    key = str(lock_path(os.path.realpath(path)))  # one lock however the path is spelled (symlinks, "..")
    held = getattr(_held, "depth", None)
    if held is None:
        held = _held.depth = {}
    if held.get(key):
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _flock(fd, key, path, timeout)
        held[key] = 1
        try:
            yield
        finally:
            held.pop(key, None)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _flock(fd: int, key: str, path: Path, timeout: float) -> None:
    if fcntl is None:
        warnings.warn(f"No fcntl on this platform: {path} is written without a lock (concurrent writers are caught "
                      "only by save_share(expected=...)).", RuntimeWarning, stacklevel=4)
        return
    deadline, pause = time.monotonic() + timeout, 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ShareFileLockedError(
                    f"{path} is being written by another process (it has held {key} for more than {timeout:g} s); "
                    "try again when it has finished. Nothing was written."
                ) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.25)
        except OSError as e:  # a file system without flock (some network mounts)
            warnings.warn(f"Cannot lock {key} ({e}); writing {path} without a lock.", RuntimeWarning, stacklevel=4)
            return


@dataclass
class LockedShareFile:
    """A Share file held under its lock: what it holds now, and a ``save`` that keeps the lock's promise."""

    path: Path
    state: ShareState | None  # None: no file yet
    header: dict | None
    token: str  # file token of what was read (ABSENT when there was no file)

    def save(self, state: ShareState, config: Mapping | None = None) -> Path:
        """Write ``state`` (still under the lock); refuses if the file changed since it was read here."""
        save_share(state, self.path, config, expected=self.token)
        self.state, self.token = state, file_token(self.path)
        return self.path


@contextlib.contextmanager
def locked(path: str | os.PathLike, timeout: float = LOCK_TIMEOUT):
    """Lock ``path``, read what it holds now, and yield a `LockedShareFile` to merge into and save.

    Other writers (``save_share``, other ``locked`` blocks, in any process) wait until the block
    ends; raises `ShareFileLockedError` after ``timeout`` s, `ShareFileError` if the file is invalid.
    """
    path = Path(path)
    with _lock(path, timeout):
        if path.exists():
            state, header = read_share(path)
            yield LockedShareFile(path, state, header, header["file_token"])
        else:
            yield LockedShareFile(path, None, None, ABSENT)


# ----------------------------------------------------------------------------- model card


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
