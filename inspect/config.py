"""InspectConfig: what `sae inspect` reads and how much it keeps per latent, from pipeline.toml [inspect] and CLI flags."""

from dataclasses import dataclass
from pathlib import Path

from sae.config import setting, validate
from sae.errors import UserError
from sae.train.rundir import RunSource


@dataclass
class InspectConfig(RunSource):
    tokens: int | None = setting(None, positive=True)
    """Read the cache's first N rows (rounded down to whole contexts) instead of the run's held-out chunks
    (for another library's SAE: the cache's last chunk)."""
    out: Path | None = None
    """Folder for latents.json, latents.js and index.html; None: RUN/inspect."""
    top: int = setting(20, positive=True)
    """Top-activating examples kept per latent."""
    quantile_samples: int = setting(10, positive=True)
    """Examples per latent picked at evenly spaced quantiles of its activations (from the sample)."""
    sample_size: int = setting(128, positive=True)
    """Per-latent uniform sample of its nonzero activations (the histogram's source)."""
    quantile_pool: int = 40
    """The quantile examples are picked from this many of the sample (those with the smallest random
    keys: a uniform sample too), the only ones whose token windows are kept. Memory: dict_size ×
    (top + quantile_pool) × window activations, whatever the cache's size."""
    window_before: int = setting(12, at_least=0)
    """Tokens shown before each example's token (within its context)."""
    window_after: int = setting(4, at_least=0)
    """Tokens shown after it."""
    effects: int = setting(10, at_least=0)
    """Most promoted and most suppressed output tokens per latent (decoder direction through the unembedding)."""
    neighbours: int = setting(5, at_least=0)
    """Nearest latents by decoder cosine similarity."""
    histogram_bins: int = setting(20, positive=True)
    """Bins of each latent's activation histogram."""
    dense_threshold: float = 0.1
    """A latent active on more than this fraction of the rows read is flagged dense (as in `sae eval`)."""
    batch_rows: int = setting(4096, positive=True)
    """Rows encoded at a time (rounded down to whole contexts); the [rows, dict_size] latents fit in memory."""
    lm: bool = True
    """Load the cache's LM for its tokenizer (token text) and unembedding (token effects); False: tokens
    are shown as ids and there are no token effects (a model that is not at hand, a synthetic cache)."""
    seed: int = 0
    """Seed of the per-latent samples."""

    def __post_init__(self) -> None:
        validate(self)
        if not self.quantile_samples <= self.quantile_pool <= self.sample_size:
            raise UserError(
                f"need quantile_samples <= quantile_pool <= sample_size (the quantile examples are picked from "
                f"a pool drawn from the sample), got {self.quantile_samples}, {self.quantile_pool}, {self.sample_size}"
            )
        if not 0 < self.dense_threshold < 1:
            raise UserError(f"dense_threshold must be in (0, 1), got {self.dense_threshold}")

    @property
    def window(self) -> int:
        return self.window_before + 1 + self.window_after

    def pass_record(self) -> dict:
        """The fields that determine latents.json's content (not where it goes or what computes it): a
        saved latents.json is reused by `--latent` only if they match."""
        keep = ("tokens", "top", "quantile_samples", "quantile_pool", "sample_size", "window_before", "window_after")
        keep += ("effects",)
        keep += ("neighbours", "histogram_bins", "dense_threshold", "lm", "seed")
        return {name: getattr(self, name) for name in keep}
