"""TrainConfig: what `sae train` runs, filled from pipeline.toml [train] / [[sweep]] and CLI flags.

A sweep is the grid arch × (k | l0_coeff | l1_coeff) × dict_size, or an explicit list of [[sweep]]
tables; every SAE of it is trained on the same single pass over the cache.
"""

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sae.config import StageConfig, check_choice, check_gate_norm, check_keys, setting, validate
from sae.errors import UserError
from sae.train.archs import ARCHITECTURES

ARCHS = tuple(ARCHITECTURES)
NORMALIZATIONS = ("none", "standardize", "scale", "constant_norm_rescale")
PRECISIONS = ("fp32", "tf32", "bf16")
DECODES = ("auto", "sparse", "dense")
B_DEC_INITS = ("zeros", "median")
THETAS = ("calibrated", "eq7")
SWEEP_KEYS = ("arch", "k", "dict_size", "l0_coeff", "l1_coeff")
"""The grid's axes: a [[sweep]] table crosses each architecture's knob with dict_size."""
TABLE_KEYS = (*SWEEP_KEYS, "matryoshka_widths")


class SAESpec(NamedTuple):
    """What differs between the SAEs of one sweep."""

    arch: str
    k: int
    dict_size: int
    l0_coeff: float
    l1_coeff: float
    matryoshka_widths: tuple[int, ...] = ()
    """matryoshka_batchtopk's prefix widths, as given (empty: its default); () for other architectures."""
    layer: int | None = None
    """Its layer in a sweep over several (in its name); None: the sweep's one layer."""

    @property
    def name(self) -> str:
        """Run directory name: arch, its sparsity knob and dict size, e.g. batchtopk_k32_m12288 (and _L8 in
        a sweep over several layers)."""
        knob = ARCHITECTURES[self.arch].knob
        label = {"k": f"k{self.k}", "l0_coeff": f"l0c{self.l0_coeff:g}", "l1_coeff": f"l1c{self.l1_coeff:g}"}[knob]
        return f"{self.arch}_{label}_m{self.dict_size}" + ("" if self.layer is None else f"_L{self.layer}")


