"""`python -m sae ...` is the `sae` command (torchrun launches it this way)."""

from sae.cli import main

main()
