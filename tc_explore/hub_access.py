"""Reaching the Hugging Face Hub, or knowing at once that it cannot be reached.

Without ``HF_HUB_OFFLINE=1``, huggingface_hub asks the Hub about every file,
even one already in the cache, and where there is no network it retries each
request for about 24 s before it falls back to the cache or fails with a
message about offline mode. tc_explore instead checks once per process, with
one short request, whether the Hub answers. If it does not, every load from
then on reads the local cache only (exactly as ``HF_HUB_OFFLINE=1`` would),
with one warning that says so; a file missing from the cache then fails at
once with an error that says the Hub is unreachable and how to fill the cache.

    with hub_access() as access:       # around any call that may download
        ...
    access.missing(what, command)      # the text for a file that is not cached
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from functools import lru_cache

# How long the one probe request may take. A missing network fails at once
# (name resolution); a silently dropped connection takes this long, once.
PROBE_TIMEOUT_S = 5.0


class HubUnreachableWarning(UserWarning):
    """The Hub did not answer; tc_explore reads the local cache only."""


def offline_by_environment() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for the cache only."""
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def cache_dir() -> str:
    """The Hugging Face cache models and transcoders are read from."""
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


@lru_cache(maxsize=None)
def _probe(url: str) -> str | None:
    try:
        from huggingface_hub.utils import get_session
        get_session().head(url, timeout=PROBE_TIMEOUT_S, follow_redirects=False)
    except Exception as err:  # any transport failure means: not reachable from here
        reason = str(err).strip() or type(err).__name__
        return reason.splitlines()[0][:200]
    return None


def unreachable_reason() -> str | None:
    """``None`` when the Hub answered the (once per process) probe, else why not."""
    return _probe(endpoint())


@dataclass
class HubAccess:
    """How the Hub was reached for one load: ``"online"``, ``"offline"``
    (``HF_HUB_OFFLINE`` set) or ``"unreachable"`` (cache only, ``reason`` says why)."""
    mode: str
    reason: str | None = None

    def missing(self, what: str, command: str, cache: str | None = None) -> str:
        """What to say when ``what`` is not in the cache (default: the Hub
        file cache); ``command`` fetches it."""
        cache = cache or cache_dir()
        if self.mode == "unreachable":
            return (f"{what} is not in the local Hugging Face cache ({cache}), and the Hub "
                    f"({endpoint()}) cannot be reached from this machine: {self.reason}. "
                    f"Where the Hub is reachable, run `{command}`; then use that cache here "
                    f"(copy it, or point HF_HOME at it). Once the files are cached, setting "
                    "HF_HUB_OFFLINE=1 skips the network check.")
        if self.mode == "offline":
            return (f"{what} is not in the local Hugging Face cache ({cache}), and "
                    "HF_HUB_OFFLINE=1 forbids downloading. Run `" + command + "` where the Hub "
                    "is reachable (with HF_HUB_OFFLINE unset), or unset HF_HUB_OFFLINE here.")
        return (f"{what} could not be downloaded from the Hub ({endpoint()}) into the cache "
                f"({cache}). Check the name, your network and (for gated repos) `hf auth "
                f"login`; `{command}` fetches it.")


_warned: set[str] = set()


@contextlib.contextmanager
def _cache_only():
    """Switch huggingface_hub (and with it transformers) and datasets to the
    cache for the duration, as HF_HUB_OFFLINE=1 would."""
    from huggingface_hub import constants
    saved = [(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)]
    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config as ds_config
    except ImportError:
        ds_config = None
    if ds_config is not None:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(ds_config, name):
                saved.append((ds_config, name, getattr(ds_config, name)))
                setattr(ds_config, name, True)
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


@contextlib.contextmanager
def hub_access():
    """Around a load that may reach the Hub: yields a ``HubAccess``. Where the
    Hub does not answer and ``HF_HUB_OFFLINE`` is unset, the block runs on the
    cache only, after one warning per process."""
    if offline_by_environment():
        yield HubAccess("offline")
        return
    reason = unreachable_reason()
    if reason is None:
        yield HubAccess("online")
        return
    if endpoint() not in _warned:
        _warned.add(endpoint())
        warnings.warn(
            f"The Hugging Face Hub ({endpoint()}) cannot be reached from this machine ({reason}). "
            f"tc_explore reads models, transcoders and datasets from the local cache "
            f"({cache_dir()}) only, as with HF_HUB_OFFLINE=1; set HF_HUB_OFFLINE=1 yourself to "
            "skip this check.", HubUnreachableWarning, stacklevel=3)
    with _cache_only():
        yield HubAccess("unreachable", reason)
