"""The one rule for concept names and trigger tokens, shared by the training script and the web UI.

A name ends up in file names, folder names, the file header and HTML; a trigger is spliced into
prompts. Failures are `ValueError`s whose message names the input and says what is allowed.
Files folded in from elsewhere may hold any string: readers must still escape what they show.
"""

from __future__ import annotations

import unicodedata

MAX_NAME = 64
MAX_TRIGGER = 32
NAME_HINT = "use letters, digits, '-' and '_' (e.g. my-dog)"


def _show(ch: str) -> str:
    if ch == "\x00":
        return "NUL"
    if unicodedata.category(ch)[0] in "CZ" and ch != " ":
        return f"U+{ord(ch):04X}"
    return repr(ch)


def check_concept_name(name, existing=(), what="concept name") -> str:
    """A name that is safe everywhere it is used (file header, file names, UI), not taken yet."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"Give the concept a name ({NAME_HINT}).")
    name = name.strip()
    if ".." in name:
        raise ValueError(f"The {what} {name!r} contains '..': a name cannot look like a path; {NAME_HINT}.")
    bad = sorted({ch for ch in name if not (ch.isalnum() or ch in "-_")}, key=name.index)
    if bad:
        shown = ", ".join(_show(ch) for ch in bad)
        kind = "path or control characters" if any(ch in "/\\\x00:" or ord(ch) < 32 for ch in bad) else "characters"
        raise ValueError(f"The {what} {name!r} contains {kind} that are not allowed ({shown}): {NAME_HINT}.")
    if not name[0].isalnum():
        raise ValueError(f"The {what} {name!r} must start with a letter or a digit.")
    if len(name) > MAX_NAME:
        raise ValueError(f"The {what} is {len(name)} characters long; at most {MAX_NAME}.")
    if name in existing:
        raise ValueError(f"A concept named {name!r} already exists in this Share file: pick another name, "
                         "or rename or delete the old one.")
    return name


def check_trigger(trigger, taken: dict[str, str] | None = None) -> str:
    """One word that stands for the concept in prompts; ``taken`` maps triggers in use to their concept."""
    if not isinstance(trigger, str) or not trigger.strip():
        raise ValueError("Give a trigger token: a rare word that will stand for the concept in prompts (e.g. sks).")
    trigger = trigger.strip()
    if any(ch.isspace() for ch in trigger):
        raise ValueError(f"The trigger {trigger!r} must be one word, without spaces.")
    bad = [ch for ch in trigger if unicodedata.category(ch)[0] == "C" or ch in "{}"]
    if bad:
        raise ValueError(f"The trigger {trigger!r} contains characters that are not allowed ({', '.join(map(_show, bad))}).")
    if len(trigger) > MAX_TRIGGER:
        raise ValueError(f"The trigger is {len(trigger)} characters long; at most {MAX_TRIGGER}.")
    if taken and trigger in taken:
        raise ValueError(f"The trigger {trigger!r} is already used by the concept {taken[trigger]!r}; pick another word.")
    return trigger
