"""The SAE architectures, one file each behind train.archs.base.Architecture; a new one is a new file
and a line here."""

from sae.train.archs.base import Architecture, SAEOutput
from sae.train.archs.batchtopk import BatchTopK
from sae.train.archs.jumprelu import JumpReLU
from sae.train.archs.matryoshka_batchtopk import MatryoshkaBatchTopK
from sae.train.archs.relu import ReLU
from sae.train.archs.topk import TopK

ARCHITECTURES: dict[str, type[Architecture]] = {
    arch.name: arch for arch in (BatchTopK, TopK, JumpReLU, ReLU, MatryoshkaBatchTopK)
}

__all__ = ["ARCHITECTURES", "Architecture", "SAEOutput", "sparsity_knob"]


def sparsity_knob(arch: str) -> str | None:
    """The SAESpec field that sets arch's sparsity ("k", "l0_coeff" or "l1_coeff"); None if unknown."""
    return ARCHITECTURES[arch].knob if arch in ARCHITECTURES else None
