"""Kernel-bypass network dataplane (see docs/design.md)."""

# The one place the version is written: pyproject.toml reads it (dynamic version), `dataplane
# --version` and the dataplane_build_info metric print it.
__version__ = "0.1.0"
