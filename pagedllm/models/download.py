"""Hub ids into local snapshots, as vLLM resolves them: from the HF cache, downloading what is
missing (only the files a model needs, with progress bars), honouring ``revision``,
``download_dir`` and the hub's environment (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``,
``HF_TOKEN``, ``HF_ENDPOINT``), read when the model is resolved."""

import logging
import os
from fnmatch import fnmatch

logger = logging.getLogger("pagedllm")

# What the engine reads: the config, the tokenizer and chat template, and one weight format.
_ALWAYS = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py"]
_WEIGHTS = (["*.safetensors"], ["*.bin"], ["*.pt"])
_NEVER = ["*/*", "consolidated*", "*.onnx", "*.gguf", "*.msgpack", "*.h5", "*.ckpt"]  # subfolders: original/, onnx/


def download_model(repo_id: str, revision: str | None = None, download_dir: str | None = None,
                   weights: bool = True, token: bool | str | None = None) -> str:
    """The local snapshot directory of ``repo_id`` at ``revision``: downloaded unless offline; from
    the cache if the hub cannot be reached. ``weights=False``: the config and tokenizer only.
    ``token``: huggingface_hub's (None: HF_TOKEN, else the saved login; True: the saved login)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, endpoint = cache_dir(download_dir), os.environ.get("HF_ENDPOINT") or None
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    reason = "HF_HUB_OFFLINE is set"
    if not _offline():
        try:
            info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
            files = [s.rfilename for s in info.siblings]
            wanted = next((p for p in _WEIGHTS if any(_matches(f, p) for f in files)), []) if weights else []
            logger.info("fetching %s from %s into %s (files already there are kept)", where,
                        endpoint or "the hub", cache)
            return snapshot_download(repo_id, revision=revision, cache_dir=cache, endpoint=endpoint, token=token,
                                     allow_patterns=_ALWAYS + wanted, ignore_patterns=_NEVER)
        except GatedRepoError:
            raise FileNotFoundError(f"model {repo_id!r} is gated: accept its terms on the hub, then set HF_TOKEN "
                                    "(or hf_token, or `hf auth login`)") from None
        except RevisionNotFoundError:
            raise FileNotFoundError(f"model {repo_id!r} has no revision {revision!r} on the hub") from None
        except RepositoryNotFoundError:
            raise FileNotFoundError(f"model {repo_id!r} is neither a local directory nor a model on the hub (a "
                                    "private one needs HF_TOKEN or hf_token)") from None
        except Exception as err:  # no network, a hub error: the cache may still have it
            reason = f"the hub could not be reached ({type(err).__name__}: {err})"
            logger.warning("cannot reach the hub for %s: %s; trying the local cache", where, err)
    for candidate in _WEIGHTS if weights else ([],):  # the cache holds the weights of one format
        try:
            return snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                                     allow_patterns=_ALWAYS + candidate, ignore_patterns=_NEVER)
        except IncompleteSnapshotError:
            continue
        except LocalEntryNotFoundError:
            break
    raise FileNotFoundError(f"model {where} is not in the local Hugging Face cache ({cache}) and {reason}: "
                            "pass a local directory, or download it where the hub can be reached")


def cache_dir(download_dir: str | None) -> str:
    """``download_dir``, else the hub cache the environment names now."""
    if download_dir:
        return download_dir
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _matches(path: str, patterns: list[str]) -> bool:
    return "/" not in path and any(fnmatch(path, p) for p in patterns)
