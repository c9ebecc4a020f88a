"""Config shapes of common models for `rlhf-ext plan` offline (architecture fields only, no weights)."""
