"""The share-diffusers web UI (``share-studio``, or ``python -m app``).

Layers, each importing only those below it: `ui` (Gradio wiring) → `engine` (`Studio`: one pipeline
and one Share file) → `jobs` (learn jobs: a ``learn_concept.py`` subprocess) → `files` (the Share
file as loaded, PNG metadata) and `validation` (every check of user input, `UserError`).
"""
