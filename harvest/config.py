"""HarvestConfig: what `sae harvest` runs, filled from pipeline.toml [harvest] and CLI flags."""

from dataclasses import dataclass

from sae.cache.codecs import STORAGE_DTYPES, compressors
from sae.config import StageConfig, setting, validate
from sae.errors import UserError
from sae.harvest.model import MODEL_DTYPES, SITES

PACKINGS = ("bos_per_doc", "bos_per_context")


@dataclass
class HarvestConfig(StageConfig):
    model: str = "smollm2-135m"
    """HF hub id, local model directory, or the embedded alias `smollm2-135m`."""
    layers: tuple[int, ...] = setting((6,), aliases=("--layer",))
    """Blocks whose residual stream is stored; one forward pass serves all of them."""
    site: str = setting("resid_pre", choices=SITES)
    """resid_pre (input of block L = HF hidden_states[L], the paper's site) or resid_post (its output)."""
    dataset: str = "openwebtext-sample"
    """HF hub dataset id (e.g. Skylion007/openwebtext, streamed), a local parquet/jsonl/txt file, a
    dataset saved with save_to_disk, or the bundled `openwebtext-sample` (1,226 OpenWebText documents)."""
    dataset_config: str | None = None
    """Hub dataset configuration name, if it has several."""
    dataset_split: str = setting("train", aliases=("--split",))
    """Dataset split."""
    text_column: str = "text"
    """Column holding the text."""
    seed: int = 0
    """Seed of the document order; with the dataset it fixes the token stream exactly."""
    ctx_len: int = setting(128, positive=True)
    """Tokens per context (the paper: 128)."""
    packing: str = setting("bos_per_doc", choices=PACKINGS)
    """bos_per_doc: every document starts with BOS, documents are concatenated and cut into contexts
    (the paper's reference code); bos_per_context: every context starts with BOS."""
    tokens: int = setting(1_000_000, positive=True)
    """Target number of tokens in the cache; a rerun with more extends it, with fewer does nothing."""
    batch_contexts: int = setting(32, positive=True)
    """Contexts per forward pass."""
    model_dtype: str = setting("float32", choices=tuple(MODEL_DTYPES))
    """Precision the model runs in: float32, bfloat16 or float16 (bfloat16 is the fast choice on GPUs)."""
    dtype: str = setting("int8", choices=STORAGE_DTYPES)
    """Storage dtype of the activations: int8 (default) or float8_e4m3, scaled per row (and per dimension
    for int8), about half float16's bytes; or float16, bfloat16, float32. SAEs trained from int8 matched
    float16's within 1.2 standard errors on NMSE and CE degradation (docs/results.md, section 2)."""
    codec: str = "zstd:1"
    """Compression of activation chunks (see benchmarks/harvest.py for the measurement behind the default)."""
    chunk_contexts: int = setting(128, positive=True)
    """Contexts per stored chunk (128 contexts of 128 tokens at d=768 in float16 = 24 MiB)."""
    cache_dir: str | None = None
    """Root of all caches, a local path or an object-store URL (s3://bucket/prefix); None:
    $SAE_CACHE_DIR, else ./caches."""

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        validate(self)
        if not self.layers:
            raise UserError("layers is empty; give at least one, e.g. --layer 6")
        if len(set(self.layers)) != len(self.layers):
            raise UserError(f"layers {list(self.layers)} repeat a layer")
        compressors(self.codec)  # raises on an unknown codec
        if self.ctx_len < 2:
            raise UserError(f"ctx_len must be at least 2 tokens, got {self.ctx_len}")

    def declared_spec(self) -> dict:
        """The cache-spec fields this config fixes by itself, without loading the model or data."""
        return {
            "model": self.model,
            "model_dtype": self.model_dtype,
            "site": self.site,
            "layers": list(self.layers),
            "dataset": self.dataset,
            "dataset_config": self.dataset_config,
            "dataset_split": self.dataset_split,
            "text_column": self.text_column,
            "seed": self.seed,
            "ctx_len": self.ctx_len,
            "packing": self.packing,
            "dtype": self.dtype,
        }
