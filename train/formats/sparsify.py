"""sparsify hookpoint directories, <run>/<hookpoint>/cfg.json + sae.safetensors, as SparseCoder.save_to_disk
writes them (EleutherAI's hub repos of sparsify SAEs hold the same folders).

    encode   topk(ReLU((x − b_dec) encoder.weightᵀ + encoder.bias)), decode latents W_dec + b_dec: our
             TopK with W_enc = encoder.weightᵀ (W_dec is [m, d] already); normalize_decoder and
             multi_topk change training only
    site     the folder's name is the hookpoint, a module of the base model hooked on its output:
             layers.L (h.L for GPT-2) is the residual stream after block L, our resid_post L. The run's
             config.json beside it names the model, the dataset and ctx_len, when it is there
    refused  transcoders, skip connections (W_skip), groupmax, and 2024's signed SAEs: not a TopK SAE of x
"""

import re
from pathlib import Path

from safetensors.torch import load_file

from sae.errors import UserError
from sae.train.config import SAESpec
from sae.train.formats import Imported, check_shapes, need_tensors, parse_hook, read_json
from sae.train.sae import SparseAutoencoder

CFG, WEIGHTS, RUN_CONFIG = "cfg.json", "sae.safetensors", "config.json"
FILES = (CFG, WEIGHTS)
K_DEFAULT = 32  # SparseCoderConfig's k where an old cfg.json names none


def read(path: Path) -> Imported:
    cfg, raw = read_json(path / CFG), load_file(path / WEIGHTS)
    refused = _refused(cfg, raw)
    if refused:
        raise UserError(f"{path} holds a sparsify {refused}, not a TopK SAE of its input: we read sparsify's TopK SAEs")
    named = need_tensors(raw, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path / WEIGHTS)
    tensors = {
        "W_enc": named["encoder.weight"].T.contiguous(), "b_enc": named["encoder.bias"],
        "W_dec": named["W_dec"], "b_dec": named["b_dec"],
    }  # fmt: skip
    d, m = check_shapes(tensors, path / WEIGHTS)
    k = cfg.get("k", K_DEFAULT)
    if cfg.get("d_in", d) != d or not 0 < k <= m:
        raise UserError(f"{path / CFG} says d_in={cfg.get('d_in')}, k={k}; its weights have d={d}, m={m}")
    sae = SparseAutoencoder.from_tensors(SAESpec("topk", k, m, None, None), tensors)
    hookpoint, run_dir = _hookpoint(path)
    files = [path / CFG, path / WEIGHTS]
    run = {}
    if (run_dir / RUN_CONFIG).is_file():
        run, files = read_json(run_dir / RUN_CONFIG), [*files, run_dir / RUN_CONFIG]
    site = parse_hook(hookpoint)
    return Imported(
        sae, "sparsify", f"{run_dir.name}/{hookpoint}", files, hook=hookpoint, model=run.get("model"),
        site=site and site[0], layer=site and site[1], context_size=run.get("ctx_len"), dataset=run.get("dataset"),
        details={"k": k, "normalize_decoder": cfg.get("normalize_decoder"), "multi_topk": cfg.get("multi_topk")},
    )  # fmt: skip


def _refused(cfg: dict, raw: dict) -> str | None:
    """What this coder is if not a plain TopK SAE (a skip transcoder's cfg.json may lack `transcode`)."""
    if cfg.get("transcode"):
        return "transcoder"
    if cfg.get("skip_connection") or "W_skip" in raw:
        return "coder with a skip connection"
    if cfg.get("activation", "topk") != "topk":
        return f"{cfg['activation']} coder"
    if cfg.get("signed"):
        return "signed SAE (top-k of |pre-activation|)"
    return None


def _hookpoint(path: Path) -> tuple[str, Path]:
    """(hookpoint, the run's folder): <run>/<hookpoint>, <run>/<hookpoint>/seed<N>, <run>/best/<hookpoint>."""
    if re.fullmatch(r"seed\d+", path.name):
        path = path.parent
    run_dir = path.parent.parent if path.parent.name == "best" else path.parent
    return path.name, run_dir
