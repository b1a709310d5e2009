"""The registry of published transcoder sets: one JSON file per set in
``pretrained/`` (installed as ``tc_explore.pretrained``), read into
``RegistryEntry`` records. Imports nothing from ``model`` or ``hub``: both
look names up here."""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .errors import IncompatibleTranscoderError

FORMATS = ("gpt2-pickle", "circuit-tracer", "gemma-scope-npz")


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    model: str
    format: str
    layers: tuple[int, ...]
    input_hook: str
    output_hook: str
    repo_id: str | None = None
    revision: str | None = None
    file_pattern: str | None = None
    frequency_pattern: str | None = None
    d_in: int | None = None
    d_sae: int | None = None
    description: str = ""
    local_dir: str | None = None      # transcoders shipped inside the package
    model_dir: str | None = None      # a model shipped inside the package

    @classmethod
    def from_dict(cls, d: dict, base: Path | None = None) -> "RegistryEntry":
        """An entry from its JSON; ``base`` resolves relative ``local_dir`` /
        ``model_dir``. Unknown keys are an error (a misspelt key would otherwise
        be ignored silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise IncompatibleTranscoderError(
                f"Registry entry {d.get('name')!r} has unknown keys {unknown}; the keys are "
                f"{sorted(known)}.")
        missing = sorted(f.name for f in fields(cls) if f.name not in d
                         and f.default is MISSING)
        if missing:
            raise IncompatibleTranscoderError(
                f"Registry entry {d.get('name')!r} lacks the keys {missing}.")
        kwargs = dict(d)
        if kwargs.get("format") not in FORMATS:
            raise IncompatibleTranscoderError(
                f"Registry entry {d.get('name')!r}: format {d.get('format')!r} is not one of {FORMATS}.")
        kwargs["layers"] = tuple(int(x) for x in d["layers"])
        for key in ("local_dir", "model_dir"):
            if kwargs.get(key) and base is not None:
                kwargs[key] = str((base / kwargs[key]).resolve())
        return cls(**kwargs)


def pretrained_dir() -> Path:
    """The directory of the registry's JSON files (and the sets shipped with them)."""
    return Path(str(resources.files("tc_explore.pretrained")))


@lru_cache(maxsize=1)
def registry() -> dict[str, RegistryEntry]:
    """All registered transcoder sets, by name."""
    out = {}
    base = pretrained_dir()
    for path in sorted(base.glob("*.json")):
        entry = RegistryEntry.from_dict(json.loads(path.read_text(encoding="utf-8")), base)
        out[entry.name] = entry
    return out


def list_transcoder_sets():
    """The registry as a pandas DataFrame."""
    import pandas as pd
    rows = [dict(name=e.name, model=e.model, repo_id=e.repo_id or e.local_dir, revision=e.revision,
                 format=e.format, n_layers=len(e.layers), d_sae=e.d_sae, description=e.description)
            for e in registry().values()]
    return pd.DataFrame(rows)


def resolve(name_or_repo: str) -> RegistryEntry | None:
    """A registry entry by its name or by its Hub repo id."""
    reg = registry()
    if name_or_repo in reg:
        return reg[name_or_repo]
    for entry in reg.values():
        if entry.repo_id == name_or_repo:
            return entry
    return None


def local_model_path(name: str) -> str | None:
    """The directory of a model that ships with tc_explore (e.g. the demo
    model), looked up by the name of its registry entry or its model name."""
    for entry in registry().values():
        if entry.model_dir and name in (entry.name, entry.model):
            return entry.model_dir
    return None
