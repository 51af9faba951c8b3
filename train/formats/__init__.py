"""SAEs other libraries trained, read onto our SparseAutoencoder so that every metric and the page apply.

One reader per format, each a small file that knows its library's files, tensors and encode:

    saelens.py              SAELens 6: cfg.json + sae_weights.safetensors (inference and training forms),
                            and `saelens:RELEASE/SAE_ID` through SAELens's own pretrained registry
    sparsify.py             sparsify: <hookpoint>/cfg.json + sae.safetensors (its TopK)
    dictionary_learning.py  dictionary_learning: ae.pt + config.json (ReLU, TopK, BatchTopK, Matryoshka,
                            JumpReLU)

A reader maps the foreign encode onto ours exactly (folding what differs into the weights: a b_dec the
encoder does not subtract, decoder-norm rescaling) and says where the SAE belongs (model, site, layer)
where its files name it. train.rundir is the one place that tells the formats apart and reads them.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from sae.cache.spec import file_sha256
from sae.errors import UserError
from sae.train.sae import SparseAutoencoder

# The residual stream after block L as module paths name it (sparsify's hookpoints, relative to the
# base model; SAELens's HF-model hooks, full paths): GPT-2 h.L, Llama/Qwen layers.L, GPT-NeoX layers.L.
MODULE_HOOK = re.compile(r"(?:(?:model|transformer|gpt_neox|base_model)\.)*(?:layers|h)\.(\d+)")
LENS_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_pre|resid_post)")


@dataclass
class Imported:
    """An SAE another library trained, as ours, with where its files say it belongs (None: they do not say)."""

    sae: SparseAutoencoder
    """On the CPU, acting on raw activations like a run directory's SAE."""
    format: str
    """saelens, sparsify or dictionary_learning."""
    name: str
    """What comparisons call it (a hookpoint folder alone, layers.6, says too little)."""
    files: list[Path]
    """The files read: their sha256 goes into eval.json and latents.json."""
    hook: str | None = None
    """The site as the files name it (a SAELens hook, a sparsify hookpoint, a submodule name)."""
    model: str | None = None
    site: str | None = None
    layer: int | None = None
    context_size: int | None = None
    dataset: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    """What the reader mapped and how (the source architecture, folds), for the run's record."""

    def files_sha256(self) -> dict[str, str]:
        return {path.name: file_sha256([path]) for path in self.files}


def parse_hook(name: str | None) -> tuple[str, int] | None:
    """(site, layer) of a hook or module name on the residual stream; None for any other site.
    blocks.L.hook_resid_pre|post are TransformerLens's; a block's module (layers.L, h.L, model.layers.L,
    gpt_neox.layers.L) is hooked on its output, the residual stream after block L: our resid_post L,
    which is also resid_pre L+1 (tests/test_formats.py checks both on real models)."""
    if not name:
        return None
    if match := LENS_HOOK.fullmatch(name):
        return match.group(2), int(match.group(1))
    if match := MODULE_HOOK.fullmatch(name):
        return "resid_post", int(match.group(1))
    return None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def need_tensors(tensors: dict[str, Tensor], names: tuple[str, ...], path: Path) -> dict[str, Tensor]:
    """The named tensors as float32, or one line naming those the file lacks."""
    missing = [name for name in names if name not in tensors]
    if missing:
        raise UserError(f"{path} lacks tensor(s) {', '.join(missing)} (it has {', '.join(sorted(tensors))})")
    return {name: tensors[name].float() for name in names}


def check_shapes(tensors: dict[str, Tensor], path: Path) -> tuple[int, int]:
    """(d, m) of W_enc [d, m], b_enc [m], W_dec [m, d], b_dec [d] (threshold [m]), or one line."""
    d, m = tensors["W_enc"].shape
    want = {"b_enc": (m,), "W_dec": (m, d), "b_dec": (d,), "threshold": (m,)}
    for name, shape in want.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise UserError(
                f"{path}: {name} has shape {list(tensors[name].shape)}, expected {list(shape)} for d={d}, m={m}"
            )
    return d, m


def fold_b_dec(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """An encoder that does not subtract b_dec, as ours does: x W + b = (x − b_dec) W + (b + b_dec W)."""
    return {**tensors, "b_enc": tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]}


def fold_decoder_norms(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Latents scaled by their decoder rows' norms before selection and unscaled before decoding
    (SAELens's rescale_acts_by_decoder_norm), as plain weights: the encoder's columns times the norm,
    the decoder's rows over it. The latents are then the rescaled ones SAELens's encode returns."""
    norms_M = tensors["W_dec"].norm(dim=1)
    return {
        **tensors,
        "W_enc": tensors["W_enc"] * norms_M,
        "b_enc": tensors["b_enc"] * norms_M,
        "W_dec": tensors["W_dec"] / norms_M[:, None],
    }
