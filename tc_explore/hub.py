"""Loading transcoder sets: registry entries (``tc_explore.registry``), Hub
repos and local directories. Files come from the Hub through
``huggingface_hub.hf_hub_download`` into the standard cache, so ``HF_HOME``,
``HF_HUB_OFFLINE`` and tokens behave as everywhere else; a local directory
works too.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .errors import (IncompatibleTranscoderError, InvalidInputError, OfflineFileMissingError,
                     TcExploreError, UnknownTranscoderSetError, as_integer)
from .formats import (parse_hf_uri, read_circuit_tracer_config, read_circuit_tracer_safetensors,
                      read_gemma_scope_2_safetensors, read_gemma_scope_npz, read_gpt2_transcoder,
                      read_log_feature_sparsity)
from .integrity import reading, verify_hub_file
from .model import as_dtype, default_device, hook_ln2_normalized, hook_mlp_out, layer_hook
from .registry import RegistryEntry, registry, resolve
from .cross_layer import CrossLayerTranscoderSet
from .transcoder import LayerInfo, Transcoder, TranscoderSet

# -- downloading ---------------------------------------------------------------------
def download(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """One file from the Hub into the standard cache (with a progress bar);
    a clear error naming the repo and the command to fetch it where it is not
    cached and cannot be downloaded (offline, or the Hub unreachable)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    from .hub_access import hub_access

    with hub_access() as access:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        except hf_errors.LocalEntryNotFoundError as err:
            rev = f" --revision {revision}" if revision else ""
            raise OfflineFileMissingError(access.missing(
                f"{filename} of {repo_id}{'@' + revision if revision else ''}",
                f"hf download {repo_id} {filename}{rev}")) from err
        except hf_errors.RevisionNotFoundError as err:
            raise OfflineFileMissingError(
                f"Revision {revision!r} of {repo_id} does not exist on the Hub. Pass "
                "revision='main' (or another commit) to load_transcoders.") from err
        except (hf_errors.RepositoryNotFoundError, hf_errors.EntryNotFoundError) as err:
            raise OfflineFileMissingError(
                f"{filename} was not found in Hub repo {repo_id}"
                f"{'@' + revision if revision else ''}: {type(err).__name__}. Check the repo id, "
                "revision and file name (gated repos need `hf auth login`).") from err


class _Files:
    """Where a set's files come from: a Hub repo at a revision, or a directory.
    Files from the Hub are checked against the cache's content hash when first
    read (``verify``), not when listed: loading a set reads only the layers used."""

    def __init__(self, repo_id: str | None = None, revision: str | None = None,
                 directory: str | Path | None = None):
        self.repo_id, self.revision = repo_id, revision
        self.directory = Path(directory) if directory is not None else None
        self._origins: dict[Path, tuple[str, str, str | None]] = {}

    def get(self, filename: str) -> Path:
        if self.directory is not None:
            path = self._inside_directory(filename)
            if not path.is_file():
                raise OfflineFileMissingError(f"{path} does not exist.")
            return path
        _check_repo_filename(filename, self.repo_id)
        return self._download(self.repo_id, filename, self.revision)

    def matching(self, pattern: str) -> list[str]:
        """Names of the files matching a glob ``pattern``: in the directory, or
        in the repo (the matching files are downloaded into the cache, or
        found there when offline)."""
        if self.directory is not None:
            return sorted(p.name for p in self.directory.glob(pattern))
        from huggingface_hub import snapshot_download
        try:
            root = Path(snapshot_download(self.repo_id, revision=self.revision,
                                          allow_patterns=[pattern]))
        except Exception as err:   # huggingface_hub raises several kinds here
            raise OfflineFileMissingError(
                f"Could not list or fetch {pattern} of {self.repo_id}"
                f"{'@' + self.revision if self.revision else ''} ({type(err).__name__}: {err}). "
                f"While online, run `hf download {self.repo_id} --include '{pattern}'`.") from err
        return sorted(p.name for p in root.glob(pattern))

    def get_uri(self, uri: str) -> Path:
        if uri.startswith("hf://"):
            parsed = parse_hf_uri(uri)
            _check_repo_filename(parsed.filename, parsed.repo_id)
            # A URI into this set's own repo inherits its revision unless it pins one.
            inherited = self.revision if parsed.repo_id == self.repo_id else None
            return self._download(parsed.repo_id, parsed.filename, parsed.revision or inherited)
        return self.get(uri)

    def _download(self, repo_id: str, filename: str, revision: str | None) -> Path:
        path = download(repo_id, filename, revision)
        self._origins[path] = (repo_id, filename, revision)
        return path

    def verify(self, path: Path) -> None:
        """Raise CorruptFileError if a file from the Hub no longer matches the
        content hash its cache blob is named by (a damaged download or disk)."""
        origin = self._origins.get(path)
        if origin is not None:
            verify_hub_file(path, *origin)

    def _inside_directory(self, filename: str) -> Path:
        """``directory / filename``, refusing a name (from a config file) that
        points outside the set's directory."""
        # Checked on the names, not resolved: a set may be a folder of symlinks.
        root = Path(os.path.normpath(self.directory.absolute()))
        path = Path(os.path.normpath(root / filename))
        if Path(filename).is_absolute() or not path.is_relative_to(root) or path == root:
            raise IncompatibleTranscoderError(
                f"The transcoder set in {self.directory} names the file {filename!r}, which lies "
                "outside its directory; a set may only read files inside its own directory "
                "(or hf:// URIs). Fix the path in its config.")
        return path


