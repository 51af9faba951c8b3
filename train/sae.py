"""The sparse autoencoder: one module for every architecture, taking raw activations.

    x_n, mult, shift = normalize(x)                      the SAE's own input space (TrainConfig.normalize)
    pre_BM  = ReLU((x_n − b_dec) @ W_enc_DM + b_enc)      the architecture picks which entries survive
    recon   = (f_BM @ W_dec_MD + b_dec) · mult + shift    W_dec rows (latent directions) unit-norm

The normalisation and the gate are set at construction, so encode(x) means the same for an SAE in
training and for one loaded from a run directory: there the normalisation's scale is folded into the
weights (export) and a standardising SAE stays standardising (SAELens's "layer_norm"). What differs
between architectures (selection, loss terms, threshold, what is saved) is in train/archs, one file
each. Parameters use SAELens's names and layouts (W_enc [d, m], W_dec [m, d]) but for the encoder's
storage, W_enc_MD: see its comment.
"""

import torch
from torch import Tensor, nn

from sae.device import cpu_linear, use_onednn
from sae.train.archs import ARCHITECTURES, SAEOutput
from sae.train.config import SAESpec, TrainConfig
from sae.train.gate import Gate
from sae.train.sparse import Active, KeptEncoderGrad, column_order, decode_dense, decode_sparse