@dataclass
class TrainConfig(StageConfig):
    arch: tuple[str, ...] = setting(("batchtopk",), choices=ARCHS)
    """Architectures to train; several make a sweep."""
    k: tuple[int, ...] = (32,)
    """Active latents per token for topk and batchtopk (batchtopk: on average over the batch)."""
    dict_size: tuple[int, ...] = (12288,)
    """Number of latents m."""
    l0_coeff: tuple[float, ...] = (0.0018,)
    """JumpReLU L0 penalty λ (paper, GPT-2 Small: 0.004 / 0.0018 / 0.0008 for L0 ≈ 16 / 32 / 64)."""
    l1_coeff: tuple[float, ...] = (0.004,)
    """ReLU L1 penalty λ on Σ f_i ‖W_dec_i‖."""
    matryoshka_widths: tuple[int, ...] = ()
    """Matryoshka BatchTopK's nested prefix widths, increasing to dict_size; empty: the reference code's
    prefixes m/16, m/8, m/4, m/2, m."""
    matryoshka_loss: str = setting("sum", choices=("sum", "mean", "reference"))
    """How Matryoshka's prefix errors add up: their sum (SAELens), their mean (dictionary_learning), or
    the mean with b_dec's own error as one more term (the reference code); docs/results.md compares them."""
    sweep: tuple[dict[str, Any], ...] = ()
    """Explicit SAE list ([[sweep]] tables of arch/k/dict_size/l0_coeff/l1_coeff, scalars or lists);
    when given it replaces the arch × k × dict_size grid above."""
    cache: str | None = None
    """Cache path or URL to train on; None: the cache of pipeline.toml's [harvest] spec."""
    layer: tuple[int, ...] = ()
    """Cache layer(s) to train on; several make a sweep over layers (every SAE at each, one read of the
    rows for all); empty: the cache's only layer."""
    follow: bool = False
    """Train from a cache that a harvest is still writing (another process, torchrun, s3), reading each
    chunk once it is committed. The first pass takes blocks of chunks in harvest order, the first chunk(s)
    are held out and the input set-up samples the first chunks: the same run whenever the harvest ends."""
    follow_timeout: float = setting(600.0, positive=True)
    """Seconds --follow waits for a harvest to create the cache before giving up."""
    stream: bool = False
    """Train straight from the LM: pipeline.toml's [harvest] (with --model, --dataset, ... and this
    --layer and --tokens) harvests into a bounded window in memory that training follows; nothing is
    written but the run directories (and the cache, with --keep-cache)."""
    stream_window: int = setting(0, at_least=0)
    """Rows a stream holds in memory at most, harvested and not yet in the shuffle buffer; 0: two
    blocks of buffer_chunks chunks and the held-out chunks (docs/training.md measures peak memory)."""
    keep_cache: bool = False
    """--stream: write the harvest to its cache on disk as well (reusable, and more passes possible)."""
    tokens: int | None = setting(None, positive=True)
    """Training tokens per SAE, at most `epochs` passes' worth; None: all of them (paper: 1e9, one pass)."""
    epochs: float = setting(1.0, positive=True)
    """Passes over the cache's ungated training rows allowed (may be fractional); each pass visits
    the chunks and rows in a fresh seeded order."""
    snapshots: tuple[int, ...] = setting((), positive=True)
    """Training-token counts at which each SAE is also saved as a complete run directory
    (RUN/snapshots/<tokens>/, θ chosen and held-out figures as at the end): learning curves from one run."""
    batch_size: int = setting(4096, positive=True)
    """Activations per step (paper: 4096)."""
    lr: float = setting(3e-4, positive=True)
    """Adam learning rate (paper: 3e-4)."""
    threshold_lr: float | None = setting(None, positive=True)
    """Adam learning rate of JumpReLU's log θ; None: lr. Adam moves log θ by at most about this much a
    step, so a run of n steps can scale θ by e^(n·lr) at most: at lr 3e-4 a 250-step run cannot move L0
    to where λ asks, whatever λ is. Short runs need a larger one (the paper experiment uses 0.01)."""
    betas: tuple[float, ...] = (0.9, 0.99)
    """Adam betas (paper: 0.9, 0.99)."""
    seed: int = 49
    """Seeds the initialisation and the data order (the reference code's 49)."""
    grad_clip: float = setting(1e5, positive=True)
    """Gradient-norm clip (the reference code's 1e5: a guard against blow-ups, not a regulariser)."""
    aux_k: int = setting(512, positive=True)
    """AuxK: dead latents used to reconstruct the residual (Gao et al.: 512)."""
    aux_coeff: float = 1 / 32
    """AuxK loss coefficient α (Gao et al.: 1/32)."""
    dead_tokens: int = setting(20_480, positive=True)
    """A latent is dead once it has not fired for this many tokens (reference code: 5 batches of 4096)."""
    bandwidth: float = setting(0.001, positive=True)
    """JumpReLU straight-through-estimator rectangle width ε (paper: 0.001)."""
    jumprelu_init_threshold: float = setting(1.0, positive=True)
    """Initial JumpReLU threshold θ (reference code: log θ = 0; inputs are O(1) per dimension after
    normalisation). The JumpReLU paper's 0.001 leaves L0 near m for thousands of steps at lr 3e-4."""
    theta_tail: float = 0.1
    """BatchTopK θ (eq. 7) is averaged over the batches of this final fraction of training, whose
    activations match the final weights; earlier batches describe an encoder that no longer exists."""
    normalize: str = setting("standardize", choices=NORMALIZATIONS)
    """Input normalisation: standardize (per sample, as the reference code; saved as SAELens
    "layer_norm"); scale (one dataset-wide factor so E‖x‖ = √d, folded into the saved weights); none.
    The default is the BatchTopK study's best treatment (docs/results.md): every row at its own scale,
    so massive-norm rows cannot take the batch's latents."""
    gate_bos: bool = False
    """Gate BOS rows: left out of training, passed through unchanged at inference and evaluation."""
    gate_first: bool = False
    """Gate the first position of every context (the same way as gate_bos)."""
    gate_norm: float = 0.0
    """Gate rows whose norm exceeds this multiple of the cache's median row norm: the massive-norm rows
    (attention sinks), whatever their token or position; 0: no norm gate (the default: with per-sample
    standardisation the study found no gate better, at every position too; docs/results.md)."""
    b_dec_init: str = setting("median", choices=B_DEC_INITS)
    """The decoder bias's initial value: median, the geometric median of a sample of the (normalised,
    ungated) training rows (Gao et al.'s initialisation); or zeros (the reference code). Residual-stream
    rows share a large mean direction: from b_dec 0 it decides which latents can fire at all, and
    after one pass of SmolLM2 layer 15 half of them were still dead (docs/results.md)."""
    theta: str = setting("calibrated", choices=THETAS)
    """BatchTopK's saved inference threshold: calibrated (chosen on the held-out rows so that their
    mean L0 is k: comparisons with TopK are at equal L0) or eq7 (the paper's estimate from training
    batches). Both are recorded in cfg.json either way."""
    holdout_chunks: int = setting(1, at_least=0)
    """Last full cache chunks (and a partial last chunk, if any) kept out of training; each SAE reports
    FVU and L0 on them at the end."""
    buffer_chunks: int = setting(32, positive=True)
    """Chunks shuffled together in the loader's buffer (32 × 128 contexts by default)."""
    loader_threads: int = setting(4, positive=True)
    """Background threads reading (decompressing) chunks; batches are decoded one by one (train.loader)."""
    precision: str = setting("tf32", choices=PRECISIONS)
    """Matmul precision on CUDA: fp32, tf32, or bf16 autocast (weights and thresholds stay fp32)."""
    decode: str = setting("auto", choices=DECODES)
    """(batch)topk's decode and encoder gradient: sparse (a gather over the k active rows of W_dec,
    embedding_bag, and the encoder's gradient at the kept entries only: train.sparse), dense (a
    [B, m] @ [m, d] matmul and autograd's dense backward), or auto: sparse on CPU, dense on CUDA, the
    faster of the two on each (dense decode: 2.0x sparse on an H100)."""
    compile: bool = False
    """torch.compile the SAE forward, for CUDA (3% on an H100); on the CPU half eager's speed, and it needs
    a C compiler. Measured on AMD Zen 5 at d 576, m 4,608, B 1,024 for BatchTopK and JumpReLU: eager's
    products are oneDNN's, Inductor's MKL's, and the CPU selection breaks the graph."""
    log_every: int = setting(50, positive=True)
    """Steps between metrics.jsonl lines and progress updates (the only host-device syncs)."""
    checkpoint_every: int = setting(2000, positive=True)
    """Steps between resumable checkpoints (also written at the end)."""
    out: Path = setting(Path("runs"))
    """Parent directory of the run directories."""
    wandb: str | None = None
    """W&B project to log to (needs `pip install wandb`); None: no W&B."""

    def __post_init__(self) -> None:
        tuples = ("arch", "k", "dict_size", "l0_coeff", "l1_coeff", "matryoshka_widths", "betas", "sweep", "snapshots")
        for name in tuples:
            setattr(self, name, tuple(getattr(self, name)))
        # one layer may be given as an int; a config saved before sweeps over layers says null
        self.layer = (self.layer,) if isinstance(self.layer, int) else tuple(self.layer or ())
        validate(self)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not 0 < self.theta_tail <= 1:
            raise UserError(f"theta_tail must be in (0, 1], got {self.theta_tail}")
        check_gate_norm(self.gate_norm)
        if self.stream and self.epochs > 1 and not self.keep_cache:
            raise UserError(f"a stream is read once: epochs {self.epochs:g} needs --keep-cache (or one pass)")
        self.specs()  # validates every SAE of the sweep

    @property
    def harvest_order(self) -> bool:
        """The first pass takes blocks of chunks in harvest order: following a harvest, or a stream."""
        return self.follow or self.stream

    def specs(self) -> list[SAESpec]:
        """The SAEs of this sweep, in a fixed order, each validated."""
        tables = self.sweep or ({"arch": self.arch, "k": self.k, "dict_size": self.dict_size},)
        specs = [spec for table in tables for spec in _expand(table, self)]
        if not specs:
            raise UserError("the sweep is empty; give at least one --arch")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise UserError(f"the sweep repeats an SAE: {sorted(n for n in names if names.count(n) > 1)[0]}")
        return specs


