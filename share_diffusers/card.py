"""The model card (``README.md``) written beside a Share file: its concepts, triggers and history."""

from __future__ import annotations

import os
from pathlib import Path

from .config import portable_path
from .io import atomic_write
from .subspace import ShareState

CARD_MARKER = "<!-- share-diffusers model card -->"


def write_model_card(share_path: str | os.PathLike, state: ShareState, config: dict | None = None, load_from: str | None = None) -> Path:
    """Write the model card (``README.md``) beside a Share file: its concepts, triggers and history.

    A ``README.md`` that share-diffusers did not write is never replaced; the card then goes to
    ``<name>.README.md``. ``load_from`` is what the card's example gives ``load_share`` (default: the
    file's name; a Hub repo id for a pushed card).
    """
    share_path, config = Path(share_path), config or {}
    base = portable_path(config["base_model"]) if config.get("base_model") else None  # files written before it was made portable
    rows = "\n".join(
        f"| {c['name']} | `{c.get('trigger') or '-'}` | {c.get('date', '-')} | {c.get('steps', '-')} | "
        f"{', '.join(f'{e:.4f}' for e in c.get('merge_errors', []))} |"
        for c in state.concepts
    )
    example = state.concepts[-1]["name"] if state.concepts else "name"
    card = f"""{CARD_MARKER}
# Share file `{share_path.name}`

{len(state.concepts)} concepts in one shared low-rank subspace (Share, arXiv 2602.06043), made with
share-diffusers for the base model `{base or 'unknown'}`: up to
{config.get('basis_rank', '?')} shared directions per layer, each concept rank {config.get('coef_rank', '?')} per layer.

| concept | trigger | learned | steps | merge error after each merge |
|---|---|---|---|---|
{rows}

```python
import share_diffusers  # adds pipe.load_share & co. to every DiffusionPipeline
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base or 'path/to/base'}")
pipe.load_share("{load_from or share_path.name}")
pipe.set_share_concepts("{example}")  # or {{"a": 0.5, "b": 0.5}}, or a list with one per prompt
```
"""
    path = share_path.parent / "README.md"
    if path.exists() and not path.read_text(errors="replace").startswith(CARD_MARKER):
        path = share_path.with_name(share_path.stem + ".README.md")
    atomic_write(path, lambda tmp: Path(tmp).write_text(card))
    return path
