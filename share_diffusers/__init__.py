"""share-diffusers: continual text-to-image personalization in one shared low-rank subspace.

Importing the package adds ``load_share``, ``set_share_concepts``, ``fuse_share``,
``unfuse_share``, ``unload_share``, ``get_active_share_concepts``, ``disable_share``,
``enable_share``, ``delete_share_concepts``, ``get_list_share_adapters`` and ``share_concepts`` to every ``DiffusionPipeline``
(never replacing an attribute Diffusers already has). The same operations are plain functions
here, and `ShareLoaderMixin` offers them to pipeline subclasses.
"""

from .config import ShareConfig
from .io import ShareFileError, read_share, save_share
from .lora import loras_to_share, read_lora, share_to_lora
from .pipeline import (
    ShareConcept,
    ShareLoaderMixin,
    delete_share_concepts,
    disable_share,
    enable_share,
    fuse_share,
    get_active_share_concepts,
    get_list_share_adapters,
    install,
    load_share,
    set_share_concepts,
    share_concepts,
    unfuse_share,
    unload_share,
)
from .subspace import LayerShare, NewConcept, ShareState

__version__ = "0.1.0"

install()

__all__ = [
    "LayerShare",
    "NewConcept",
    "ShareConcept",
    "ShareConfig",
    "ShareFileError",
    "ShareLoaderMixin",
    "ShareState",
    "delete_share_concepts",
    "disable_share",
    "enable_share",
    "fuse_share",
    "get_active_share_concepts",
    "get_list_share_adapters",
    "install",
    "load_share",
    "loras_to_share",
    "read_lora",
    "read_share",
    "save_share",
    "set_share_concepts",
    "share_concepts",
    "share_to_lora",
    "unfuse_share",
    "unload_share",
]
