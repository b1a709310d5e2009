"""Integrity of the files tc_explore reads and writes, and fingerprints of what
an index was built from.

* ``atomic_write(path)`` writes to a temporary file beside ``path`` and swaps it
  in, so a crash or a full disk never leaves half a file where a good one was;
  a failed write becomes a ``StorageError`` naming the file.
* ``reading(path)`` turns the raw errors of torch, safetensors, numpy, yaml and
  zipfile on a damaged or hostile file into ``CorruptFileError`` or
  ``UnsafeFileError``, naming the file.
* ``check_zip_crc(path)``: torch ``.pt`` and numpy ``.npz`` files are zip
  archives with a CRC-32 per member, which torch and numpy do not check.
* ``verify_hub_file(path, ...)``: a file in the Hugging Face cache is a link to
  ``blobs/<name>``, where an LFS file's name is the sha256 of its content and a
  small file's the git blob sha1. Recomputing it catches damaged downloads.
  ``verify_model_snapshot(folder)`` does it for the files transformers reads
  from a model's snapshot (weights, configs, tokenizer).
* ``replace_folder(staging, out, aside)``: a finished folder swapped in, in one
  atomic step where the OS can (``exchange_paths``).
* ``sha256_file``, ``transcoder_fingerprint``, ``model_fingerprint``,
  ``tokenizer_digest``: what an index manifest records to refuse a resume or a
  dashboard with other weights.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .errors import CorruptFileError, InvalidInputError, StorageError, TcExploreError, UnsafeFileError

_CHUNK = 1 << 22

# -- writing ------------------------------------------------------------------------------
_STORAGE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                   errno.EFBIG: "the file is larger than the system allows",
                   errno.EROFS: "the file system is read-only", errno.EIO: "an I/O error occurred",
                   errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
# torch.save reports a failed write as a RuntimeError from its zip writer, e.g.
# "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0".
_TORCH_WRITE_FAILURE = re.compile(r"enforce fail at inline_container|PytorchStreamWriter|"
                                  r"file write failed|unexpected pos")


def storage_reason(err: BaseException) -> str | None:
    """Why a write failed, in words, if ``err`` is a failed write; else None."""
    if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
        return _STORAGE_ERRNOS[err.errno]
    if isinstance(err, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(err)):
        return "the write failed (is the disk full?)"
    # Rust writers (safetensors) report the OS error only in their message.
    m = re.search(r"\(os error (\d+)\)", str(err))
    if m and int(m[1]) in _STORAGE_ERRNOS:
        return _STORAGE_ERRNOS[int(m[1])]
    cause = err.__cause__ or err.__context__
    return storage_reason(cause) if cause is not None and cause is not err else None


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it
    replaces ``path`` in one step. On failure the temporary file is removed,
    ``path`` keeps its previous content, and a failed write (disk full,
    read-only folder) is raised as ``StorageError``."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"{path} is a folder: give the path of a file to write.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _raise_storage(path, err)
        raise StorageError(f"Could not create the folder {path.parent} for {path.name}: "
                           f"{err.strerror or err}. Choose another folder.") from err
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        _raise_storage(path, err)
        raise


def _raise_storage(path: Path, err: BaseException) -> None:
    if isinstance(err, TcExploreError):
        return
    reason = storage_reason(err)
    if reason is not None:
        kept = "keeps its previous content" if path.exists() else "was not created"
        raise StorageError(
            f"Could not write {path}: {reason} ({type(err).__name__}: {_first_line(err)}). "
            f"{path.name} {kept}. Free space (or choose another folder) and run again.") from err


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def replace_folder(staging: Path, out: Path, aside: Path) -> None:
    """Put the complete folder ``staging`` at ``out``, replacing what is there.
    Where the OS can (Linux ``renameat2(RENAME_EXCHANGE)``) the two trade
    places in one atomic step, so ``out`` holds the old or the new content at
    every instant, and the old content, now at ``staging``, is deleted after.
    Elsewhere: two renames, the old folder moved to ``aside`` first and deleted
    last (a crash between them leaves it at ``aside``, for the caller's repair)."""
    import shutil
    if not out.exists():
        os.rename(staging, out)
    elif exchange_paths(staging, out):
        shutil.rmtree(staging, ignore_errors=True)              # now the old content
    else:
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(out, aside)
        os.rename(staging, out)
        shutil.rmtree(aside, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); False, with nothing changed, where the OS, its C
    library or the filesystem cannot."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):                # a C library older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False                                  # this filesystem cannot exchange
    raise OSError(err, f"could not swap {a} and {b}: {os.strerror(err)}")


# -- reading ------------------------------------------------------------------------------
REPLACE_FILE = "Replace it with a good copy (download or save it again)."


def existing_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path if it is a file; a clear error naming it if it is
    missing or a folder (the public readers call this before ``reading``)."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"{path} is a folder, not a {what}: give the path of the file itself.")
    if not path.is_file():
        raise InvalidInputError(f"No {what} at {path}: the path does not exist. Check the path "
                                "(or download the file again).")
    return path


@contextmanager
def reading(path: str | os.PathLike, what: str = "file", remedy: str = REPLACE_FILE):
    """Translate the raw error of a reader that met a damaged or hostile file
    into ``CorruptFileError`` / ``UnsafeFileError`` naming ``path``. Wrap only
    the call that parses the file: a missing file or a permission error passes
    through unchanged."""
    try:
        yield
    except (TcExploreError, FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as err:  # noqa: BLE001 - classified below, re-raised when unknown
        unsafe = _unsafe_reason(err)
        if unsafe is not None:
            raise UnsafeFileError(
                f"Refused to load {path}: {unsafe} ({_first_line(err)}). Nothing from the file "
                "was executed.") from None
        if not _is_parse_error(err):
            raise
        raise CorruptFileError(
            f"{what} {path} is corrupted or truncated ({type(err).__name__}: {_first_line(err)}). "
            f"{remedy}") from err


def _unsafe_reason(err: Exception) -> str | None:
    import yaml
    if isinstance(err, yaml.constructor.ConstructorError) and "python/" in str(err):
        return "it asks YAML to build a Python object"
    if isinstance(err, ValueError) and "allow_pickle=False" in str(err):
        return "it holds a pickled object array, which loading would unpickle"
    text = str(err)
    if isinstance(err, (pickle.UnpicklingError, RuntimeError)) and (
            "GLOBAL" in text or "Weights only load failed" in text):
        return "unpickling it would call code that is not part of a transcoder file"
    return None


def _is_parse_error(err: Exception) -> bool:
    import yaml
    if isinstance(err, (EOFError, KeyError, ValueError, IndexError, struct.error, zipfile.BadZipFile,
                        UnicodeDecodeError, yaml.YAMLError, OSError, RuntimeError, TypeError,
                        MemoryError, OverflowError)):
        return True
    # safetensors raises its own SafetensorError (not an Exception subclass we can import
    # portably across versions); pyarrow its ArrowInvalid (a ValueError, covered above).
    return type(err).__name__ in ("SafetensorError", "ArrowInvalid", "ArrowIOError")


def _first_line(err: BaseException) -> str:
    """The informative line of a long library message (torch's name the global refused)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line[:300]
    return (lines[0] if lines else type(err).__name__)[:300]


def check_zip_crc(path: str | os.PathLike, what: str = "file", remedy: str = REPLACE_FILE) -> None:
    """Verify every member of a zip archive (torch ``.pt``, numpy ``.npz``)
    against the CRC-32 stored with it (about 1 GB/s). Skipped for a Hub cache
    blob already checked against its content hash in this process."""
    if _already_verified(path):
        return
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, struct.error) as err:
        if isinstance(err, (FileNotFoundError, PermissionError)):
            raise
        raise CorruptFileError(f"{what} {path} is corrupted or truncated: it is not a readable "
                               f"zip archive ({_first_line(err)}). {remedy}") from None
    if bad is not None:
        raise CorruptFileError(f"{what} {path} is corrupted: its member {bad!r} does not match "
                               f"the checksum stored with it. {remedy}")


# -- content hashes -----------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


_VERIFIED: dict[tuple[str, int, int], str] = {}


def hub_blob(path: str | os.PathLike) -> tuple[Path, str, str] | None:
    """``(blob path, algorithm, expected hex digest)`` of a file in the Hugging
    Face cache, or None for a file elsewhere (a local directory, a copy)."""
    blob = Path(os.path.realpath(path))
    if blob.parent.name != "blobs":
        return None
    if re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return blob, "sha256", blob.name
    if re.fullmatch(r"[0-9a-f]{40}", blob.name):
        return blob, "git-sha1", blob.name
    return None


def _already_verified(path) -> bool:
    found = hub_blob(path)
    if found is None:
        return False
    st = found[0].stat()
    return _VERIFIED.get((str(found[0]), st.st_size, st.st_mtime_ns)) == found[2]


def verify_hub_file(path: str | os.PathLike, repo_id: str, filename: str,
                    revision: str | None = None, what: str = "") -> bool:
    """Check a Hub file in the cache against the content hash its blob is
    named by. True when verified, False when ``path`` is not a cache blob.
    Each blob is hashed once per process (while its size and mtime stay)."""
    found = hub_blob(path)
    if found is None:
        return False
    blob, algo, want = found
    st = blob.stat()
    key = (str(blob), st.st_size, st.st_mtime_ns)
    if _VERIFIED.get(key) == want:
        return True
    got = sha256_file(blob) if algo == "sha256" else _git_blob_sha1(blob)
    if got != want:
        rev = f" --revision {revision}" if revision else ""
        raise CorruptFileError(
            f"{what + ' file ' if what else ''}{filename} of {repo_id}{'@' + revision if revision else ''} "
            f"in the Hugging Face cache is corrupted: its content hash is {got[:16]}…, the Hub's "
            f"is {want[:16]}…. Delete the damaged cache entry {blob} and re-download it with "
            f"`hf download {repo_id} {filename}{rev} --force-download`.")
    _VERIFIED[key] = want
    return True


# The files transformers reads from a model snapshot (configs, tokenizer, weights
# as safetensors; .bin/.pt only where a snapshot has no safetensors). Other
# frameworks' weights (.h5, .msgpack, .onnx ...) are never read and not hashed.
_MODEL_TEXT_SUFFIXES = (".json", ".txt", ".model", ".tiktoken")
_MODEL_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def snapshot_repo(folder: str | os.PathLike) -> tuple[str, str] | None:
    """``(repo_id, revision)`` of a Hugging Face cache snapshot folder
    (``.../models--OWNER--NAME/snapshots/COMMIT``), or None for another folder."""
    folder = Path(os.path.abspath(folder))
    repo_dir = folder.parent.parent
    if folder.parent.name != "snapshots" or "--" not in repo_dir.name:
        return None
    return repo_dir.name.split("--", 1)[1].replace("--", "/"), folder.name


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cache's snapshot folder of Hub model ``repo_id`` at ``revision``
    (default: the main branch), or None when nothing of it is cached."""
    from huggingface_hub import try_to_load_from_cache
    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:   # noqa: BLE001 - an id the cache cannot hold: nothing cached to check
        return None
    return Path(found).parent if isinstance(found, str) else None


def verify_model_snapshot(folder: str | os.PathLike, repo_id: str | None = None) -> int:
    """Check the files transformers reads from a model snapshot in the Hugging
    Face cache (configs, tokenizer files, weights) against the content hashes
    their blobs are named by. Raises ``CorruptFileError`` naming the first
    damaged file; returns the number of files checked (0 for a folder outside
    the cache). Each blob is hashed once per process."""
    folder = Path(folder)
    found = snapshot_repo(folder)
    if found is None:
        return 0
    repo_id, revision = repo_id or found[0], found[1]
    files = sorted(p for p in folder.iterdir() if p.is_file())
    has_safetensors = any(p.suffix == ".safetensors" for p in files)
    read = [p for p in files if p.suffix in _MODEL_TEXT_SUFFIXES or p.suffix == ".safetensors"
            or (p.suffix in _MODEL_TORCH_SUFFIXES and not has_safetensors)]
    return sum(verify_hub_file(p, repo_id, p.name, revision, what="model") for p in read)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's content; free for a verified Hub cache blob."""
    found = hub_blob(path)
    if found is not None and found[1] == "sha256":
        return found[2]
    return sha256_file(path)


# -- fingerprints -------------------------------------------------------------------------
@torch.no_grad()
def weights_digest(*tensors: torch.Tensor) -> str:
    """A short digest of some weights, rounded to bfloat16 first: the same
    weights held in float32, float16 or bfloat16, on any device, give the same
    digest (rounding is idempotent), other weights a different one."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu", torch.float32).to(torch.bfloat16).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def transcoder_fingerprint(tc, *extra: torch.Tensor) -> str:
    """A cheap digest of a few of a transcoder's weights (rows and columns of
    both matrices, some biases) and of ``extra`` tensors (a cross-layer
    transcoder's per-target decoder rows): tells other weights apart without
    reading whole matrices."""
    return weights_digest(tc.W_enc[:, :8], tc.W_enc[:8], tc.W_dec[:8], tc.b_enc[:8], tc.W_dec[-8:], *extra)


_SAMPLE = 4096


@torch.no_grad()
def model_fingerprint(model) -> dict:
    """What identifies a model's weights: its configuration and, per parameter,
    the mean absolute value of a fixed strided sample of its entries. Compared
    with a tolerance (``fingerprint_difference``), so the same weights on another
    device or in another dtype match and other weights do not."""
    cfg = model.cfg
    config = {k: getattr(cfg, k, None) for k in ("n_layers", "d_model", "n_heads", "d_mlp",
                                                 "d_vocab", "n_ctx", "act_fn", "normalization_type")}
    config = {k: (v if isinstance(v, (int, float, str, type(None))) else str(v)) for k, v in config.items()}
    shapes, scales = [], []
    for _, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        sample = flat[::step][:_SAMPLE].float()
        shapes.append(list(p.shape))
        scales.append(float(f"{float(sample.abs().mean()) if sample.numel() else 0.0:.6g}"))
    return {"config": config, "parameter_shapes": shapes, "parameter_scales": scales}


def tokenizer_digest(tokenizer) -> str | None:
    """sha256 of a tokenizer's full definition (fast tokenizers), or of its
    vocabulary and special tokens; None without a tokenizer."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        text = backend.to_str()
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        text = repr((vocab, getattr(tokenizer, "all_special_tokens", None)))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint_difference(recorded: dict | None, current: dict | None, what: str = "model",
                           rtol: float = 1e-2) -> str | None:
    """A sentence saying how two ``model_fingerprint`` results differ, or None
    when they match (or either is unknown)."""
    if not recorded or not current:
        return None
    for key in sorted(set(recorded.get("config", {})) | set(current.get("config", {}))):
        a, b = recorded.get("config", {}).get(key), current.get("config", {}).get(key)
        if a != b:
            return f"the {what}'s {key} is {b!r}, the index was built with {a!r}"
    if recorded.get("parameter_shapes") != current.get("parameter_shapes"):
        return f"the {what}'s parameter shapes differ from those the index was built with"
    for i, (a, b) in enumerate(zip(recorded.get("parameter_scales", []),
                                   current.get("parameter_scales", []))):
        if abs(a - b) > rtol * max(abs(a), abs(b)) + 1e-12:
            n = len(recorded["parameter_scales"])
            return (f"the {what}'s weights differ from those the index was built with "
                    f"(parameter {i} of {n}: mean |w| {b:.6g} now, {a:.6g} then)")
    return None
