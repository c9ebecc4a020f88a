"""Named plugins: small classes registered under a point (e.g. "kl_controller") and chosen by name.

Built-ins register themselves on import. Third-party packages expose plugins through the entry-point group
`rlhf_ext.plugins`, with entry-point names of the form `<point>.<name>` (e.g. `aggregation.trimmed_mean`).
Only entry points whose name is requested are imported — plugins are never loaded just because they exist.
"""

from __future__ import annotations

from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "rlhf_ext.plugins"
POINTS = ("kl_controller", "kl_estimator", "aggregation", "shaper", "detector")
_REGISTRY: dict[str, dict[str, type]] = {p: {} for p in POINTS}


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


def _load_entry_point(point: str, name: str) -> bool:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == f"{point}.{name}":
            register(point, name)(ep.load())
            return True
    return False


def _builtins():
    from . import plugins  # noqa: F401  (built-ins register themselves on import)


def get(point: str, name: str) -> type:
    """The plugin class named `name` at `point`; unknown names raise with the list of valid names."""
    _builtins()
    if point not in _REGISTRY:
        raise ValueError(f"Unknown plugin point {point!r}; valid points: {', '.join(POINTS)}.")
    if name not in _REGISTRY[point] and not _load_entry_point(point, name):
        valid = ", ".join(sorted(_REGISTRY[point]))
        raise ValueError(
            f"Unknown {point} {name!r}. Valid names: {valid}. Third-party plugins are found through the "
            f"entry-point group '{ENTRY_POINT_GROUP}' under the name '{point}.{name}'."
        )
    return _REGISTRY[point][name]


def build(point: str, name: str, **kwargs):
    """Instantiate the named plugin with keyword arguments (bad arguments name the plugin)."""
    cls = get(point, name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TypeError(f"Bad arguments for {point} {name!r}: {e}") from e


def available(point: str) -> list[str]:
    _builtins()
    return sorted(_REGISTRY[point])
