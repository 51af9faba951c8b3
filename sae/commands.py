"""The `sae` command lines a stage prints when the user has to run another one first: the harvest that
makes a cache it needs (sae.pipeline for `sae train`, evaluate and inspect for imported SAEs)."""

import shlex

from sae.harvest.config import HarvestConfig


def harvest_command_line(cfg: HarvestConfig) -> str:
    """The `sae harvest` command that makes the cache cfg names."""
    flags = {
        "--model": cfg.model, "--layer": ",".join(map(str, cfg.layers)), "--site": cfg.site,
        "--dataset": cfg.dataset, "--ctx-len": cfg.ctx_len, "--tokens": cfg.tokens,
        "--dtype": cfg.dtype, "--model-dtype": cfg.model_dtype,
    }  # fmt: skip
    if cfg.cache_dir is not None:
        flags["--cache-dir"] = cfg.cache_dir
    return "sae harvest " + " ".join(f"{flag} {shlex.quote(str(value))}" for flag, value in flags.items())
