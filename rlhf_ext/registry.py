"""Named plugins: small classes registered under a point (e.g. "kl_controller") and chosen by name.

Built-ins register themselves on import. Third-party packages expose plugins through the entry-point group
`rlhf_ext.plugins`, with entry-point names of the form `<point>.<name>` (e.g. `aggregation.trimmed_mean`).
Only entry points whose name is requested are imported — plugins are never loaded just because they exist.
"""

from __future__ import annotations

import importlib
import warnings
from collections import Counter
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "rlhf_ext.plugins"
POINTS = ("kl_controller", "kl_estimator", "aggregation", "shaper", "detector")
_REGISTRY: dict[str, dict[str, type]] = {p: {} for p in POINTS}
# Where the trainers call more than `__call__` (β, the guard, state, thresholds), a plugin subclasses the point's base
# class, which gives it the rest; an estimator or an aggregation is any class whose instances are callable.
BASES = {"kl_controller": "rlhf_ext.plugins.kl:KLController", "shaper": "rlhf_ext.plugins.shaping:Shaper",
         "detector": "rlhf_ext.plugins.detectors:Detector"}


def register(point: str, name: str | None = None):
    """Class decorator: `@register("shaper", "linear")`. The class gets a `name` attribute."""
    if point not in _REGISTRY:
        raise ValueError(f"Unknown plugin point {point!r}; valid points: {', '.join(POINTS)}.")

    def wrap(cls):
        key = name or cls.name
        if key in _REGISTRY[point] and _REGISTRY[point][key] is not cls:
            raise ValueError(f"A {point} plugin named {key!r} is already registered ({_REGISTRY[point][key]}).")
        cls.name = key
        _REGISTRY[point][key] = cls
        return cls

    return wrap


def installed(point: str) -> dict:
    """{name: entry point} of the third-party plugins at `point`, read from package metadata (nothing imported)."""
    return {ep.name.split(".", 1)[1]: ep for ep in entry_points(group=ENTRY_POINT_GROUP)
            if ep.name.startswith(f"{point}.")}


def _load_entry_point(point: str, name: str) -> bool:
    ep = installed(point).get(name)
    if ep is None:
        return False
    dist = f" (package {ep.dist.name} {ep.dist.version})" if getattr(ep, "dist", None) else ""
    try:
        cls = ep.load()
    except Exception as e:  # noqa: BLE001 — the plugin's own import: name it, and the package that declared it
        raise ValueError(f"The {point} plugin {name!r}{dist} could not be imported: its entry point {ep.value!r} "
                         f"raised {type(e).__name__}: {e}. Install what it needs, or choose another {point}.") from e
    register(point, name)(cls)
    return True


def _check_base(point: str, name: str, cls) -> None:
    if point not in BASES:
        return
    module, attr = BASES[point].split(":")
    base = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"The {point} plugin {name!r} ({getattr(cls, '__module__', '?')}."
                         f"{getattr(cls, '__qualname__', cls)}) does not subclass {module}.{attr}, which gives it what "
                         f"the trainers call besides the plugin's own methods (state, defaults): subclass it.")


def _builtins():
    from . import plugins  # noqa: F401  (built-ins register themselves on import)


def get(point: str, name: str) -> type:
    """The plugin class named `name` at `point`; unknown names raise with the list of valid names."""
    _builtins()
    if point not in _REGISTRY:
        raise ValueError(f"Unknown plugin point {point!r}; valid points: {', '.join(POINTS)}.")
    if name in _REGISTRY[point] and (point, name) not in _SHADOWED:
        _warn_if_shadowed(point, name)
    if name not in _REGISTRY[point] and not _load_entry_point(point, name):
        valid = ", ".join(available(point))
        raise ValueError(
            f"Unknown {point} {name!r}. Valid names: {valid}. Third-party plugins are found through the "
            f"entry-point group '{ENTRY_POINT_GROUP}' under the name '{point}.{name}'."
        )
    cls = _REGISTRY[point][name]
    _check_base(point, name, cls)
    return cls


_SHADOWED: set = set()  # (point, name) of the registered names already checked against the installed entry points


def _warn_if_shadowed(point: str, name: str) -> None:
    """An installed entry point under a name already registered (a built-in's) is never imported: said once. Checked
    once per name, too: reading the entry points scans every installed package's metadata (~8 ms)."""
    _SHADOWED.add((point, name))
    ep = installed(point).get(name)
    if ep is not None and ep.value.split(":")[0] != _REGISTRY[point][name].__module__:
        warnings.warn(f"An installed package declares the {point} plugin {name!r} (entry point "
                      f"{ep.value!r}), but that name is taken ({_REGISTRY[point][name].__module__}"
                      f"); the package's plugin is not loaded. Rename its entry point.", UserWarning, stacklevel=3)


def build(point: str, name: str, **kwargs):
    """Instantiate the named plugin with keyword arguments (bad arguments name the plugin)."""
    cls = get(point, name)
    try:
        plugin = cls(**kwargs)
    except TypeError as e:
        raise TypeError(f"Bad arguments for {point} {name!r}: {e}") from e
    if callable(getattr(plugin, "state_dict", None)):  # checkpointed as JSON: refused now, not at the first save
        from .plugins.contract import check_state_saves

        check_state_saves(plugin, point, name)
    return plugin


def available(point: str) -> list[str]:
    """Registered names and installed third-party ones (entry points, listed without importing them)."""
    _builtins()
    return sorted(set(_REGISTRY[point]) | set(installed(point)))


def numbered(parts: list, name_of) -> dict:
    """{name: part}, a repeated name numbered from its second occurrence ("linear", "linear#2"): two plugins of one
    name keep their own metric, alarm and checkpointed state."""
    out, seen = {}, Counter()
    for part in parts:
        name = name_of(part)
        seen[name] += 1
        out[name if seen[name] == 1 else f"{name}#{seen[name]}"] = part
    return out
