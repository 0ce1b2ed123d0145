"""fxpasses' on-disk compile cache: where it lives, what an entry holds, and how entries are read and written.

A restarted server compiles the same graphs again. For the non-Inductor path this cache keeps, per captured Dynamo
graph, the graph our pipeline produced (after AOT autograd's functionalization, our passes and
defunctionalization), so a restart skips pattern tracing, AOT's trace and the pipeline (see docs/caching.md).

Never a wrong graph: an entry is written to a temporary file and renamed into place (``os.replace``, atomic on one
file system), so a reader sees a whole entry or none; each entry carries a SHA-256 of its payload and the key it
was written for, so a truncated, corrupt or misplaced file is a miss (logged), never an error. Two processes
writing the same key write the same bytes; the last rename wins.

Location: ``Backend(cache=...)`` (a path, True or False), else ``FXPASSES_CACHE_DIR``, else
``$XDG_CACHE_HOME/fxpasses`` (``~/.cache/fxpasses``). ``FXPASSES_CACHE=0`` (or false/no/off) turns it off when
``cache`` is not given.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("fxpasses.cache")

ENV_SWITCH = "FXPASSES_CACHE"
ENV_DIR = "FXPASSES_CACHE_DIR"
FORMAT = 1  # bump when GraphEntry changes: older entries then fail to match and are misses
_MAGIC = b"FXPASSES-CACHE\n"
_DIGEST = 32  # bytes of SHA-256


def default_cache_dir() -> Path:
    """``FXPASSES_CACHE_DIR``, else the user's cache directory (``XDG_CACHE_HOME``, ``~/.cache``) + ``fxpasses``."""
    explicit = os.environ.get(ENV_DIR)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fxpasses"


def cache_enabled_by_default() -> bool:
    """On unless ``FXPASSES_CACHE`` is 0, false, no or off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def resolve_cache_dir(option: Any) -> Path | None:
    """What ``Backend(cache=option)`` means: None (follow the environment), True, False or a directory.

    Returns the cache directory, or None when caching is off. Bad input raises, naming the argument."""
    if option is None:
        return default_cache_dir() if cache_enabled_by_default() else None
    if option is True:
        return default_cache_dir()
    if option is False:
        return None
    if isinstance(option, (str, os.PathLike)):
        path = Path(option).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"Backend: cache {str(path)!r} is a file, not a directory; name a directory "
                             "(or pass cache=True for the default, cache=False for none).")
        return path
    raise TypeError(f"Backend: cache must be True, False or a directory path, got {type(option).__name__} "
                    f"{option!r}.")


@dataclass(frozen=True)
class CacheEvent:
    """What the cache did for one compiled graph: a hit, a miss and why, or why it was not used."""

    graph: int
    hit: bool
    reason: str
    key: str | None = None
    stored: bool = False  # a miss whose result was written for the next process
    seconds: float = 0.0  # load time of a hit; for a miss, the time to serialize and write

    def __str__(self) -> str:
        what = "hit" if self.hit else "miss"
        key = f" key {self.key[:12]}" if self.key else ""
        stored = ", stored" if self.stored else ""
        return f"compile cache: graph {self.graph} {what}{key} ({self.reason}{stored}, {self.seconds * 1e3:.0f} ms)"


@dataclass
class ReportDelta:
    """What the pipeline added to the Report for one graph; replayed into the Report on a hit, so a served graph
    reports the same matches, passes and near misses as a compiled one."""

    matches: dict[str, int] = field(default_factory=dict)
    passes: list[Any] = field(default_factory=list)  # report.PassRecord
    near_misses: list[Any] = field(default_factory=list)  # patterns.NearMiss
    notes: list[str] = field(default_factory=list)


@dataclass
class GraphEntry:
    """One cached graph: the post-pipeline forward graph and what AOT's runtime wrapper did around it."""

    key: str
    graph: bytes  # compat.pickle_graph_module
    has_values: bool  # node metadata kept (the CUDA-graph runner needs it)
    mutated_inputs: tuple[int, ...]  # inputs written in the graph that autograd sees (their version is bumped)
    dynamic_output_dims: tuple[tuple[int, tuple[int, ...]], ...]  # (output, dims) AOT marks dynamic
    report: ReportDelta
    torch_version: str
    format: int = FORMAT


class CacheStore:
    """Entries under ``root/graphs/<key[:2]>/<key>.entry``; every failure is a logged miss, never an exception."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / "graphs" / key[:2] / f"{key}.entry"

    def load(self, key: str) -> tuple[GraphEntry | None, str]:
        """The entry for ``key``, or None and why not."""
        payload, why = read_framed(self.path(key))
        if payload is None:
            return None, why
        try:
            entry = pickle.loads(payload)
        except Exception as err:  # noqa: BLE001  (an entry from another version of our classes)
            return None, f"entry does not load ({type(err).__name__}), ignored"
        if not isinstance(entry, GraphEntry) or entry.format != FORMAT:
            return None, "entry from another cache format, ignored"
        if entry.key != key:
            return None, "entry was written for another key, ignored"
        return entry, "hit"

    def store(self, entry: GraphEntry) -> str | None:
        """Write ``entry`` atomically; returns None, or why it was not written (the compile goes on regardless)."""
        try:
            payload = pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:  # noqa: BLE001
            return f"entry not picklable ({type(err).__name__}: {err})"
        return write_framed(self.path(entry.key), payload)


def read_framed(path: Path) -> tuple[bytes | None, str]:
    """The payload ``write_framed`` wrote at ``path``, or None and why not (missing, unreadable, corrupt)."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None, "no entry for this key (first compile of this graph with these passes)"
    except OSError as err:
        return None, f"entry unreadable ({err.strerror})"
    payload = blob[len(_MAGIC) + _DIGEST:]
    if not blob.startswith(_MAGIC) or blob[len(_MAGIC):len(_MAGIC) + _DIGEST] != hashlib.sha256(payload).digest():
        log.warning("fxpasses compile cache: %s is corrupt or truncated; ignored (it will be rewritten)", path)
        return None, "corrupt entry (checksum mismatch), ignored"
    return payload, "found"


def write_framed(path: Path, payload: bytes) -> str | None:
    """Write ``payload`` with a checksum, atomically (temporary file, fsync, ``os.replace``): a reader sees a whole
    file or none. Returns None, or why it was not written."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:16]}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + hashlib.sha256(payload).digest() + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        log.warning("fxpasses compile cache: could not write %s: %s", path, err)
        return f"could not write the entry ({err.strerror or err})"
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return None
