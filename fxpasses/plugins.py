"""Third-party patterns and passes, from installed packages' entry points, without editing fxpasses.

A plugin package declares, in its ``pyproject.toml``::

    [project.entry-points."fxpasses.patterns"]
    my_norms = "my_package.fxpasses_patterns"          # a module that registers with @fxpasses.patterns.pattern
                                                        # (or a function, called once with no arguments)
    [project.entry-points."fxpasses.passes"]
    my_pass = "my_package.passes:my_pass"               # a pass in any convention fxpasses.user_passes accepts
                                                        # (a class is instantiated with no arguments)

Entry points are loaded once per process, the first time a Backend (or ``rewrite``) with plugins on is built. A
plugin that fails to load is logged, recorded with its error, and skipped: a broken third-party package never
stops a compile. ``Backend(plugins=False)`` or ``FXPASSES_PLUGINS=0`` turns them off; a Backend with plugins off
leaves out patterns registered by plugins even after another Backend in the process loaded them.
"""
from __future__ import annotations

import functools
import logging
import os
import traceback
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from fxpasses import patterns as pattern_registry
from fxpasses.user_passes import UserPass, as_user_pass

log = logging.getLogger("fxpasses")

PATTERN_GROUP = "fxpasses.patterns"
PASS_GROUP = "fxpasses.passes"
ENV_SWITCH = "FXPASSES_PLUGINS"


@dataclass(frozen=True)
class PluginRecord:
    """One entry point: where it came from, what it registered, or why it was skipped."""

    name: str
    group: str
    value: str  # "module:attribute", as the package declared it
    distribution: str | None
    patterns: tuple[str, ...] = ()
    passes: tuple[str, ...] = ()
    error: str | None = None  # the traceback's last line when loading failed; the plugin was skipped

    def __str__(self) -> str:
        origin = f"{self.name} ({self.group} = {self.value}" + (f", from {self.distribution})" if self.distribution else ")")
        if self.error:
            return f"plugin {origin} failed to load and was skipped: {self.error}"
        what = [f"patterns {list(self.patterns)}"] if self.patterns else []
        what += [f"passes {list(self.passes)}"] if self.passes else []
        return f"plugin {origin} registered " + (", ".join(what) or "nothing")


@dataclass(frozen=True)
class LoadedPlugins:
    records: tuple[PluginRecord, ...]
    passes: tuple[UserPass, ...]

    @property
    def pattern_names(self) -> frozenset[str]:
        return frozenset(name for r in self.records for name in r.patterns)


def enabled_by_default() -> bool:
    """Plugins load unless ``FXPASSES_PLUGINS`` is 0, false, no or off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=1)
def load_plugins() -> LoadedPlugins:
    """Load every fxpasses entry point once per process (importing a plugin registers its patterns globally)."""
    records: list[PluginRecord] = []
    passes: list[UserPass] = []
    for ep in _entry_points(PATTERN_GROUP):
        records.append(_load_patterns(ep))
    for ep in _entry_points(PASS_GROUP):
        record, user_pass = _load_pass(ep)
        records.append(record)
        if user_pass is not None:
            passes.append(user_pass)
    for record in records:
        (log.warning if record.error else log.info)("fxpasses: %s", record)
    return LoadedPlugins(tuple(records), tuple(passes))


def plugin_pattern_names() -> frozenset[str]:
    """Patterns plugins registered so far in this process (empty if none were loaded)."""
    return load_plugins().pattern_names if load_plugins.cache_info().currsize else frozenset()


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=group), key=lambda ep: ep.name)


def _record(ep: metadata.EntryPoint, **fields: Any) -> PluginRecord:
    dist = getattr(ep, "dist", None)
    return PluginRecord(ep.name, ep.group, ep.value, dist.name if dist is not None else None, **fields)


def _error_line() -> str:
    return traceback.format_exc().strip().splitlines()[-1]


def _load_patterns(ep: metadata.EntryPoint) -> PluginRecord:
    before = {p.name for p in pattern_registry.all()}
    try:
        loaded = ep.load()
        if callable(loaded):
            loaded()
    except Exception:  # a broken plugin is reported and skipped, never fatal
        return _record(ep, error=_error_line())
    added = tuple(sorted({p.name for p in pattern_registry.all()} - before))
    return _record(ep, patterns=added)


def _load_pass(ep: metadata.EntryPoint) -> tuple[PluginRecord, UserPass | None]:
    try:
        loaded = ep.load()
        if isinstance(loaded, type):
            loaded = loaded()
        user_pass = as_user_pass(loaded, where=f"plugin {ep.name!r} ({ep.group})")
    except Exception:
        return _record(ep, error=_error_line()), None
    return _record(ep, passes=(user_pass.name,)), user_pass
