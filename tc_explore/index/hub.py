"""Sharing feature indexes on the Hugging Face Hub, as dataset repos.

``FeatureIndex.push_to_hub`` uploads an index directory in one commit, with a dataset card
(``README.md``) that lists the model, transcoder set, corpus, token count,
build settings and weight fingerprints. ``FeatureIndex.from_hub`` downloads through
``huggingface_hub.snapshot_download`` into the standard cache, so
``HF_HOME``, ``HF_HUB_OFFLINE`` and tokens behave as everywhere else, and
checks the index against the model and transcoders you pass, so a dashboard
never mixes an index with weights it was not built from.

The repo holds the index directory as it is on disk (``manifest.json``,
``tokens.parquet``, ``layer_LL/*.parquet``, ``weight_views/``) plus the card.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import IncompatibleTranscoderError, InvalidInputError, OfflineFileMissingError

REPO_TYPE = "dataset"
CARD = "README.md"
# Never uploaded: a build's resumable state and half-written files.
_PRIVATE = ("checkpoint.pt", ".tmp", ".lock")


def index_files(directory: Path) -> list[str]:
    """The files of an index directory (or of its repo snapshot) that make up
    the index, relative, sorted: no card, repo metadata or unfinished state."""
    files = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel not in (CARD, ".gitattributes") and \
                not any(part in path.name for part in _PRIVATE):
            files.append(rel)
    return files


def dataset_card(index, repo_id: str) -> str:
    """The dataset card (README.md) of an index: YAML metadata and a summary."""
    from huggingface_hub import DatasetCardData

    from .. import __version__

    m = index.manifest
    corpus = m.get("corpus", {})
    n_features = sum(int(d) for d in m["d_sae"].values())
    data = DatasetCardData(pretty_name=f"tc_explore feature index: {m['transcoder_set']} on "
                                       f"{corpus.get('name', corpus.get('kind'))}",
                           tags=["tc_explore", "transcoders", "interpretability", "feature-index"])
    corpus_lines = "\n".join(f"| {key} | `{value}` |" for key, value in sorted(corpus.items()))
    fingerprints = _fingerprints(index)
    fp_lines = "\n".join(f"| {key} | `{value}` |" for key, value in fingerprints.items()) or \
        "| (none recorded) | |"
    views = (index.directory / "weight_views" / "manifest.json").is_file()
    return f"""---
{data.to_yaml()}
---

# Feature index of `{m['transcoder_set']}` on `{m['model']}`

A [tc_explore](https://pypi.org/project/tc-explore/) feature index: for each of the
{n_features:,} transcoder features in layers {m['layers']}, its top-{m['k']} activating tokens,
a uniform sample of {m['n_samples']} firing tokens, an activation histogram and firing
statistics, each example with the feature's activations on a window of context.
{"It also holds precomputed weight views (connections, logit effects, de-embeddings)." if views else ""}

```python
from tc_explore import load_model, load_transcoders
from tc_explore.index import FeatureIndex

model = load_model({m['model']!r})
transcoders = load_transcoders({m['transcoder_set']!r})
index = FeatureIndex.from_hub({repo_id!r}, model=model, transcoders=transcoders)
```

## What was indexed

| | |
|---|---|
| model | `{m['model']}` |
| transcoder set | `{m['transcoder_set']}` (repo `{m.get('transcoder_repo')}`, revision `{m.get('revision')}`) |
| layers | {m['layers']} |
| features per layer | {sorted(set(int(d) for d in m['d_sae'].values()))} |
| tokens | {m['n_tokens']:,} ({m['n_sequences']:,} sequences of {m['seq_len']}; {m['n_tokens_counted']:,} counted, position 0 left out) |
| index format | {m['format_version']} |
| built | {m.get('built_at')} with tc_explore {__version__} |

## Corpus

| | |
|---|---|
{corpus_lines}

## Settings

| | |
|---|---|
| top examples per feature (k) | {m['k']} |
| samples per feature | {m['n_samples']} |
| context window (before, after) | {m['window']} |
| batch size | {m['batch_size']} |
| seed | {m['seed']} |
| histogram bins | {len(m['histogram_edges']) + 1} (log-spaced edges {m['histogram_edges'][0]:g} .. {m['histogram_edges'][-1]:g}) |

## Weight fingerprints

`FeatureIndex.from_hub(..., model=, transcoders=)` refuses weights whose fingerprints differ.

| | |
|---|---|
{fp_lines}
"""


def push_to_hub(index, repo_id: str, *, private: bool | None = None, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None, api=None):
    """Upload ``index`` to the dataset repo ``repo_id`` (created if missing) in
    one commit, with a dataset card. Files of an earlier push that the index no
    longer has are deleted in the same commit. ``api`` is a
    ``huggingface_hub.HfApi`` (default: a new one, with ``token``). Returns the
    ``CommitInfo``."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise InvalidInputError(f"repo_id must be 'owner/name', got {repo_id!r}.")
    api = api if api is not None else HfApi(token=token)
    api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True, token=token)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True, token=token)
    files = index_files(index.directory)
    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(index.directory / rel)) for rel in files]
    ops.append(CommitOperationAdd(path_in_repo=CARD,
                                  path_or_fileobj=dataset_card(index, repo_id).encode("utf-8")))
    stale = set(api.list_repo_files(repo_id, repo_type=REPO_TYPE, revision=revision, token=token))
    stale -= set(files) | {CARD, ".gitattributes"}
    ops.extend(CommitOperationDelete(path_in_repo=rel) for rel in sorted(stale))
    m = index.manifest
    message = commit_message or (f"tc_explore index: {m['transcoder_set']} on {m['model']}, "
                                 f"{m['n_tokens']:,} tokens")
    return api.create_commit(repo_id, ops, commit_message=message, repo_type=REPO_TYPE,
                             revision=revision, token=token)