def _check_repo_filename(filename: str, repo_id: str | None) -> None:
    parts = filename.replace("\\", "/").split("/")
    if filename.startswith("/") or ".." in parts or not filename.strip():
        raise IncompatibleTranscoderError(
            f"File name {filename!r} in Hub repo {repo_id} is not a path inside the repo "
            "(absolute, empty or with '..'). Fix the path in the set's config.")


# -- loading -------------------------------------------------------------------------
def load_transcoders(name_or_repo: str | os.PathLike, layers: Sequence[int] | None = None,
                     revision: str | None = None, device=None, dtype=None) -> TranscoderSet:
    """Load a transcoder set: a registry name (``"gpt2-small"``), a Hub repo id,
    or a local directory. Files of the chosen ``layers`` (default: all) are put
    in the cache now; each layer's weights are read on first use."""
    dtype = as_dtype(dtype) or torch.float32
    device = default_device(device)
    source = str(name_or_repo)
    entry = resolve(source)
    if entry is not None:
        if entry.local_dir:
            files = _Files(directory=entry.local_dir)
        else:
            files = _Files(entry.repo_id, revision or entry.revision)
        return _load_entry(entry, files, layers, device, dtype)
    if os.path.isdir(source):
        return _load_directory(Path(source), layers, device, dtype)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        files = _Files(source, revision)
        try:
            config_path = files.get("config.yaml")
        except OfflineFileMissingError as err:
            raise UnknownTranscoderSetError(
                f"{source!r} is not in tc_explore's registry ({sorted(registry())}) and its "
                f"config.yaml could not be read ({err}). Pass a registry name, a local "
                "directory, or a circuit-tracer style Hub repo.") from err
        return _load_circuit_tracer(source, config_path, files, layers, device, dtype)
    raise UnknownTranscoderSetError(
        f"{source!r} is neither a registered transcoder set ({sorted(registry())}), a local "
        "directory, nor a Hub repo id of the form owner/name.")


def _select_layers(available: Sequence[int], layers: Sequence[int] | None, name: str) -> list[int]:
    if layers is None:
        return list(available)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable) or getattr(layers, "ndim", None) == 0:
        layers = [layers]
    layers = list(dict.fromkeys(as_integer(l, "layer") for l in layers))
    if not layers:
        raise InvalidInputError(f"layers is empty: pass None for all of transcoder set {name!r}'s layers "
                                f"({list(available)}), or some of them.")
    bad = [l for l in layers if l not in available]
    if bad:
        raise InvalidInputError(
            f"Layer(s) {bad} are not in transcoder set {name!r}; it has layers {list(available)}.")
    return layers


