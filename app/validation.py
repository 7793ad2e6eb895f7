"""Every check of what a web-UI user typed or uploaded; each failure is a `UserError` whose message
is shown as is. No Gradio, no pipeline: the engine and the learn jobs call these before anything
is written.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from share_diffusers import names
from share_diffusers.pipeline import check_selection
from share_diffusers.training import MAX_IMAGES, MIN_IMAGES

MAX_SIDE = 4096  # pixels, each side of an uploaded image
MAX_FILE_BYTES = 40 * 1024 * 1024
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "MPO"}
MAX_BATCH = 8
BASE_CHOICE = "Base model"
MIX_CHOICE = "Slider mix"
TRIGGER_PLACEHOLDER = "{trigger}"


class UserError(ValueError):
    """A mistake in what the user asked for; the message is shown as is in the UI."""


# -- validation of user input --------------------------------------------------------------------


def check_concept_name(name, existing=(), what="concept name") -> str:
    """The library's rule (`share_diffusers.names`), its message shown as is."""
    try:
        return names.check_concept_name(name, existing, what)
    except ValueError as e:
        raise UserError(str(e)) from None


def check_trigger(trigger, taken: dict[str, str] | None = None) -> str:
    try:
        return names.check_trigger(trigger, taken)
    except ValueError as e:
        raise UserError(str(e)) from None


@dataclass
class CheckedImage:
    path: Path
    name: str
    width: int
    height: int


def check_images(paths) -> list[CheckedImage]:
    """3–20 readable images of sane size; every bad file is named in one message."""
    paths = [Path(p) for p in (paths or [])]
    if not paths:
        raise UserError(f"Upload {MIN_IMAGES}–{MAX_IMAGES} images of the concept.")
    bad, good = [], []
    for path in paths:
        name = path.name
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                bad.append(f"{name} is a huge file ({size / 2**20:.0f} MB; the limit is {MAX_FILE_BYTES // 2**20} MB)")
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    if im.format not in IMAGE_FORMATS:
                        bad.append(f"{name} is a {im.format} file, not a photo format (PNG, JPEG, WebP, BMP, GIF, TIFF)")
                        continue
                    w, h = im.size
                    if max(w, h) > MAX_SIDE:
                        bad.append(f"{name} is huge ({w}×{h} pixels; the limit is {MAX_SIDE} on each side, resize it first)")
                        continue
                    im.load()  # decode fully: a truncated or corrupt file fails here, not in the training job
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            bad.append(f"{name} is huge (too many pixels to decode safely; the limit is {MAX_SIDE} on each side)")
            continue
        except Image.UnidentifiedImageError:
            bad.append(f"{name} is not an image")
            continue
        except (OSError, SyntaxError, ValueError) as e:
            bad.append(f"{name} cannot be read as an image ({e})")
            continue
        good.append(CheckedImage(path, name, w, h))
    if bad:
        raise UserError("Some uploads cannot be used, nothing was started: " + "; ".join(bad) + ".")
    if len(good) < MIN_IMAGES:
        raise UserError(f"Only {len(good)} image{'s' * (len(good) != 1)}: upload at least {MIN_IMAGES} "
                        f"({MIN_IMAGES}–{MAX_IMAGES} images of the concept).")
    if len(good) > MAX_IMAGES:
        raise UserError(f"{len(good)} images: upload at most {MAX_IMAGES} (pick the {MAX_IMAGES} best ones).")
    return good


def safe_filename(name: str) -> str:
    """A file name made of a concept name (names from old or folded-in files may hold anything)."""
    stem = re.sub(r"[^\w-]+", "_", name, flags=re.UNICODE).strip("._") or "concept"
    return stem[:80]


# -- selections -------------------------------------------------------------------------------------


def normalize_selection(selection, names: list[str]) -> dict[str, float] | None:
    """One image's selection as ``{name: weight}`` without zero weights (``None``: the base model),
    checked by the library's validator; its errors become `UserError`s."""
    if selection == "" or selection == BASE_CHOICE:
        return None
    try:
        return check_selection(selection, names)
    except (KeyError, TypeError, ValueError) as e:
        message = e.args[0] if e.args else str(e)
        raise UserError(f"{message} (deleted or renamed?)" if isinstance(e, KeyError) else message) from None
