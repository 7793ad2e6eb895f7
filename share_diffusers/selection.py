"""Selections and file checks, the one place both are validated (pipelines, the web UI, the scripts).

A *selection* is a concept name, a ``{name: weight}`` mix, ``None`` (the base model), or a list
with one of those per prompt.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch

from .io import ShareFileError
from .subspace import ShareState
from .targets import split_layer

ARCHITECTURES = {"unet": "a UNet pipeline: SD 1.x/2.x, SDXL", "transformer": "a transformer pipeline: SD3, Flux"}


def check_compatible(file_shapes: dict, have: dict, source: str = "This Share file") -> None:
    """Raise, naming the first mismatches, unless every layer of the file exists in ``have`` with its shape.

    A file for another kind of model (a UNet's on a transformer pipeline, or the reverse) is named as such."""
    components = {split_layer(n)[0] for n in have}
    foreign = sorted(({split_layer(n)[0] for n in file_shapes} - components) & ARCHITECTURES.keys())  # unet vs transformer
    if foreign:
        made_for = " and ".join(f"{c} ({ARCHITECTURES[c]})" for c in foreign)
        raise ShareFileError(
            f"{source} was made for another kind of base model: it adapts the {made_for}, which this pipeline does not "
            f"have (its adaptable components: {', '.join(sorted(components)) or 'none'})."
        )
    problems = []
    for name, shape in file_shapes.items():
        if name not in have:
            problems.append(f"{name} is not in this model")
        elif tuple(have[name]) != tuple(shape):
            problems.append(f"{name} is {tuple(shape)} in the file but {tuple(have[name])} in the model")
    if problems:
        raise ShareFileError(
            f"{source} was made for another base model: {len(problems)} of its {len(file_shapes)} layers do not "
            f"match, e.g. " + "; ".join(problems[:3]) + "."
        )


MAX_WEIGHT = 1e3  # a concept weight beyond this is a typo, not a mix (and overflows half precision)


def check_selection(selection, names: list[str]) -> dict[str, float] | None:
    """One selection (a name, a ``{name: weight}`` mix or ``None``) as a mix without zero weights;
    ``None`` is the base model. The one validator of selections (pipelines and the web UI): bad input
    raises, naming it — `KeyError` for an unknown concept, `TypeError` for a wrong type, `ValueError`
    for a weight that is not finite or beyond ±``MAX_WEIGHT``."""
    if selection is None:
        return None
    if isinstance(selection, str):
        selection = {selection: 1.0}
    if not isinstance(selection, Mapping):
        raise TypeError(
            f"A Share selection is a concept name, a {{name: weight}} dict, None, or a list of those per prompt; "
            f"got {type(selection).__name__}."
        )
    mix = {}
    for name, weight in selection.items():
        if not isinstance(name, str):
            raise TypeError(f"Concept names must be strings, got {name!r}.")
        if name not in names:
            known = ", ".join(repr(n) for n in names) or "none"
            raise KeyError(f"Unknown Share concept {name!r}; this file holds: {known}.")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"The weight of {name!r} must be a number, got {type(weight).__name__}.")
        weight = float(weight)
        if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            raise ValueError(f"The weight of {name!r} must be a finite number within ±{MAX_WEIGHT:g}, got {weight}.")
        if weight:
            mix[name] = weight
    return mix or None


def _weights(state: ShareState, selection) -> torch.Tensor:
    """One selection (not a list) as a ``(C,)`` weight vector."""
    return state.weights(check_selection(selection, state.names) or {})


def resolve_selection(state: ShareState, selection) -> tuple[torch.Tensor, list[int] | None]:
    """``(G, C)`` group weights and, for a per-prompt list, each prompt's group.

    A per-prompt list gets one group per prompt, equal entries included: the selection's
    shapes then depend only on the number of prompts, so a compiled UNet is not recompiled
    when the concepts change (and a k×k core per prompt costs nothing).
    """
    if isinstance(selection, (list, tuple)):
        if not selection:
            raise ValueError("An empty list selects nothing; pass None for the base model.")
        rows = [_weights(state, s) for s in selection]
        if len(rows) == 1:
            return rows[0][None], None
        return torch.stack(rows), list(range(len(rows)))
    return _weights(state, selection)[None], None


def public_selection(selection, names):
    """A selection as `get_active_share_concepts` shows it: ``None``, ``{name: weight}``, or a list of those."""
    if isinstance(selection, (list, tuple)):
        return [check_selection(s, names) for s in selection]
    return check_selection(selection, names)
