"""Models named by Hugging Face Hub repo id: the published-models table and name -> local files.

Everything that touches the network or the cache goes through ``huggingface_hub`` (``hf_hub_download``), so its
cache layout (``models--owner--name/{blobs,refs,snapshots/<commit>}``), its atomic downloads, its progress bars and
its environment (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, ``HF_TOKEN``) apply unchanged.
Only ``config.json`` and ``model.safetensors`` are fetched. The published models are pinned to the revisions that
``../shared/SPEC.md`` describes; a pinned revision is a commit hash, so once cached it loads without any request.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from .errors import HubError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FILES = (CONFIG_FILE, WEIGHTS_FILE)


@dataclass(frozen=True)
class PublishedModel:
    repo_id: str
    revision: str            # commit known to match SPEC.md
    alias: str
    kind: str                # "FLM" (one-time flow) | "FMLM" (two-time flow map)
    dataset: str
    tokenizer: str
    length: int
    default_steps: int       # the paper's setting: 1 for FMLM, 1024 for FLM
    stochasticity: float     # the paper's sampling.gamma (FMLM only)


PUBLISHED = (
    PublishedModel("david3684/FLM-B-OWT", "624471b934fdd0421757d62290f7e639f32566d3", "flm-owt", "FLM",
                   "OpenWebText", "gpt2", 1024, 1024, 0.0),
    PublishedModel("david3684/FMLM-B-OWT", "483ea1b38bba56632cd40dc5a3c70a2340bb4946", "fmlm-owt", "FMLM",
                   "OpenWebText", "gpt2", 1024, 1, 1.0),
    PublishedModel("david3684/FLM-B-LM1B", "cd0ca433d11d9392494de8122f3b63cc996fd4ce", "flm-lm1b", "FLM",
                   "LM1B", "bert-base-uncased", 128, 1024, 0.0),
    PublishedModel("david3684/FMLM-B-LM1B", "356592ce2d9af4adbf9d7b55e8e00bbfb37eb4c8", "fmlm-lm1b", "FMLM",
                   "LM1B", "bert-base-uncased", 128, 1, 0.8),
)

# owner/name as the Hub allows them (letters, digits, '-', '_', '.'; no '--' or '..'; names up to 96 characters)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin", ".json")


@dataclass(frozen=True)
class HubFiles:
    repo_id: str
    revision: str            # the commit the files belong to
    config_path: str
    weights_path: str
    published: Optional[PublishedModel] = None

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.revision[:7] if re.fullmatch(r'[0-9a-f]{40}', self.revision) else self.revision}"


def find_published(name: str) -> Optional[PublishedModel]:
    """The table entry for an alias or repo id (case-insensitive), else None."""
    key = str(name).strip().lower()
    return next((m for m in PUBLISHED if key in (m.alias, m.repo_id.lower())), None)


def is_hub_name(name: str) -> bool:
    """True for an alias of the table or a well-formed ``owner/name`` that does not look like a file path."""
    name = str(name)
    if find_published(name) is not None:
        return True
    return (bool(_REPO_ID.match(name)) and "--" not in name and ".." not in name
            and not name.lower().endswith(_CHECKPOINT_SUFFIXES))


def cache_folder(cache_dir: Optional[str] = None) -> str:
    """Where the files live: ``cache_dir``, else the library's (``HF_HUB_CACHE``, else ``HF_HOME``/hub)."""
    from huggingface_hub import constants

    return os.path.abspath(os.path.expanduser(os.fspath(cache_dir) if cache_dir else constants.HF_HUB_CACHE))


def is_cached(repo_id: str, revision: str, cache_dir: Optional[str] = None) -> bool:
    """Both files of ``repo_id`` at ``revision`` are in the cache (no request is made)."""
    from huggingface_hub import try_to_load_from_cache

    return all(isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache_dir, revision=revision), str)
               for f in FILES)


def resolve(name: str, *, revision: Optional[str] = None, cache_dir: Optional[str] = None,
            local_files_only: bool = False, token=None) -> HubFiles:
    """Local paths of ``config.json`` and ``model.safetensors`` for a Hub name, downloading what is missing.

    ``revision``: a branch, tag or commit; default: the pinned commit for a published model, else ``main``.
    Downloads show the library's own progress bars (``HF_HUB_DISABLE_PROGRESS_BARS=1`` hides them).
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub import errors as hf_errors

    from ._version import __version__

    published = find_published(name)
    repo_id = published.repo_id if published else str(name)
    if revision is None:
        revision = published.revision if published else "main"
    where = f"{repo_id} (revision {revision})"
    folder = cache_folder(cache_dir)
    offline = local_files_only or constants.is_offline_mode()
    fetch_hint = (f"fetch it once with network access (e.g. `flm-rt info {name}`, or `hf download {repo_id} "
                  f"{' '.join(FILES)} --revision {revision}`), or pass a local path")
    paths = {}
    try:
        # the weights first: a config.json alone in a snapshot is never taken for a model (both are required)
        for filename in (WEIGHTS_FILE, CONFIG_FILE):
            paths[filename] = hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                token=token, library_name="flm_rt", library_version=__version__)
    except hf_errors.LocalEntryNotFoundError:
        if offline:
            reason = ("local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set") + \
                     ", so nothing is downloaded"
        else:
            reason = f"the Hub ({constants.ENDPOINT}) could not be reached"
        raise HubError(f"'{name}' is not a local path, and Hub repo {where} is not in the cache folder {folder} "
                       f"(missing {_missing(repo_id, revision, cache_dir)}); {reason}. To use it, {fetch_hint}."
                       ) from None
    except hf_errors.GatedRepoError:
        raise HubError(f"Hub repo {where} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(f"'{name}' is not a local path, and no Hub repo {repo_id} was found (or it is private: "
                       "set HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"Hub repo {repo_id} has no revision {revision!r}") from None
    except hf_errors.RemoteEntryNotFoundError:
        raise HubError(f"Hub repo {where} has no {filename}: not an FLM/FMLM model in the hub layout "
                       f"({' + '.join(FILES)})") from None
    except (hf_errors.HfHubHTTPError, hf_errors.FileMetadataError) as e:
        raise HubError(f"downloading {filename} of Hub repo {where} failed: {_first_line(e)}; nothing was added "
                       f"to the cache ({folder}); retry later") from None
    except OSError as e:  # connection cut half-way, size mismatch, disk full: the library kept no partial file
        raise HubError(f"downloading {filename} of Hub repo {where} into {folder} failed: {_first_line(e)}; "
                       "no partial file was kept; retry") from None
    commit = _snapshot_commit(paths[WEIGHTS_FILE]) or revision
    return HubFiles(repo_id, commit, paths[CONFIG_FILE], paths[WEIGHTS_FILE], published)


def _missing(repo_id: str, revision: str, cache_dir: Optional[str]) -> str:
    from huggingface_hub import try_to_load_from_cache

    missing = [f for f in FILES
               if not isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache_dir, revision=revision), str)]
    return " and ".join(missing) or "nothing"


def _snapshot_commit(path: str) -> Optional[str]:
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) >= 3 and parts[-3] == "snapshots":
        return parts[-2]
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
