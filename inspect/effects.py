"""What each latent writes, from the decoder directions alone: its output-token effects and its
nearest latents. Both run in blocks of latents, so an [m, vocab] or [m, m] matrix is never formed
(m = 24k and a 50k vocabulary would be 4.8 GB of float32 logits).

Token effect of latent j: logits_V = W_U (γ ⊙ W_dec[j]), its direction through the LM's final norm
gain γ and unembedding W_U: the direct path of what the latent writes to the residual stream (the
"logit lens" reading; it ignores the layers after the site and the norm's per-row scale, the same
for every token, so it does not change the ranking).
"""

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

BLOCK = 1024  # latents per block: [BLOCK, vocab] float32 logits, 200 MB at a 50k vocabulary
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")


class Ranked(NamedTuple):
    ids_MK: np.ndarray
    values_MK: np.ndarray


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm the base model applies before the head (Llama `norm`, GPT-2 `ln_f`, ...), if any."""
    base = getattr(model, "base_model", model)
    for name in FINAL_NORMS:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


@torch.no_grad()
def norm_gain(norm: nn.Module | None, d: int, device: torch.device) -> Tensor:
    """[d] float32: the norm's elementwise gain γ, measured rather than read from its weight, so that
    LayerNorm, RMSNorm and Gemma's (1 + w) RMSNorm all give their true γ: for x of zero mean and unit
    RMS, norm(x) − norm(−x) = 2 γ ⊙ x (the bias cancels). Ones without a norm, or for an odd d."""
    if norm is None or d % 2:
        return torch.ones(d, device=device)
    dtype = next(norm.parameters(), torch.empty(0)).dtype
    x_D = torch.tensor([1.0, -1.0], device=device).repeat(d // 2)
    both = norm(torch.stack([x_D, -x_D]).to(dtype)).float()
    return (both[0] - both[1]) / (2 * x_D)


@torch.no_grad()
def token_effects(W_dec_MD: Tensor, W_U_VD: Tensor, gain_D: Tensor, n: int) -> tuple[Ranked, Ranked]:
    """(the n most promoted, the n most suppressed) token ids per latent, with their logits."""
    W_U_VD = W_U_VD.float()
    n = min(n, len(W_U_VD))
    promoted, suppressed = [], []
    for start in range(0, len(W_dec_MD), BLOCK):
        logits_BV = (W_dec_MD[start : start + BLOCK].float() * gain_D) @ W_U_VD.T
        promoted.append(logits_BV.topk(n, dim=1))
        suppressed.append(logits_BV.topk(n, dim=1, largest=False))
    return _ranked(promoted), _ranked(suppressed)


@torch.no_grad()
def nearest_latents(W_dec_MD: Tensor, n: int) -> Ranked:
    """The n latents whose decoder directions have the highest cosine similarity with each latent's."""
    dirs_MD = W_dec_MD.float() / W_dec_MD.float().norm(dim=1, keepdim=True).clamp(min=1e-12)
    m = len(dirs_MD)
    n = min(n, m - 1)
    found = []
    for start in range(0, m, BLOCK):
        cos_BM = dirs_MD[start : start + BLOCK] @ dirs_MD.T
        own_B = torch.arange(start, start + len(cos_BM), device=cos_BM.device)
        cos_BM[torch.arange(len(cos_BM)), own_B] = -torch.inf  # a latent is not its own neighbour
        found.append(cos_BM.topk(n, dim=1))
    return _ranked(found)


def _ranked(blocks: list) -> Ranked:
    if not blocks:
        return Ranked(np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=np.float32))
    ids = torch.cat([b.indices for b in blocks]).cpu().numpy()
    return Ranked(ids, torch.cat([b.values for b in blocks]).cpu().numpy())


def unembedding(model: nn.Module, vocab: int) -> Tensor:
    """The LM head's [V, d] weight, without the rows past the tokenizer's vocabulary (padding ids)."""
    return model.get_output_embeddings().weight[:vocab]
