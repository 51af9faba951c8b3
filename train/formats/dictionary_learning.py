"""dictionary_learning directories, <save_dir>/trainer_<i>/ae.pt + config.json, as its trainSAE writes them:
torch.save of the SAE's state dict, json.dump of {"trainer": the trainer's config, "buffer": the buffer's}.

    dict_class              its default encode                                    ours
    AutoEncoder             ReLU(encoder(x − bias)), decoder(f) + bias            relu
    AutoEncoderTopK         topk(ReLU(encoder(x − b_dec)))                        topk, its k
    BatchTopKSAE            ReLU(encoder(x − b_dec)), kept where > θ (a scalar)   batchtopk, θ
    MatryoshkaBatchTopKSAE  the same with W_enc; nested groups of group_sizes     matryoshka_batchtopk, widths
                                                                                  = cumsum(group_sizes), θ
    JumpReluAutoEncoder     ReLU(z·(z > θ)), z = x W_enc + b_enc (no b_dec)       jumprelu, b_dec W_enc folded

A BatchTopK θ still at its initial −1 is refused: training stopped before estimating it, and the
library's encode would be a dense ReLU. Activations normalised in training need nothing here: trainSAE
scales the biases back before it saves, so ae.pt acts on raw rows. The site is the trainer's
submodule_name (resid_post_layer_L: the output of block L, our resid_post L) and its lm_name the model.
"""

import re
from pathlib import Path

import torch

from sae.errors import UserError
from sae.train.config import SAESpec
from sae.train.formats import Imported, check_shapes, fold_b_dec, need_tensors, read_json
from sae.train.sae import SparseAutoencoder

WEIGHTS, CONFIG = "ae.pt", "config.json"
FILES = (WEIGHTS, CONFIG)
CLASSES = {
    "AutoEncoder": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
    "MatryoshkaBatchTopKSAE": "matryoshka_batchtopk", "JumpReluAutoEncoder": "jumprelu",
}  # fmt: skip
SUBMODULE = re.compile(r"resid_(pre|post)_layer_(\d+)")


def read(path: Path) -> Imported:
    config = read_json(path / CONFIG)
    trainer = config.get("trainer")
    dict_class = trainer.get("dict_class") if isinstance(trainer, dict) else None
    if dict_class not in CLASSES:
        raise UserError(f"{path / CONFIG}: dict_class {dict_class!r} is not one we read ({', '.join(CLASSES)})")
    state = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
    if "ae" in state and "step" in state:
        raise UserError(f"{path / WEIGHTS} is a training backup (step {state['step']}), not the final save")
    arch = CLASSES[dict_class]
    tensors = _tensors(dict_class, state, path / WEIGHTS)
    _, m = check_shapes(tensors, path / WEIGHTS)
    k = int(state["k"]) if "k" in state else trainer.get("k", 0)
    widths = tuple(state["group_sizes"].cumsum(0).tolist()) if arch == "matryoshka_batchtopk" else ()
    if widths and widths[-1] != m:
        raise UserError(f"{path / WEIGHTS}: group_sizes add up to {widths[-1]}, not the dictionary size {m}")
    spec = SAESpec(arch, k, m, trainer.get("sparsity_penalty"), trainer.get("l1_penalty"), widths)
    sae = SparseAutoencoder.from_tensors(spec, tensors)
    name = trainer.get("submodule_name")
    match = SUBMODULE.fullmatch(name or "")
    return Imported(
        sae, "dictionary_learning", f"{path.parent.name}/{path.name}", [path / WEIGHTS, path / CONFIG], hook=name,
        model=trainer.get("lm_name"), site=match and f"resid_{match.group(1)}",
        layer=int(match.group(2)) if match else trainer.get("layer"),
        context_size=(config.get("buffer") or {}).get("ctx_len"),
        details={"dict_class": dict_class, "trainer_class": trainer.get("trainer_class")},
    )  # fmt: skip


def _tensors(dict_class: str, state: dict, path: Path) -> dict[str, torch.Tensor]:
    """Its state dict as W_enc [d, m], b_enc, W_dec [m, d], b_dec (and threshold [m]) for our encode."""
    if dict_class == "AutoEncoder":
        t = need_tensors(state, ("encoder.weight", "encoder.bias", "decoder.weight", "bias"), path)
        return {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["decoder.weight"].T,
                "b_dec": t["bias"]}  # fmt: skip
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        t = need_tensors(state, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "threshold"), path)
        t = {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["decoder.weight"].T,
             "b_dec": t["b_dec"], "threshold": t["threshold"]}  # fmt: skip
    else:
        t = need_tensors(state, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), path)
    t = {name: tensor.contiguous() for name, tensor in t.items()}
    if dict_class == "JumpReluAutoEncoder":
        return fold_b_dec(t)
    if dict_class == "AutoEncoderTopK":  # its threshold is an unused statistic: its encode is the top k
        return {name: tensor for name, tensor in t.items() if name != "threshold"}
    theta = float(t["threshold"])
    if theta < 0:
        raise UserError(
            f"{path}: {dict_class} threshold {theta:g}: training stopped before its threshold was estimated "
            "(its encode would be a dense ReLU)"
        )
    return {**t, "threshold": t["threshold"].expand(t["b_enc"].shape).contiguous()}
