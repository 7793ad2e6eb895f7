"""Files from a local path or a Hub repo, resolved the way Diffusers' ``load_lora_weights`` resolves them.

A path that exists is used as it is (a folder gets ``subfolder`` and ``weight_name``); anything
else is a Hub repo id, fetched by ``huggingface_hub`` into its cache (``HF_HUB_OFFLINE=1`` and
``local_files_only=True`` read only the cache). Nothing here knows what the file holds.
"""

from __future__ import annotations

import os
from pathlib import Path

HUB_KWARGS = ("subfolder", "revision", "cache_dir", "local_files_only", "token", "force_download")


def resolve_file(
    name_or_path: str | os.PathLike, weight_name: str | None, default: str, what: str = "file", **hub_kwargs
) -> Path:
    """A local file: ``name_or_path`` itself, ``name_or_path/[subfolder/]weight_name``, or the Hub repo's file."""
    unknown = set(hub_kwargs) - set(HUB_KWARGS)
    if unknown:
        raise TypeError(f"Unknown argument(s) {', '.join(sorted(unknown))}; the Hub arguments are {', '.join(HUB_KWARGS)}.")
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"Expected a path to a {what} or a Hub repo id, got {type(name_or_path).__name__}.")
    path = Path(name_or_path)
    subfolder = hub_kwargs.get("subfolder") or ""
    if path.is_dir():
        path = path / subfolder / (weight_name or default)
    if path.is_file():
        return path
    if path.exists() or not is_repo_id(name_or_path):
        raise FileNotFoundError(f"No {what} at {path}.")
    return Path(download(str(name_or_path), weight_name or default, what, **hub_kwargs))


def is_repo_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` could be a Hub repo id (``owner/name``, or ``name``), not a file path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = os.fspath(name)
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def download(repo_id: str, filename: str, what: str = "file", **hub_kwargs) -> str:
    """One file of a Hub repo, through the cache; a missing repo, revision or file raises `FileNotFoundError` naming it."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"{repo_id}" + (f" (revision {hub_kwargs['revision']})" if hub_kwargs.get("revision") else "")
    name = "/".join(p for p in (hub_kwargs.get("subfolder"), filename) if p)
    try:
        return hf_hub_download(repo_id, filename, **{k: v for k, v in hub_kwargs.items() if v is not None})
    except LocalEntryNotFoundError as e:  # offline, or not in the cache
        offline = "HF_HUB_OFFLINE is set and " if constants.HF_HUB_OFFLINE else ""
        raise FileNotFoundError(f"No {what} {name!r} of the Hub repo {where} could be loaded: {offline}it is not in the "
                                f"local Hub cache ({hub_kwargs.get('cache_dir') or constants.HF_HUB_CACHE}), and no local "
                                f"path {repo_id!r} exists.") from e
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise FileNotFoundError(f"No {what} {name!r} in the Hub repo {where}: {type(e).__name__}.") from e
    except HfHubHTTPError as e:
        raise OSError(f"Could not download {name!r} from the Hub repo {where}: {e}") from e


def snapshot(repo_id_or_path: str | os.PathLike, what: str = "pipeline", **hub_kwargs) -> Path:
    """A local folder: the path itself, or the Hub repo's snapshot (downloaded, or from the cache offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    path = Path(repo_id_or_path)
    if path.exists() or not is_repo_id(repo_id_or_path):
        return path
    try:
        return Path(snapshot_download(str(repo_id_or_path), **{k: v for k, v in hub_kwargs.items() if v is not None}))
    except LocalEntryNotFoundError as e:
        offline = "HF_HUB_OFFLINE is set and " if constants.HF_HUB_OFFLINE else ""
        raise FileNotFoundError(f"The {what} {repo_id_or_path!r} is neither a local folder nor loadable from the Hub: {offline}"
                                f"it is not in the local Hub cache ({hub_kwargs.get('cache_dir') or constants.HF_HUB_CACHE}).") from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"No Hub repo {repo_id_or_path!r} for the {what}: {type(e).__name__}.") from e
    except HfHubHTTPError as e:
        raise OSError(f"Could not download the {what} {repo_id_or_path!r} from the Hub: {e}") from e
