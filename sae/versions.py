"""Versions of the libraries that shape an artifact, recorded next to every cache, run and eval."""

import platform
from importlib.metadata import PackageNotFoundError, version

_PACKAGES = ("sae", "torch", "transformers", "datasets", "zarr", "numcodecs", "numpy", "safetensors")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions
