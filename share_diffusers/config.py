"""`ShareConfig`: the settings of a Share file, in one vocabulary, stored in the file and read back.

The names are the flags users see (``learn_concept.py --basis_rank 8``, ``compress_loras.py``);
the maths (`subspace`) uses the paper's notation, given beside each field. A file remembers how it
was made, so the next writer continues it the same way instead of silently re-merging it under the
command line's defaults.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path, PurePath

# Spellings written by older versions of share-diffusers, read as today's names.
_OLD_NAMES = {"energy": "basis_energy", "k_max": "basis_rank", "p": "coef_rank", "phi": "num_extra_directions"}


@dataclass(frozen=True)
class ShareConfig:
    # k_max: the most shared directions per layer and side. 8 with the post-merge fine-tune kept every concept of a
    # 50-concept run at 0.97x its own LoRA and stored 1.9x less than 16 without it (README, continual learning at scale)
    basis_rank: int = 8
    basis_energy: float | None = None  # keep the fewest directions holding this share of the energy (≤ basis_rank)
    # instead of basis_energy: this many directions in all, over every layer, where the concepts need them (≤ basis_rank each)
    basis_budget: int | None = None
    coef_rank: int = 1  # p: the rank of a new concept's delta per layer
    num_extra_directions: int = 2  # φ: temporary new directions per side while a concept trains
    base_model: str | None = None  # the base model as the user named it (a Hub id or the path they gave)
    # the layers a new file adapts, as PEFT's target_modules (names or one regex); None: targets.py's defaults
    target_modules: tuple[str, ...] | str | None = None  # of the UNet / transformer
    text_encoder_target_modules: tuple[str, ...] | str | None = None  # of the text encoders (with --train_text_encoder)
    conv_layers: tuple[str, ...] = ()  # the file's layers that are 1×1 convolutions in the base (a LoRA export writes them 4-D)
    conv_kernels: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # its k×k convolutions: (kh, kw)

    def __post_init__(self):
        for name in ("target_modules", "text_encoder_target_modules", "conv_layers"):
            value = getattr(self, name)
            if value is None or (isinstance(value, str) and name != "conv_layers"):  # unset, or one regex
                continue
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{name} must be a list of non-empty module names, got {value!r}.")
            object.__setattr__(self, name, tuple(value))  # JSON gives lists; a frozen config holds tuples
        kernels = self.conv_kernels
        if not isinstance(kernels, dict) or not all(
            isinstance(n, str) and n and isinstance(k, (list, tuple)) and len(k) == 2 and all(_is_int(v, 1) for v in k)
            for n, k in kernels.items()
        ):
            raise ValueError(f"conv_kernels must map layer names to [kh, kw] kernel sizes, got {kernels!r}.")
        object.__setattr__(self, "conv_kernels", {n: tuple(k) for n, k in kernels.items()})
        for name in ("basis_rank", "coef_rank"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("num_extra_directions", self.num_extra_directions, minimum=0)
        energy = self.basis_energy
        if energy is not None and (isinstance(energy, bool) or not isinstance(energy, numbers.Real)
                                   or not math.isfinite(energy) or not 0 < energy <= 1):
            raise ValueError(f"basis_energy must be a number in (0, 1] or None, got {energy!r}.")
        if self.basis_budget is not None:
            _check_int("basis_budget", self.basis_budget, minimum=1)
            if energy is not None:
                raise ValueError("basis_budget and basis_energy both choose how many directions to keep: give one.")
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise ValueError(f"base_model must be a string, got {type(self.base_model).__name__}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> ShareConfig:
        """The config stored in a file's header (``{}`` or ``None``: the defaults). Old spellings are
        accepted; unknown keys are ignored (a newer writer's extras); bad values raise `ValueError`."""
        if values is None:
            return cls()
        if not isinstance(values, dict):
            raise ValueError(f"A Share config is a JSON object, got {type(values).__name__}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        known = {}
        for key, value in values.items():
            key = _OLD_NAMES.get(key, key)
            if key in fields:
                known[key] = value
        return cls(**known)

    def with_convolutions(self, kernels: dict[str, tuple[int, int]]) -> ShareConfig:
        """These settings with the file's convolution layers, ``{layer: (kh, kw)}`` (`targets.conv_kernels`):
        1×1 ones in ``conv_layers`` (the field older files have), the others in ``conv_kernels``."""
        return self.replace(conv_layers=sorted(n for n, k in kernels.items() if tuple(k) == (1, 1)),
                            conv_kernels={n: k for n, k in sorted(kernels.items()) if tuple(k) != (1, 1)})

    def merge_kwargs(self) -> dict:
        """The arguments of `ShareState.merge` / `remove` that these settings fix."""
        return {"k_max": self.basis_rank, "energy": self.basis_energy, "budget": self.basis_budget}

    def replace(self, **changes) -> ShareConfig:
        return dataclasses.replace(self, **changes)


def _is_int(value, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum


def _check_int(name: str, value, minimum: int) -> None:
    if not _is_int(value, minimum):
        raise ValueError(f"{name} must be a whole number ≥ {minimum}, got {value!r}.")


def stored_config(header: dict) -> ShareConfig:
    """The settings a Share file's header stores. A file that stores no ``basis_rank`` (written by
    hand, or by an old version) keeps the size its basis has: its largest k."""
    values = dict(header.get("config") or {})
    if "basis_rank" not in values and "k_max" not in values and header.get("k"):
        values["basis_rank"] = max(1, max(int(k) for k in header["k"].values()))
    return ShareConfig.from_dict(values)


BASIS_SETTINGS = ("basis_rank", "basis_energy", "basis_budget")  # they shape the stored subspace: a file keeps them


def resolve_config(stored: ShareConfig | None, rebase: bool = False, **given) -> ShareConfig:
    """The settings for the next write of a file: each given setting (``None``: not given) over what
    the file stores (``stored``; ``None`` for a new file: the defaults).

    Giving a basis setting that differs from the stored one raises `ValueError` unless ``rebase``
    (the next merge then refits the subspace under the new setting): a file folded at
    ``basis_rank=64`` is never silently squeezed to 8 by a command-line default.
    """
    base = stored or ShareConfig()
    changes = {name: value for name, value in given.items() if value is not None}
    if stored is not None and not rebase:
        clashes = [f"--{n} {changes[n]} (the file has {getattr(stored, n)})" for n in BASIS_SETTINGS
                   if n in changes and changes[n] != getattr(stored, n)]
        if clashes:
            raise ValueError(f"The Share file was made with other basis settings: {'; '.join(clashes)}. Leave the "
                             "flag out to keep the file's setting, or pass --rebase to refit the subspace under the new one.")
    return base.replace(**changes)


def portable_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """A path as it may be stored in a file or a model card: never this machine's absolute path.

    Relative paths and Hub ids stay as given; an absolute path inside ``root`` (e.g. the
    repository) becomes relative to it, any other absolute path just its folder name.
    """
    text = os.fspath(path)
    if not PurePath(text).is_absolute():
        return text
    if root is not None:
        try:
            return Path(text).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    return PurePath(text).name