def _load_entry(entry: RegistryEntry, files: _Files, layers, device, dtype) -> TranscoderSet:
    if entry.format == "circuit-tracer":
        return _load_circuit_tracer(entry.name, files.get("config.yaml"), files, layers, device,
                                    dtype, model_name=entry.model, known_layers=entry.layers)
    chosen = _select_layers(entry.layers, layers, entry.name)
    reader = _READERS[entry.format]
    info, loaders, freq = {}, {}, {}
    for layer in chosen:
        ih, oh = layer_hook(entry.input_hook, layer), layer_hook(entry.output_hook, layer)
        # Shapes come from the files themselves (read on first use): the registry's
        # d_in / d_sae document the published set, a local copy may differ.
        info[layer] = LayerInfo(layer, ih, oh)
        path = files.get(entry.file_pattern.replace("{L}", str(layer)))
        loaders[layer] = _loader(reader, path, layer, ih, oh, files)
        if entry.frequency_pattern:
            fpath = files.get(entry.frequency_pattern.replace("{L}", str(layer)))
            freq[layer] = _loader(lambda p, layer: read_log_feature_sparsity(p), fpath, layer,
                                  None, None, files)
    return TranscoderSet(entry.name, info, loaders, freq, model_name=entry.model,
                         repo_id=entry.repo_id or entry.local_dir, revision=files.revision,
                         device=device, dtype=dtype)


def _loader(reader, path, layer, input_hook, output_hook, files: _Files) -> Callable[[], Transcoder]:
    """Read one layer's file on first use: check it against the Hub's content
    hash, then parse it; errors name the file."""
    def load():
        files.verify(path)
        try:
            loaded = reader(path, layer=layer)
        except TcExploreError as err:
            if str(path) in str(err):
                raise
            raise type(err)(f"{path}: {err}") from None
        if isinstance(loaded, Transcoder):
            loaded.layer, loaded.input_hook, loaded.output_hook = layer, input_hook, output_hook
        return loaded
    return load


def _read_by_extension(path, layer=None):
    path = Path(path)
    if path.suffix == ".npz":
        return read_gemma_scope_npz(path, layer=layer)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with reading(path, "safetensors file"), safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
        if "w_enc" in keys:
            return read_gemma_scope_2_safetensors(path, layer=layer)
        return read_circuit_tracer_safetensors(path, layer=layer)
    if path.suffix == ".pt":
        return read_gpt2_transcoder(path, layer=layer)
    raise IncompatibleTranscoderError(f"{path}: unknown transcoder file type {path.suffix!r}.")


_READERS = {"gpt2-pickle": read_gpt2_transcoder, "gemma-scope-npz": read_gemma_scope_npz,
            "circuit-tracer": _read_by_extension}


def _load_circuit_tracer(name, config_path, files: _Files, layers, device, dtype,
                         model_name=None, known_layers=None) -> TranscoderSet:
    """``known_layers``: the layers a registry entry documents, for a Hub repo
    of ``layer_{L}.safetensors`` files whose config.yaml does not list them."""
    cfg = read_circuit_tracer_config(config_path)
    for key in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(cfg[key], str) or not cfg[key].strip():
            raise IncompatibleTranscoderError(
                f"{config_path}: {key!r} must be a hook name such as 'hook_mlp_out', got {cfg[key]!r:.100}.")
    if cfg.get("model_kind") == "cross_layer_transcoder":
        return _load_clt(name, cfg, files, layers, device, dtype, model_name)
    uris = cfg.get("transcoders")
    if uris is not None and not (isinstance(uris, list) and all(isinstance(u, str) for u in uris)):
        raise IncompatibleTranscoderError(
            f"{config_path}: 'transcoders' must be a list of file paths or hf:// URIs, one per "
            f"layer; got {uris!r:.200}.")
    if uris:
        available = list(range(len(uris)))
    elif files.directory is not None:
        available = _layers_in_directory(files)
    else:
        available = list(known_layers) if known_layers else None
    if available is None and layers is None:
        raise IncompatibleTranscoderError(
            f"{config_path} lists no 'transcoders', so the layers of Hub repo {files.repo_id} "
            "cannot be known offline: pass layers=[...] explicitly.")
    chosen = _select_layers(available, layers, name) if available is not None else list(layers)
    info, loaders = {}, {}
    for layer in chosen:
        ih = layer_hook(cfg["feature_input_hook"], layer)
        oh = layer_hook(cfg["feature_output_hook"], layer)
        info[layer] = LayerInfo(layer, ih, oh)
        path = files.get_uri(uris[layer]) if uris else files.get(f"layer_{layer}.safetensors")
        loaders[layer] = _loader(_read_by_extension, path, layer, ih, oh, files)
    return TranscoderSet(name, info, loaders, model_name=model_name or cfg.get("model_name"),
                         repo_id=files.repo_id or str(files.directory), revision=files.revision,
                         device=device, dtype=dtype)


