"""Progress bars for long work (index builds, weight views, evaluation,
training, attribution): ``tqdm.auto``, so a notebook shows a widget and a
terminal a text bar.

Every long-running function takes ``progress: bool | None = None``. ``None``
means on, except where the environment variable ``CI`` is set (to anything but
``""``, ``0`` or ``false``), as CI services do; ``TC_EXPLORE_PROGRESS=0`` or
``=1`` overrides both (it takes 1/true/yes/on and 0/false/no/off or empty;
any other value is refused, since a typo must not silently mean on).
"""
from __future__ import annotations

import os

from .errors import InvalidInputError

_FALSE = ("", "0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to show a progress bar: ``progress`` when given, else the
    environment's default (on, off in CI)."""
    if progress is not None:
        return bool(progress)
    forced = os.environ.get("TC_EXPLORE_PROGRESS")
    if forced is not None:
        value = forced.strip().lower()
        if value not in _TRUE + _FALSE:
            raise InvalidInputError(
                f"The environment variable TC_EXPLORE_PROGRESS={forced!r} is neither on "
                f"({', '.join(_TRUE)}) nor off ({', '.join(repr(v) if not v else v for v in _FALSE)}); "
                "set it to 1 or 0, or unset it.")
        return value in _TRUE
    return os.environ.get("CI", "").strip().lower() in _FALSE


class _NoBar:
    """What a disabled bar is: every call does nothing."""

    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_description(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 progress: bool | None = None, **kwargs):
    """A ``tqdm.auto`` bar over ``iterable`` (or with ``total`` for manual
    ``update``), or an object with the same methods that shows nothing."""
    if not progress_enabled(progress):
        return _NoBar(iterable)
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, **kwargs)
