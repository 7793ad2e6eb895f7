"""Reading and writing the Share file: one ``.safetensors`` holding the bases, every concept's
coefficients and a JSON header (layout and checks: `fileformat`; locks: `locking`; model card: `card`).

Format version 2 stores four tensors per layer whatever the number of concepts C (the in-memory
layout of `LayerShare`), so reading and writing cost a few large copies; version 1 (one small
tensor per concept per layer, 14 s to read and 20 s to write at 1000 concepts) is still read,
never written.

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
import io
import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from .fileformat import (
    DEFAULT_WEIGHT_NAME,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    METADATA_KEY,
    ShareFileChangedError,
    ShareFileError,
    _check_entry,
    _check_header,
    _check_offsets,
    _check_padding,
    _check_tensors,
    _check_values,
    _Invalid,
    _object,
    _parse_json,
    fingerprint,
)
from .locking import LOCK_TIMEOUT, ShareFileLockedError, hold
from .subspace import LayerShare, ShareState

__all__ = [  # the file's API in one place (errors and format constants live in fileformat / locking)
    "ABSENT", "DEFAULT_WEIGHT_NAME", "FORMAT_VERSION", "LOCK_TIMEOUT", "METADATA_KEY", "LockedShareFile", "ShareFileChangedError",
    "ShareFileError", "ShareFileLockedError", "atomic_write", "file_token", "fingerprint", "locked", "read_share", "read_share_bytes",
    "resolve_path", "save_share",
]

ABSENT = "absent"  # the file token of a path with no file


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


def read_share_bytes(data: bytes, source: str = "<in-memory Share file>") -> tuple[ShareState, dict]:
    """`read_share` of a Share file's bytes (e.g. an upload, or a blob store's object), with the same checks."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"Expected the bytes of a Share file, got {type(data).__name__}.")
    try:
        return _read(io.BytesIO(data))
    except _Invalid as e:
        raise ShareFileError(f"{source}: {e}") from None


def _read(f) -> tuple[ShareState, dict]:
    size = f.getbuffer().nbytes if isinstance(f, io.BytesIO) else os.fstat(f.fileno()).st_size
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
    with hold(path, timeout):
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
    with hold(path, timeout):
        if path.exists():
            state, header = read_share(path)
            yield LockedShareFile(path, state, header, header["file_token"])
        else:
            yield LockedShareFile(path, None, None, ABSENT)