def _expand(table: dict[str, Any], cfg: TrainConfig) -> list[SAESpec]:
    """One [[sweep]] table (or the [train] grid) as SAESpecs; only the knob of each arch is crossed."""
    check_keys(table, list(TABLE_KEYS), "[[sweep]]")
    axes = {key: _as_tuple(table.get(key, getattr(cfg, key))) for key in SWEEP_KEYS}
    widths = tuple(table.get("matryoshka_widths", cfg.matryoshka_widths))
    specs = []
    for arch in axes["arch"]:
        check_choice("arch", arch, ARCHS)
        knob = ARCHITECTURES[arch].knob
        for value, dict_size in itertools.product(axes[knob], axes["dict_size"]):
            spec = SAESpec(arch, axes["k"][0], dict_size, axes["l0_coeff"][0], axes["l1_coeff"][0])
            spec = spec._replace(**{knob: value}, matryoshka_widths=widths if arch == "matryoshka_batchtopk" else ())
            specs.append(_check_spec(spec))
    return specs


def _check_spec(spec: SAESpec) -> SAESpec:
    if not isinstance(spec.dict_size, int) or spec.dict_size <= 0:
        raise UserError(f"dict_size must be a positive integer, got {spec.dict_size}")
    if not isinstance(spec.k, int) or spec.k <= 0:
        raise UserError(f"k must be a positive integer, got {spec.k}")
    ARCHITECTURES[spec.arch].check(spec)
    for name in ("l0_coeff", "l1_coeff"):
        if getattr(spec, name) < 0:
            raise UserError(f"{name} must be >= 0, got {getattr(spec, name)}")
    return spec


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value,)
