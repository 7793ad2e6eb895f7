"""Every check of what a web-UI user typed or uploaded; each failure is a `UserError` whose message
is shown as is. No Gradio, no pipeline: the engine and the learn jobs call these before anything
is written.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from share_diffusers.pipeline import check_selection

MIN_IMAGES, MAX_IMAGES = 3, 20
MAX_SIDE = 4096  # pixels, each side of an uploaded image
MAX_FILE_BYTES = 40 * 1024 * 1024
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "MPO"}
MAX_BATCH = 8
MAX_NAME = 64
MAX_TRIGGER = 32
NAME_HINT = "use letters, digits, '-' and '_' (e.g. my-dog)"
BASE_CHOICE = "Base model"
MIX_CHOICE = "Slider mix"
TRIGGER_PLACEHOLDER = "{trigger}"


class UserError(ValueError):
    """A mistake in what the user asked for; the message is shown as is in the UI."""


# -- validation of user input --------------------------------------------------------------------


def _show(ch: str) -> str:
    if ch == "\x00":
        return "NUL"
    if unicodedata.category(ch)[0] in "CZ" and ch != " ":
        return f"U+{ord(ch):04X}"
    return repr(ch)


def check_concept_name(name, existing=(), what="concept name") -> str:
    """A name that is safe everywhere it is used (file header, file names, UI), not taken yet."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"Give the concept a name ({NAME_HINT}).")
    name = name.strip()
    if ".." in name:
        raise UserError(f"The {what} {name!r} contains '..': a name cannot look like a path; {NAME_HINT}.")
    bad = sorted({ch for ch in name if not (ch.isalnum() or ch in "-_")}, key=name.index)
    if bad:
        shown = ", ".join(_show(ch) for ch in bad)
        kind = "path or control characters" if any(ch in "/\\\x00:" or ord(ch) < 32 for ch in bad) else "characters"
        raise UserError(f"The {what} {name!r} contains {kind} that are not allowed ({shown}): {NAME_HINT}.")
    if not name[0].isalnum():
        raise UserError(f"The {what} {name!r} must start with a letter or a digit.")
    if len(name) > MAX_NAME:
        raise UserError(f"The {what} is {len(name)} characters long; at most {MAX_NAME}.")
    if name in existing:
        raise UserError(f"A concept named {name!r} already exists in this Share file: pick another name, "
                        "or rename or delete the old one in the Manage tab.")
    return name


def check_trigger(trigger, taken: dict[str, str] | None = None) -> str:
    """One word that stands for the concept in prompts; ``taken`` maps triggers in use to their concept."""
    if not isinstance(trigger, str) or not trigger.strip():
        raise UserError("Give a trigger token: a rare word that will stand for the concept in prompts (e.g. sks).")
    trigger = trigger.strip()
    if any(ch.isspace() for ch in trigger):
        raise UserError(f"The trigger {trigger!r} must be one word, without spaces.")
    bad = [ch for ch in trigger if unicodedata.category(ch)[0] == "C" or ch in "{}"]
    if bad:
        raise UserError(f"The trigger {trigger!r} contains characters that are not allowed ({', '.join(map(_show, bad))}).")
    if len(trigger) > MAX_TRIGGER:
        raise UserError(f"The trigger is {len(trigger)} characters long; at most {MAX_TRIGGER}.")
    if taken and trigger in taken:
        raise UserError(f"The trigger {trigger!r} is already used by the concept {taken[trigger]!r}; pick another word.")
    return trigger


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
