"""Run a language model over text and write its residual-stream activations to the cache."""
