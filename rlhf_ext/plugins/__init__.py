"""Built-in plugins, registered on import: KL estimators and controllers, reward aggregations, shapers,
reward-hacking detectors."""

from . import aggregation, detectors, kl, shaping  # noqa: F401
