"""What an architecture is: the one small interface every file in train/archs implements.

The SparseAutoencoder (train.sae) owns what every SAE has: W_enc [d, m], b_enc [m], W_dec [m, d] with
unit-norm rows, b_dec [d], its input normalisation, its gate and the dead-latent count. An
architecture adds, in its own file:
  - its parameters (add_parameters: JumpReLU's log θ, BatchTopK's scalar θ),
  - its training forward: which latents are active and its loss terms (forward),
  - its inference rule: a per-latent threshold (threshold_M), else its training rule (select_dense),
  - what it saves: the SAELens architecture and fields, and how a saved threshold is read back.
"""

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from torch import Tensor

from sae.errors import UserError

if TYPE_CHECKING:
    from sae.train.config import SAESpec, TrainConfig
    from sae.train.sae import SparseAutoencoder
    from sae.train.sparse import Active


class SAEOutput(NamedTuple):
    recon_BD: Tensor
    """Reconstruction of the normalised input (the SAE's input space)."""
    latents: "Active | Tensor"
    """Latents in training form (batchtopk: top-k over the batch): the kept entries as an Active list
    for the (batch)topk family, never densified in the hot loop; a dense [B, m] matrix otherwise."""
    l0_B: Tensor
    """Active latents per row."""
    fired_M: Tensor
    """Which latents fired in this batch."""
    mse: Tensor
    """Mean over all B·d elements of (x − x̂)², the reference code's L2 loss (sets λ's scale)."""
    sparsity: Tensor
    """λ · penalty: L1 (relu), straight-through L0 (jumprelu); 0 for the (batch)topk family."""
    aux: Tensor
    """α · AuxK loss (the (batch)topk family) while some latent is dead, else 0."""
    loss: Tensor
    """What is minimised: mse + sparsity + aux (Matryoshka: every prefix's error in place of mse)."""


class Architecture:
    """How one kind of SAE trains and runs. One subclass per file, listed in train.archs.ARCHITECTURES."""

    name: ClassVar[str]
    """The --arch value and the run directory's prefix."""
    knob: ClassVar[str] = "k"
    """The SAESpec field that sets its sparsity: crossed in a sweep grid, named in the run directory."""
    saelens_architecture: ClassVar[str]
    """SAELens 6's architecture for the saved, batch-independent form."""
    calibrated_theta: ClassVar[bool] = False
    """A scalar inference θ: estimated over training batches (eq. 7) and calibrated on held-out rows."""
    aux_k: int = 0
    """AuxK's widest top-k over dead latents; 0: no AuxK."""
    decodes_kept_entries: ClassVar[bool] = False
    """Its training reads W_dec only through SparseAutoencoder.decode_active (the (batch)topk family)."""
    widths: tuple[int, ...] = ()
    """Nested prefix widths, each prefix an SAE of its own that evaluation scores too (Matryoshka)."""

    def __init__(self, spec: "SAESpec", cfg: "TrainConfig"):
        self.spec = spec

    @classmethod
    def check(cls, spec: "SAESpec") -> None:
        """Refuse a spec this architecture cannot train, in one line."""
        if cls.knob == "k" and spec.k > spec.dict_size:
            raise UserError(f"k={spec.k} exceeds dict_size={spec.dict_size}; k must be at most the dictionary size")

    def add_parameters(self, sae: "SparseAutoencoder") -> None:
        """Register parameters and buffers beyond W_enc, b_enc, W_dec, b_dec on the SAE."""

    def forward(self, sae: "SparseAutoencoder", x_BD: Tensor, aux_k: int) -> SAEOutput:
        """The training forward on normalised rows; aux_k: this step's AuxK width (0: none)."""
        raise NotImplementedError

    def select_dense(self, sae: "SparseAutoencoder", pre_BM: Tensor) -> Tensor:
        """The latents [B, m] by the training rule, from ReLU'd pre-activations (in place allowed)."""
        raise NotImplementedError

    def threshold_M(self, sae: "SparseAutoencoder") -> Tensor | None:
        """The per-latent inference threshold θ ≥ 0 (latents are z where z > θ); None: select_dense."""
        return None

    def load_threshold(self, sae: "SparseAutoencoder", threshold_M: Tensor) -> None:
        """Set the SAE's threshold from a saved `threshold` tensor."""

    def saelens_fields(self) -> dict[str, Any]:
        """cfg.json fields SAELens needs for this architecture beyond the common ones."""
        return {}

    def saelens_metadata(self) -> dict[str, Any]:
        """What cfg.json's metadata records of this architecture beyond its spec (e.g. resolved widths)."""
        return {}
