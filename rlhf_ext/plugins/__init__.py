"""Built-in plugins, registered on import: KL estimators and controllers, reward aggregations, shapers."""

from . import aggregation, kl, shaping  # noqa: F401
