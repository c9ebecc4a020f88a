"""Small shipped datasets. In the repository this is top-level `data/`; installed, the package `rlhf_ext.datasets`."""