def _load_clt(name, cfg: dict, files: _Files, layers, device, dtype, model_name=None) -> TranscoderSet:
    """A cross-layer transcoder: ``W_enc_{L}`` / ``W_dec_{L}.safetensors`` for every
    layer, fetched on first use (a decoder file only when its rows are read)."""
    from .formats.clt import decoder_file, encoder_file
    found = sorted(int(m[1]) for f in files.matching("W_enc_*.safetensors")
                   if (m := re.fullmatch(r"W_enc_(\d+)\.safetensors", f)))
    if not found or found != list(range(len(found))):
        raise IncompatibleTranscoderError(
            f"Cross-layer transcoder {name!r}: expected W_enc_0..W_enc_{{n-1}}.safetensors, "
            f"found layers {found}.")
    if layers is not None and sorted(_select_layers(found, layers, name)) != found:
        raise InvalidInputError(
            f"{name!r} is a cross-layer transcoder: every layer's features write to the later "
            "layers' MLP outputs, so it loads whole (pass layers=None).")

    def fetch(filename):
        cache = {}

        def get():
            if "path" not in cache:
                path = files.get(filename)
                files.verify(path)
                cache["path"] = path
            return cache["path"]
        return get
    # Every file's content hash is checked on first use: a decoder is read whole
    # anyway when its layer loads (its sum over targets is the layer's W_dec),
    # and once per process, so later row slices cost nothing more.
    return CrossLayerTranscoderSet(
        name, len(found), cfg["feature_input_hook"], cfg["feature_output_hook"],
        {l: fetch(encoder_file(l)) for l in found}, {l: fetch(decoder_file(l)) for l in found},
        model_name=model_name or cfg.get("model_name"),
        repo_id=files.repo_id or str(files.directory), revision=files.revision,
        device=device, dtype=dtype)


def _layers_in_directory(files: _Files) -> list[int]:
    found = [int(m[1]) for p in files.directory.glob("layer_*.safetensors")
             if (m := re.fullmatch(r"layer_(\d+)\.safetensors", p.name))]
    return sorted(found)


_GPT2_FILE = re.compile(r".*blocks\.(\d+)\.ln2\.hook_normalized_(\d+)\.pt$")


def _load_directory(directory: Path, layers, device, dtype) -> TranscoderSet:
    """A local directory in one of the published layouts (or with our own
    ``transcoders.json``, a registry entry whose files lie beside it)."""
    if (directory / "transcoders.json").is_file():
        entry = RegistryEntry.from_dict(
            json.loads((directory / "transcoders.json").read_text(encoding="utf-8")), directory)
        return _load_entry(entry, _Files(directory=directory), layers, device, dtype)
    if (directory / "config.yaml").is_file():
        return _load_circuit_tracer(directory.name, directory / "config.yaml",
                                    _Files(directory=directory), layers, device, dtype)
    matches = {int(m[1]): p for p in directory.glob("*.pt") if (m := _GPT2_FILE.match(p.name))}
    if matches:
        example = next(iter(matches.values())).name
        layer0 = _GPT2_FILE.match(example)[1]
        pattern = example.replace(f"blocks.{layer0}.", "blocks.{L}.")
        freq = pattern.replace(".pt", "_log_feature_sparsity.pt")
        entry = RegistryEntry(
            name=directory.name, model="unknown", format="gpt2-pickle",
            layers=tuple(sorted(matches)), input_hook=hook_ln2_normalized("{L}"),
            output_hook=hook_mlp_out("{L}"), file_pattern=pattern,
            frequency_pattern=freq if all((directory / freq.replace("{L}", str(l))).is_file()
                                          for l in matches) else None)
        return _load_entry(entry, _Files(directory=directory), layers, device, dtype)
    raise UnknownTranscoderSetError(
        f"{directory} holds no transcoder set tc_explore can read: expected config.yaml "
        "(circuit-tracer), transcoders.json (tc_explore), or gpt2-small style "
        "*blocks.L.ln2.hook_normalized_N.pt files.")