class SparseAutoencoder(nn.Module):
    def __init__(self, spec: SAESpec, d_in: int, cfg: TrainConfig | None = None, *, normalize: str = "none",
                 input_scale: float = 1.0, gate: Gate = Gate(), sparse_decode: bool = True):  # fmt: skip
        """cfg: the training settings its architecture reads (AuxK, JumpReLU's ε and initial θ, the dead
        window); normalize and input_scale: its input space (normalize_input); gate: the rows it leaves
        alone; sparse_decode, for the (batch)topk family: decode from the kept rows of W_dec and take the
        encoder's gradient at the kept entries only (train.sparse), False: the dense matmuls."""
        super().__init__()
        cfg = cfg or TrainConfig()
        self.spec, self.d_in, self.m = spec, d_in, spec.dict_size
        self.arch = ARCHITECTURES[spec.arch](spec, cfg)
        self.input_norm, self.input_scale, self.gate = normalize, input_scale, gate
        self.dead_tokens, self.sparse_decode = cfg.dead_tokens, sparse_decode
        # The reference code's init: kaiming-uniform W_enc, W_dec its transpose with unit-norm rows. The
        # encoder is stored a row per latent, as W_dec, and read as SAELens's [d, m] through W_enc: its
        # sparse gradient is made per latent (sum_by_column), and a [d, m] parameter took it through a
        # transposing copy each step, plus another in fused Adam (7 ms of a 50 ms step at d 576, m 4,608).
        self.W_enc_MD = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d_in, self.m)).t().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(self.m))
        self.W_dec = nn.Parameter(self.W_enc_MD.detach().clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.normalize_decoder()
        self.arch.add_parameters(self)
        # Tokens since each latent last fired (AuxK's dead set).
        self.register_buffer("tokens_since_fired_M", torch.zeros(self.m, dtype=torch.long))

    @classmethod
    def from_tensors(cls, spec: SAESpec, tensors: dict[str, Tensor], *, normalize: str = "none", gate: Gate = Gate(),
                     device: str | torch.device = "cpu") -> "SparseAutoencoder":  # fmt: skip
        """An inference SAE on raw rows from exported tensors (W_enc [d, m], b_enc [m], W_dec [m, d],
        b_dec [d], and threshold [m] for a thresholded architecture): a run directory's weights, or
        another library's mapped onto ours (train.formats). A negative threshold acts as 0, as it does
        where the library applies its ReLU before the threshold."""
        sae = cls(spec, tensors["W_enc"].shape[0], normalize=normalize, gate=gate).to(device)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(tensors[name])
            if "threshold" in tensors:
                sae.arch.load_threshold(sae, tensors["threshold"].clamp(min=0))
        return sae.eval()

    @property
    def W_enc(self) -> Tensor:
        """The encoder [d, m] (SAELens's layout), a view of W_enc_MD: writes to it change the SAE."""
        return self.W_enc_MD.t()

    # -- raw activations in, raw reconstructions out --------------------------------------------
    def normalize(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_n, mult, shift): the rows in the SAE's input space, raw x ≈ x_n · mult + shift."""
        return normalize_input(x_BD, self.input_norm, self.input_scale)

    def encode(self, x_BD: Tensor, batch_mode: bool = False, theta: float | None = None) -> Tensor:
        """Dense latents [B, m] of raw rows, as deployed (see encode_normalized)."""
        return self.encode_normalized(self.normalize(x_BD)[0], batch_mode, theta)

    def encode_normalized(self, x_BD: Tensor, batch_mode: bool = False, theta: float | None = None) -> Tensor:
        """Dense latents [B, m] of normalised rows: a thresholded architecture as z where z > θ (BatchTopK's
        scalar θ, or `theta`), unless batch_mode asks for its training rule (BatchTopK: the B·k largest
        of this batch together); TopK and ReLU by their rule."""
        theta_M = self.arch.threshold_M(self)
        if theta_M is not None and not batch_mode:
            # θ ≥ 0: the ReLU and the threshold in one in-place pass over the affine map, 2.5× faster on
            # CPU than a where() over [B, m] and no host sync for θ; +0 (not −0) below θ
            z_BM = self.affine(x_BD)
            return z_BM.masked_fill_(z_BM <= (theta_M if theta is None else theta), 0.0)
        return self.arch.select_dense(self, self.pre_acts(x_BD))

    def scores(self, x_BD: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(z_BM, θ_M) of raw rows: the latents as deployed are z where z > θ, 0 elsewhere (θ ≥ 0). A
        thresholded architecture gives the affine map (in `out` if given) and its threshold, so that a
        caller wanting only the active entries skips a pass over [B, m] that sets the rest to 0; TopK
        and ReLU give their latents (a fresh tensor), θ 0."""
        theta_M = self.arch.threshold_M(self)
        if theta_M is not None:
            return self.affine(self.normalize(x_BD)[0], out), theta_M
        return self.encode(x_BD), x_BD.new_zeros(self.m)

    def encoded_rows(self, x_BD: Tensor, tokens_B: Tensor | None = None, positions_B: Tensor | None = None):
        """[B] bool: the raw rows this SAE encodes, its gate passing the others through (token ids and
        positions in their contexts are needed only by a BOS or first-position gate); None: every row."""
        return None if self.gate.empty else ~self.gate.gated(x_BD, tokens_B, positions_B)

    def reconstruct(self, x_BD: Tensor, encode_B: Tensor | None = None, batch_mode: bool = False,
                    theta: float | None = None, width: int | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(reconstruction [B, d] float32, latents [B, m]) of raw rows, as deployed: the rows of encode_B
        (None: all, as SAELens encodes) through the SAE, the others kept as they are with no latent;
        batch mode selects among the encoded rows only; `theta` replaces BatchTopK's θ; `width`: only
        the first `width` latents (a Matryoshka prefix, itself an SAE)."""
        if encode_B is not None:
            recon_BD, latents_BM = x_BD.float().clone(), x_BD.new_zeros(len(x_BD), self.m, dtype=torch.float32)
            if encode_B.any():
                recon_ND, latents_NM = self.reconstruct(x_BD[encode_B], None, batch_mode, theta, width)
                recon_BD[encode_B], latents_BM[encode_B] = recon_ND, latents_NM.float()
            return recon_BD, latents_BM
        x_n, mult, shift = self.normalize(x_BD)
        latents_BM = self.encode_normalized(x_n, batch_mode, theta)
        if width is not None:
            latents_BM[:, width:] = 0
        return (self.decode(latents_BM) * mult + shift).float(), latents_BM

    # -- the SAE's input space: normalised rows ---------------------------------------------------
    def affine(self, x_BD: Tensor, out: Tensor | None = None) -> Tensor:
        """(x − b_dec) W_enc + b_enc [B, m], a fresh tensor (callers may change it in place) or, where the
        route writes into one (encoder_product), `out`: callers take the returned tensor."""
        # Written so that autograd never forms the [B, d] input gradient (a third B·m·d matmul) only to
        # sum it into b_dec's: b_dec W_enc is one [m] vector.
        return encoder_product(self.b_enc - self.W_enc_MD @ self.b_dec, x_BD, self.W_enc_MD, out)

    def affine_centered(self, xc_BD: Tensor) -> Tensor:
        """xc W_enc + b_enc [B, m] of rows already centred, xc = x − b_dec: the sparse path's, without
        autograd, which forms xc once for this product and for the encoder's gradient (KeptEncoderGrad).
        At the study shape the [B, d] subtraction takes 0.1 ms where b_dec W_enc read all of W_enc (0.7)."""
        return encoder_product(self.b_enc, xc_BD, self.W_enc_MD)

    def pre_acts(self, x_BD: Tensor, out: Tensor | None = None) -> Tensor:
        return self.affine(x_BD, out).relu_()  # in place: a pass over [B, m] fewer

    def decode(self, latents_BM: Tensor) -> Tensor:
        """Dense latents back to the SAE's input space (un-normalise with normalize's mult and shift)."""
        if use_onednn(latents_BM, self.W_dec):
            return cpu_linear(latents_BM, self.W_dec.t(), self.b_dec)
        return latents_BM @ self.W_dec + self.b_dec

    def decode_active(self, active: Active) -> Tensor:
        """Σ over kept entries of act · W_dec row [B, d], without b_dec: sparse or dense (the reference).
        The sparse decode gives W_dec's gradient already projected (project_decoder_grad)."""
        if self.sparse_decode:
            return decode_sparse(active, self.W_dec, tangent=True)
        return decode_dense(active, self.W_dec)

    def with_encoder_grad(self, active: Active, x_BD: Tensor, xc_BD: Tensor) -> Active:
        """Kept entries of affine_centered(xc_BD), made without autograd, through the ReLU and given the
        encoder's gradient at them only; xc_BD = x_BD − b_dec, formed once by the caller."""
        active = active._replace(by_column=column_order(active.cols_N, self.m))  # for the decode's gradient too
        acts_N = KeptEncoderGrad.apply(active.acts_N, x_BD, xc_BD, self.W_enc_MD, self.b_enc, self.b_dec,
                                       active.rows_N, active.cols_N, active.offsets_B, active.by_column)  # fmt: skip
        return active._replace(acts_N=acts_N)

    def mse(self, recon_BD: Tensor, x_BD: Tensor) -> Tensor:
        """Mean over all B·d elements of (x − x̂)², in float32."""
        return MeanSquaredError.apply(recon_BD, x_BD)

    # -- training --------------------------------------------------------------------------------
    def forward(self, x_BD: Tensor, aux_k: int = 0) -> SAEOutput:
        """The training forward of raw rows (losses in the input space). aux_k: width of AuxK's top-k
        over the dead latents; 0: no AuxK. The trainer sizes it from the dead count
        (train.trainer.DeadLatents); a batch with no dead latent adds 0."""
        out = self.arch.forward(self, self.normalize(x_BD)[0], aux_k)
        if self.training:
            self.tokens_since_fired_M.add_(len(x_BD)).masked_fill_(out.fired_M, 0)
        return out

    def dead_M(self) -> Tensor:
        """[m] bool: latents that have not fired for dead_tokens tokens."""
        return self.tokens_since_fired_M >= self.dead_tokens

    def dead_fraction(self) -> Tensor:
        return self.dead_M().float().mean()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component along each unit-norm decoder row (it only changes the norm).
        Done already where W_dec is read only through the sparse decode (decode_active), which gives
        its gradient projected."""
        if self.sparse_decode and self.arch.decodes_kept_entries:
            return
        if self.W_dec.grad is not None:
            along_M = torch.linalg.vecdot(self.W_dec.grad, self.W_dec)
            self.W_dec.grad.addcmul_(along_M[:, None], self.W_dec, value=-1)  # no [m, d] temporary to subtract

    # -- saving ----------------------------------------------------------------------------------
    @torch.no_grad()
    def export(self) -> dict[str, Tensor]:
        """SAELens tensors acting on raw activations, float32 on the CPU: the input scale s folded in.

        pre = (s·x − b_dec) W_enc + b_enc = (x − b_dec/s)(s·W_enc) + b_enc;  x̂ = (f W_dec + b_dec)/s.
        """
        s = self.input_scale
        tensors = {
            "W_enc": self.W_enc * s,
            "b_enc": self.b_enc.clone(),
            "W_dec": self.W_dec / s,
            "b_dec": self.b_dec / s,
        }
        threshold_M = self.arch.threshold_M(self)
        if threshold_M is not None:
            tensors["threshold"] = threshold_M.clone()
        return {name: t.float().cpu().contiguous() for name, t in tensors.items()}


def encoder_product(bias_M: Tensor, x_BD: Tensor, W_MD: Tensor, out: Tensor | None = None) -> Tensor:
    """bias + x W_MDᵀ [B, m], float32: under autocast a bf16 product summed into fp32 pre-activations;
    on the CPU in float32 oneDNN's matmul (cpu_linear; a fresh tensor); else addmm, the bias entering
    the matmul's output (one pass fewer), into `out` if given."""
    if torch.is_autocast_enabled(x_BD.device.type):
        return torch.add(x_BD @ W_MD.t(), bias_M, out=out)
    if use_onednn(x_BD, W_MD, bias_M):
        return cpu_linear(x_BD, W_MD, bias_M)
    return torch.addmm(bias_M, x_BD, W_MD.t(), out=out)


class MeanSquaredError(torch.autograd.Function):
    """mean((x̂ − x)²) over all elements in float32, the difference formed once: autograd's chain of
    sub, square and mean makes five passes over [B, d] forward and back, this three."""

    @staticmethod
    def forward(ctx, recon_BD: Tensor, x_BD: Tensor) -> Tensor:
        diff_BD = recon_BD.float() - x_BD.float()
        ctx.save_for_backward(diff_BD)
        ctx.dtypes = recon_BD.dtype, x_BD.dtype
        return torch.linalg.vecdot(diff_BD.flatten(), diff_BD.flatten()) / diff_BD.numel()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        (diff_BD,) = ctx.saved_tensors
        grad_recon_BD = diff_BD * (2 * grad / diff_BD.numel())
        grad_x_BD = -grad_recon_BD.to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return (grad_recon_BD.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None), grad_x_BD


def normalize_input(x_BD: Tensor, mode: str, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(x_n, mult, shift) with raw x ≈ x_n · mult + shift; modes as in TrainConfig.normalize.

    "standardize" is the reference code's per-sample standardisation and SAELens's "layer_norm"
    (whose output side multiplies by the std without the epsilon, as here); "constant_norm_rescale"
    is SAELens's too (read from its directories, train.formats.saelens)."""
    x_BD = x_BD.float()
    if mode == "standardize":
        # the row statistics from layer_norm's one-pass kernel (0.6 ms at B 4,096, d 576, where .std() took
        # 5.5 ms); its rstd is 1/the biased std, exactly 1/0 = inf for a constant row, whose std is then 0
        D = x_BD.shape[1]
        _, mean_B1, rstd_B1 = torch.native_layer_norm(x_BD, (D,), None, None, 0.0)
        std_B1 = rstd_B1.reciprocal() * (D / (D - 1)) ** 0.5  # unbiased, as .std()
        r_B1 = (std_B1 + 1e-5).reciprocal()
        # x·r − mean·r: one pass over [B, d] where (x − mean)·r took two (2 ms of a step at B 4,096)
        return torch.addcmul(-mean_B1 * r_B1, x_BD, r_B1), std_B1, mean_B1
    if mode == "scale":
        return x_BD * scale, x_BD.new_tensor(1 / scale), x_BD.new_zeros(())
    if mode == "constant_norm_rescale":  # SAELens's: every row to norm √d, its scale undone after decoding
        norm_B1 = x_BD.norm(dim=1, keepdim=True) / x_BD.shape[1] ** 0.5
        return x_BD / norm_B1, norm_B1, x_BD.new_zeros(())
    return x_BD, x_BD.new_ones(()), x_BD.new_zeros(())
