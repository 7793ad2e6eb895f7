"""``share-studio`` / ``python -m app``: start the web UI (``--help`` lists the options).

Offline first: the Hub is not contacted unless the caller set ``HF_HUB_OFFLINE=0``, so these
defaults are set before Diffusers is imported.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from .ui import main  # noqa: E402  (after the environment above)

if __name__ == "__main__":
    main()