def download_index(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                   token: str | None = None, local_files_only: bool = False) -> Path:
    """The snapshot directory of dataset repo ``repo_id`` in the HF cache,
    downloaded if needed and allowed (``FeatureIndex.from_hub`` opens it)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        path = snapshot_download(repo_id, repo_type=REPO_TYPE, revision=revision, cache_dir=cache_dir,
                                 token=token, local_files_only=local_files_only)
    except LocalEntryNotFoundError as err:
        from ..hub_access import cache_dir as default_cache_dir
        raise OfflineFileMissingError(
            f"The index {repo_id!r}{f' at revision {revision!r}' if revision else ''} is not in "
            f"the local Hugging Face cache ({cache_dir or default_cache_dir()}) and cannot be "
            f"downloaded now (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}). Download "
            f"it once while online (`tc-explore index pull {repo_id}`), or open a local copy "
            "with FeatureIndex.load.") from err
    except RevisionNotFoundError as err:
        raise InvalidInputError(f"The dataset repo {repo_id!r} has no revision {revision!r}.") from err
    except (RepositoryNotFoundError, EntryNotFoundError) as err:
        raise InvalidInputError(
            f"No dataset repo {repo_id!r} on the Hub (or it is private: log in with `hf auth "
            "login` or pass token=).") from err
    if not (Path(path) / "manifest.json").is_file():
        raise InvalidInputError(f"The dataset repo {repo_id!r} holds no tc_explore index (no manifest.json).")
    return Path(path)


# -- fingerprints -----------------------------------------------------------------------
def _fingerprints(index) -> dict[str, str]:
    """The weight fingerprints an index carries, by what they identify."""
    out = {}
    recorded = index.manifest.get("fingerprints") or {}
    out.update({f"transcoder layer {layer}": fp for layer, fp in (recorded.get("transcoders") or {}).items()})
    for key in ("model", "tokenizer", "corpus"):
        if recorded.get(key):
            value = recorded[key]
            out[key] = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
    views = index.directory / "weight_views" / "manifest.json"
    if views.is_file():
        vm = json.loads(views.read_text(encoding="utf-8"))
        out["weight views: model (embedding, unembedding, attention)"] = vm["model_fingerprint"]
        out.update({f"weight views: transcoder layer {layer}": fp for layer, fp in vm["fingerprints"].items()})
    return out


def check_weights(index, model=None, transcoders=None) -> None:
    """Refuse ``model`` / ``transcoders`` other than those the index was built from:
    the transcoder set's name and widths, and the weights' fingerprints where the
    index records them."""
    from ..weight_views import DIRECTORY, WeightViews
    from .build import _model_name

    if transcoders is not None:
        index.check_transcoders(transcoders)
    if model is not None:
        index.check_model(model)
    if model is not None and index.manifest.get("model") not in (None, _model_name(model)):
        raise IncompatibleTranscoderError(
            f"The index in {index.directory} was built with model {index.manifest['model']!r}, "
            f"not {_model_name(model)!r}.")
    if (index.directory / DIRECTORY / "manifest.json").is_file() and (model or transcoders) is not None:
        WeightViews(index.directory / DIRECTORY).verify(
            model=model, transcoders=None if transcoders is None else transcoders)


