"""BatchTopK (Bussmann, Leask, Nanda, 2024): the B·k largest pre-activations of the whole batch.

Training selects over the batch matrix (paper eq. 6, train.sparse.select_batchtopk), so a row may keep
from none to many latents, k on average. Inference is per row: JumpReLU with one scalar θ, estimated
over training batches (eq. 7, train.theta.Eq7Estimate) and calibrated on held-out rows so that the
mean L0 is k. Saved as SAELens's `jumprelu` with θ in every latent's threshold.
"""

import torch
from torch import Tensor

from sae.train.archs.topk import TopK
from sae.train.sparse import Active, select_batchtopk


class BatchTopK(TopK):
    name = "batchtopk"
    saelens_architecture = "jumprelu"
    calibrated_theta = True

    def select(self, pre_BM: Tensor) -> Active:
        return select_batchtopk(pre_BM, self.spec.k)

    def add_parameters(self, sae) -> None:
        sae.register_buffer("theta", torch.zeros(()))  # set by the trainer (train.theta)

    def threshold_M(self, sae) -> Tensor:
        return sae.theta.expand(sae.m)

    def load_threshold(self, sae, threshold_M: Tensor) -> None:
        sae.theta.fill_(float(threshold_M[0]))

    def saelens_fields(self) -> dict:
        return {}
