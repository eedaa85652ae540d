"""Where a model name points, checked before anything loads, so a wrong name is one line that names the role.

transformers treats every name that is not an existing folder as a hub id: a missing folder comes back as "Repo id
must be in the form ...", and a mistyped name with no network spends about a minute in retries before it blames the
connection. `check_model_source` decides first, with no retries, using these rules:

* An existing folder is a local model: it (or its `subfolder`) must hold `config.json` (or `adapter_config.json`).
  An existing file is refused: a model is the folder `save_pretrained` wrote.
* A name that does not exist is a local path, and so an error that the folder is missing, when it is absolute,
  starts with `~`, `./` or `../` (or is `.` or `..`), holds a backslash, ends with `/`, or has more than one `/`
  (hub ids have at most one: `name` or `namespace/name`).
* Anything else is a hub id. It must be a valid one (huggingface_hub's rules). If the hub cache holds its
  `config.json` it is used as it is. Otherwise, with HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set it is an error at
  once, and without it the hub is asked once for `config.json`, with no retries and a timeout of
  HF_HUB_ETAG_TIMEOUT seconds if set, else `PROBE_TIMEOUT_S`: an unknown repository, a gated one, a missing
  revision, or a hub that cannot be reached is an error that says which. Other hub answers (a server error, a repo
  with no `config.json`) are left to transformers, which reports them itself.

Only dependencies light enough for the command line are imported here (no torch).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

PROBE_TIMEOUT_S = 3.0  # a hub that answers answers in well under this; a blackholed network fails within it
MODEL_FILES = ("config.json", "adapter_config.json")
_FOUND_ON_HUB: set[tuple[Any, ...]] = set()  # (name, revision, file, endpoint) the hub confirmed: asked once


class ModelSourceError(ValueError):
    """A model name that points at nothing loadable: a missing folder, a bad hub id, an unknown or unreachable repo."""


def looks_like_path(name: str) -> bool:
    """Whether `name` can only be a local path (see the module docstring), whether or not it exists."""
    return (
        os.path.isabs(name)
        or name in (".", "..")
        or name.startswith(("~", "./", "../"))
        or "\\" in name
        or name.endswith("/")
        or name.count("/") > 1
    )


def check_model_source(name: str, role: str, init_kwargs: dict[str, Any] | None = None) -> None:
    """Raise `ModelSourceError` naming `role` ("student", "teacher") and `name` unless `name` is a model folder, a
    cached hub model, or a hub model the hub confirms. `init_kwargs` are the `from_pretrained` kwargs the model will
    be loaded with: their `revision`, `subfolder`, `cache_dir`, `token`, `local_files_only` and `gguf_file` are
    honoured."""
    kwargs = init_kwargs or {}
    name = os.fspath(name) if isinstance(name, os.PathLike) else name
    if not isinstance(name, str) or not name.strip():
        raise ModelSourceError(f"the {role} model name is empty: give a local folder or a hub id")
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(name):
        folder = os.path.join(name, subfolder)
        if kwargs.get("gguf_file") is None and not any(os.path.isfile(os.path.join(folder, f)) for f in MODEL_FILES):
            raise ModelSourceError(
                f"the {role} model folder {folder} has no config.json: it is not a model saved with save_pretrained"
            )
        return
    if os.path.exists(name):
        raise ModelSourceError(f"the {role} model {name} is a file; give the folder that holds its config.json")
    if looks_like_path(name):
        raise ModelSourceError(f"the {role} model folder {name} does not exist{_path_hint(name)}")
    _check_hub_id(name, role, kwargs, subfolder)


def _path_hint(name: str) -> str:
    if name.startswith("~"):
        return f" (~ is not expanded here: write {os.path.expanduser(name)})"
    if not os.path.isabs(name):
        return f" (looked for {os.path.abspath(name)})"
    return ""


def _check_hub_id(name: str, role: str, kwargs: dict[str, Any], subfolder: str) -> None:
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise ModelSourceError(
            f"the {role} model {name!r} is neither a local folder nor a valid hub id: {error}"
        ) from None
    revision = kwargs.get("revision")
    files = [f"{subfolder.strip('/')}/{f}" if subfolder else f for f in MODEL_FILES]
    if any(isinstance(try_to_load_from_cache(name, f, kwargs.get("cache_dir"), revision), str) for f in files):
        return
    not_local = f"the {role} model {name!r} is neither a local folder nor in the hub cache"
    if constants.is_offline_mode() or kwargs.get("local_files_only"):
        why = "local_files_only=True" if kwargs.get("local_files_only") else "HF_HUB_OFFLINE is set"
        raise ModelSourceError(f"{not_local}, and {why}, so the hub was not asked")
    key = (name, revision, files[0], constants.ENDPOINT)
    if key not in _FOUND_ON_HUB:
        _ask_hub(name, role, revision, files[0], kwargs.get("token"), not_local)
        _FOUND_ON_HUB.add(key)


def _ask_hub(name: str, role: str, revision: str | None, filename: str, token: Any, not_local: str) -> None:
    """One HEAD request for the repo's config.json, no retries: the hub's answer decides, or its silence does."""
    from huggingface_hub import constants, get_hf_file_metadata
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or PROBE_TIMEOUT_S)
    try:
        url = f"{constants.ENDPOINT}/{name}/resolve/{quote(revision or 'main', safe='')}/{filename}"  # hf_hub_url's
        get_hf_file_metadata(url, token=token, timeout=timeout)
    except GatedRepoError:
        raise ModelSourceError(
            f"the {role} model {name!r} is gated on the hub: accept its conditions at {constants.ENDPOINT}/{name} "
            "and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"{not_local}, and the hub has no model {name!r} (if it is private, log in with hf auth login)"
        ) from None
    except RevisionNotFoundError:
        raise ModelSourceError(f"the {role} model {name!r} has no revision {revision!r} on the hub") from None
    except (EntryNotFoundError, HfHubHTTPError):
        return  # the repo exists; transformers reports what is missing or retries what failed
    except Exception as error:  # the transport's own errors (httpx's, an OSError): the hub could not be asked
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ModelSourceError(
            f"{not_local}, and the hub ({constants.ENDPOINT}) could not be reached within {timeout:g} s to look it "
            f"up ({reason}); check the name, or set HF_HUB_OFFLINE=1 to use only the cache"
        ) from None
