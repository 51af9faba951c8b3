"""EvalConfig: what `sae eval` runs, filled from pipeline.toml [eval] and CLI flags."""

from dataclasses import dataclass

from sae.config import check_gate_norm, setting, validate
from sae.errors import UserError
from sae.train.rundir import RunSource


@dataclass
class EvalConfig(RunSource):
    tokens: int = setting(16_384, positive=True)
    """Evaluation tokens (whole contexts: rounded down to a multiple of the cache's ctx_len, or of an
    imported SAE's context size where it has no cache)."""
    batch_size: int = setting(16, positive=True)
    """Contexts per forward pass. Each pass holds a few [batch, ctx_len, vocab] float32 logit tensors."""
    dataset: str | None = None
    """None: the run's harvest dataset, from the first document the harvest did not read (held out).
    Otherwise any dataset `sae harvest --dataset` accepts; it must not overlap the training cache.
    An imported SAE without a cache: None is the dataset its files name, else openwebtext-sample."""
    dataset_config: str | None = None
    """Hub dataset configuration; None: the cache's when the dataset is the cache's, else none."""
    dataset_split: str | None = setting(None, aliases=("--split",))
    """None: the cache's split when the dataset is the cache's, else "train"."""
    text_column: str | None = None
    """None: the cache's text column."""
    seed: int | None = None
    """Seed of the document order; None: the cache's (for the cache's dataset it must be the cache's,
    or the documents after the harvest's stream end would not be the unread ones)."""
    start_doc: int | None = setting(None, at_least=0)
    """First document (in the seeded order); None: the first one the harvest did not read, or 0 for
    another dataset or split."""
    gate_bos: bool = False
    """Add BOS rows to every SAE's gate for this evaluation (see train.gate): they pass through
    unspliced and leave the reconstruction metrics."""
    gate_first: bool = False
    """Add each context's first position to every SAE's gate for this evaluation."""
    gate_norm: float | None = None
    """Add rows above this multiple of the cache's median row norm to every SAE's gate, e.g. 4: runs
    trained with and without a gate are then scored on the same rows. None or 0: each SAE's own gate."""
    batch_mode: bool = False
    """Also evaluate BatchTopK runs in batch mode (top B·k over each forward pass's rows), beside the
    headline θ mode (the saved per-latent threshold, batch-independent)."""
    absorption: bool = False
    """Also measure first-letter feature absorption (Chanin et al.; SAEBench's measure; docs/evaluation.md):
    probes on the LM at each SAE's site, each SAE's main latents, absorption fraction and full absorption."""
    absorption_words: int = setting(4000, positive=True)
    """Alphabetic tokens sampled for the absorption probes (80% train them, 20% score); SAEBench takes
    the whole vocabulary."""
    absorption_seed: int = 0
    """Seed of the absorption words, their in-context examples and the probes."""
    dense_threshold: float = 0.1
    """A latent active on more than this fraction of evaluation tokens counts as dense."""

    def __post_init__(self) -> None:
        validate(self)
        check_gate_norm(self.gate_norm)
        if not 0 < self.dense_threshold < 1:
            raise UserError(f"dense_threshold must be in (0, 1), got {self.dense_threshold}")
