"""sae: harvest LM activations into a zarr cache, train sparse autoencoders on it, evaluate them."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# inspect/ has no __init__.py, so that a checkout on sys.path (pytest, `python -m` from the repo root)
# never shadows the standard library's `inspect`. A wheel installs it as sae/inspect/, found as a
# namespace package; an editable install finds it through this entry, the checkout's root.
if (_Path(__file__).resolve().parent.parent / "inspect").is_dir():
    __path__.append(str(_Path(__file__).resolve().parent.parent))
