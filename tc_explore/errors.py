"""Errors that tell the user what was wrong and what to do about it.

Every check in the library raises one of these instead of letting a shape
mismatch or an index error surface from deep inside torch.
"""
from __future__ import annotations


class TcExploreError(Exception):
    """Base class of every error tc_explore raises on purpose."""


class InvalidInputError(TcExploreError, ValueError):
    """A layer, feature index, prompt or argument that cannot be used as given."""


class IncompatibleTranscoderError(TcExploreError, ValueError):
    """A transcoder whose shapes or hooks do not fit the model it is used with."""


class UnsafeFileError(TcExploreError):
    """A file whose loading would execute code; it was refused, nothing ran."""


class OfflineFileMissingError(TcExploreError, FileNotFoundError):
    """A file that is neither in the local Hugging Face cache nor downloadable now."""


class UnknownTranscoderSetError(TcExploreError, KeyError):
    """A name that is neither in the registry, a local directory nor a Hub repo we can read."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class IndexIncompleteError(TcExploreError):
    """An index directory whose build has not finished (resume it with build)."""


class TokenizationWarning(UserWarning):
    """Text that does not tokenize the way it reads: words the tokenizer does not
    know, or a target string whose token is not the one the model predicts there."""


class StaleLockWarning(UserWarning):
    """A lock on an index folder was taken over from a holder presumed dead (its
    heartbeat stopped); the message names the old holder."""


class CorruptFileError(TcExploreError, ValueError):
    """A file whose bytes are damaged (truncated, flipped, not the format it
    claims); the message names the file and how to get a good copy."""


class StorageError(TcExploreError, OSError):
    """A write that failed (disk full, read-only folder, quota); the file it
    was meant to replace still holds its previous content."""


def as_integer(value, what: str) -> int:
    """``value`` as an int if it is an integer (Python, numpy or a 0-d integer
    tensor); floats are refused rather than truncated, and so are bools."""
    import operator
    if isinstance(value, bool):
        raise InvalidInputError(f"{what} must be an integer, got {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidInputError(f"{what} must be an integer, got {value!r:.80} "
                                f"({type(value).__name__}).") from None


def as_count(value, what: str, minimum: int = 1) -> int:
    """``value`` as an int (as ``as_integer``) that is at least ``minimum``:
    the one rule for sizes, counts and ``k`` arguments."""
    kind = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
    if isinstance(value, bool):
        raise InvalidInputError(f"{what} must be {kind}, got {value!r}.")
    try:
        count = as_integer(value, what)
    except InvalidInputError:
        raise InvalidInputError(f"{what} must be {kind}, got {value!r:.80} ({type(value).__name__}).") from None
    if count < minimum:
        raise InvalidInputError(f"{what} must be {kind}, got {value!r}.")
    return count


def as_number(value, what: str, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a finite float (Python, numpy or a 0-d tensor number; not a
    bool, string or None), within ``[low, high]`` where given."""
    import math
    import numbers
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or (
            hasattr(value, "ndim") and getattr(value, "ndim") == 0 and hasattr(value, "item")
            and isinstance(value.item(), numbers.Real) and not isinstance(value.item(), bool))):
        raise InvalidInputError(f"{what} must be a number, got {value!r:.80} ({type(value).__name__}).")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidInputError(f"{what} must be a finite number, got {number}.")
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f"in [{low}, {high}]" if low is not None and high is not None else (
            f">= {low}" if low is not None else f"<= {high}")
        raise InvalidInputError(f"{what} must be {bounds}, got {value!r}.")
    return number


def as_flag(value, what: str, allow_none: bool = False) -> bool | None:
    """``value`` as a bool if it is one (Python or numpy; None where
    ``allow_none``): a string such as ``"no"`` is truthy and would silently
    mean True, e.g. ``overwrite="no"`` would replace a folder."""
    if value is None and allow_none:
        return None
    if type(value).__name__ not in ("bool", "bool_"):
        raise InvalidInputError(f"{what} must be True or False{' (or None)' if allow_none else ''}, "
                                f"got {value!r:.60}.")
    return bool(value)


def check_feature(feature, d_sae: int, where: str) -> int:
    """The one rule for a feature index: an integer (as ``as_integer``: Python,
    numpy or 0-d tensor integers; not bools or floats) in ``0..d_sae - 1``.
    ``where`` names what has the features ("layer 3 of 'gpt2-small'")."""
    feature = as_integer(feature, "feature")
    if not 0 <= feature < d_sae:
        raise InvalidInputError(f"feature {feature} is out of range for {where}: it has {d_sae} "
                                f"features (0..{d_sae - 1}).")
    return feature


class NonFiniteError(TcExploreError, ValueError):
    """Activations holding NaN or infinity (a model or transcoder overflowing,
    e.g. in float16, or NaN weights); the message names where they appeared."""


NON_FINITE_REMEDY = ("The model or its transcoders overflowed (or hold NaN weights) on this input: load "
                     "the model in float32 (or bfloat16 rather than float16), and check its weights.")


def refuse_non_finite(values, what: str, dims: tuple = (), labels: dict | None = None,
                      remedy: str = NON_FINITE_REMEDY) -> None:
    """Raise ``NonFiniteError`` if the tensor ``values`` holds NaN or infinity,
    saying what it is, how many and where the first is (``dims`` names its
    leading dimensions, e.g. ("position",); ``labels`` maps a dimension to the
    names of its entries, e.g. token strings). NaN would otherwise flow on into
    statistics, graphs and exports that look like results."""
    import torch
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return
    n_nan = int(torch.isnan(values).sum())
    n_inf = int(bad.sum()) - n_nan
    first = torch.nonzero(bad)[0].tolist()
    parts = []
    for dim, i in zip(dims, first):
        names = (labels or {}).get(dim)
        parts.append(f"{dim} {i}" + (f" ({names[i]!r})" if names is not None and i < len(names) else ""))
    at = f", the first at {', '.join(parts)}" if parts else ""
    raise NonFiniteError(f"{what}: {n_nan} NaN and {n_inf} infinite values{at}. {remedy}")


class IndexLockedError(TcExploreError):
    """An index folder that another live build or merge holds; the message
    names the holder (pid, host, start time)."""


class FingerprintMismatchError(IncompatibleTranscoderError):
    """Weights, tokenizer or corpus other than those an index was built from;
    the message says which differ."""
