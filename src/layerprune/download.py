"""Download a model or dataset repository from the Hugging Face Hub into a plain folder, atomically.

The Hub address comes from ``huggingface_hub``: set ``HF_ENDPOINT`` (for example ``https://hf-mirror.com``) to use
a mirror and ``HF_TOKEN`` for gated or private repositories. ``HF_HUB_OFFLINE=1`` refuses at once.

Files go to a hidden ``.NAME.partial`` folder beside the target, which is renamed to the target when complete: the
target is either absent or whole. An interrupted download leaves the partial folder, and running the same command
again resumes it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import LayerpruneError
from .io import check_out_dir, replace_dir

REPO_TYPES = ("model", "dataset")
_TRUE = {"1", "true", "yes", "on"}


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a hard dependency
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _unreachable(reason: str) -> LayerpruneError:
    return LayerpruneError(f"cannot reach the Hugging Face Hub ({reason}); set HF_ENDPOINT for a mirror or copy "
                           "the files and pass a local path")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def partial_dir(out: Path) -> Path:
    """Where an unfinished download of ``out`` lives (beside it, so the final rename stays on one filesystem)."""
    return out.parent / f".{out.name}.partial"


def download(repo_id: str, out_dir: str | os.PathLike, *, repo_type: str = "model", revision: str | None = None,
             include: list[str] | None = None, exclude: list[str] | None = None, overwrite: bool = False) -> Path:
    """Download ``repo_id`` (optionally only files matching ``include`` glob patterns) into ``out_dir``.

    Raises :class:`LayerpruneError` (one line) when offline, unreachable, not found, gated or when ``out_dir`` is
    a non-empty folder and not ``overwrite``. Returns ``out_dir``.
    """
    if repo_type not in REPO_TYPES:
        raise LayerpruneError(f"unknown repo type '{repo_type}'; choose one of {', '.join(REPO_TYPES)}")
    from huggingface_hub.utils import validate_repo_id

    try:  # a malformed id is the user's mistake, whether or not the Hub is reachable
        validate_repo_id(repo_id)
    except ValueError as e:
        raise LayerpruneError(f"invalid repository id '{repo_id}': {_first_line(e)}") from None
    out = check_out_dir(out_dir, overwrite).resolve()
    if _offline():
        raise _unreachable("HF_HUB_OFFLINE is set")

    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{repo_type} '{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    try:
        # Resolve the revision to a commit first: with a commit, snapshot_download never mistakes a leftover partial
        # folder for a finished one when the connection drops, and a resumed download fetches the same files.
        info = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision)
        commit = info.sha
        tmp = partial_dir(out)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        snapshot_download(repo_id, repo_type=repo_type, revision=commit, local_dir=tmp,
                          allow_patterns=include or None, ignore_patterns=exclude or None)
    except GatedRepoError:
        raise LayerpruneError(f"{what} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise LayerpruneError(f"{what} not found on {_endpoint()} (private? set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise LayerpruneError(f"revision '{revision}' not found in {repo_type} '{repo_id}'") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        raise _unreachable(_first_line(e)) from None
    except HfHubHTTPError as e:
        raise LayerpruneError(f"Hub error for {what}: {_first_line(e)}") from None
    except ValueError as e:  # HFValidationError: a malformed repo id
        raise LayerpruneError(f"invalid repository id '{repo_id}': {_first_line(e)}") from None
    except OSError as e:  # disk full, permissions: the partial folder stays for a resumed run
        raise LayerpruneError(f"download of {what} failed: {_first_line(e)} "
                              f"(partial files kept in {partial_dir(out)}; run again to resume)") from None
    except Exception as e:  # transport errors: their classes differ between huggingface_hub versions
        if type(e).__module__.split(".")[0].startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise _unreachable(f"{type(e).__name__}: {_first_line(e)}") from None
        raise
    if include and not any(p.is_file() for p in tmp.rglob("*") if ".cache" not in p.relative_to(tmp).parts):
        shutil.rmtree(tmp, ignore_errors=True)
        raise LayerpruneError(f"no file of {what} matches --include {' '.join(include)}")
    # The bookkeeping folder only serves resumption; the finished folder holds the repository's files alone.
    shutil.rmtree(tmp / ".cache", ignore_errors=True)
    replace_dir(tmp, out)
    return Path(out_dir)


__all__ = ["REPO_TYPES", "download", "partial_dir"]
