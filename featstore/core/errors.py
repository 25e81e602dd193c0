"""The toolkit's root error type.

Every package's own base error (``FeatstoreError``, ``MilError``, ``AnalysisError``,
``StudyError``) derives from :class:`CoreError`, so a command can turn any user error into one
red line by catching this one type. Errors raised by ``core`` itself (a bad device name, a bad
config key, a statistic asked of impossible input) are :class:`CoreError` subclasses that also
inherit the matching builtin, as zarr-python does.
"""

from __future__ import annotations


class CoreError(Exception):
    """Base class of every error the toolkit raises on bad input."""


class ConfigError(CoreError, ValueError):
    """A config value or key is invalid (unknown key, wrong type, out of range, bad device)."""


class StatsError(CoreError, ValueError):
    """A statistic was asked of input it cannot be computed on (shapes, a single class)."""


class LabelsError(CoreError, ValueError):
    """A labels CSV is malformed or does not match the store (:mod:`featstore.core.labels`, mil splits)."""


#: errno values meaning "nothing more can be written here": the disk (or quota) is full, read-only
_NO_ROOM = {28: "no space left on device", 122: "disk quota exceeded", 30: "read-only file system"}
_NET_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "gcsfs", "adlfs")
_NET_WORDS = ("Connect", "Endpoint", "Timeout", "Disconnected", "ReadTimeout")


def resource_problem(exc: BaseException) -> str | None:
    """Why no further work can succeed, for errors of the machine rather than of one input, else None.

    "no space left on device" (and a full quota or a read-only file system) for OSErrors, or
    "unreachable" for a remote service (an object store) that refuses or drops connections, from
    the standard library or the botocore/aiohttp stack (their own classes, not OSError). The
    causes of *exc* are looked at too (libraries wrap connection errors in their own).
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_ROOM:
            return _NO_ROOM[e.errno]
        if isinstance(e, (ConnectionError, TimeoutError)):
            return "unreachable"
        cls = type(e)
        if cls.__module__.split(".")[0] in _NET_MODULES and any(w in cls.__name__ for w in _NET_WORDS):
            return "unreachable"
        e = e.__cause__ or e.__context__
    return None


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its class name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
