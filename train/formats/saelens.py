"""SAELens 6 directories (cfg.json + sae_weights.safetensors) as SAE.save_model writes them, in the
inference and the training form, and as TrainingSAE.save_inference_model does; and a release of
SAELens's pretrained registry, `saelens:RELEASE/SAE_ID`, saved as such a directory by SAELens itself.

    architecture   standard → relu, topk → topk, jumprelu → jumprelu (θ per latent); a jumprelu exported
                   from batchtopk or matryoshka_batchtopk training (one θ for every latent, k in the
                   metadata) → batchtopk / matryoshka_batchtopk; their training form (topk_threshold) too
    encode         SAELens selects top-k then ReLUs, we ReLU then select: the same latents. Folded
                   into the weights: apply_b_dec_to_input false (b_dec W_enc into b_enc) and
                   rescale_acts_by_decoder_norm (train.formats.fold_decoder_norms)
    normalisation  layer_norm → standardize, constant_norm_rescale → constant_norm_rescale; none,
                   expected_average_only_in and covariance_whitening → none: SAELens applies nothing for
                   those at load (its training folds the factor or the whitening into the weights)
"""

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from sae.errors import UserError
from sae.train.config import SAESpec
from sae.train.formats import (
    Imported,
    check_shapes,
    fold_b_dec,
    fold_decoder_norms,
    need_tensors,
    parse_hook,
    read_json,
)
from sae.train.sae import SparseAutoencoder

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
FILES = (CFG, WEIGHTS)
PREFIX = "saelens:"
"""A run argument `saelens:RELEASE/SAE_ID` names a release of SAELens's pretrained registry."""
ARCHITECTURES = {
    "standard": "relu", "topk": "topk", "jumprelu": "jumprelu",
    "batchtopk": "batchtopk", "matryoshka_batchtopk": "matryoshka_batchtopk",
}  # fmt: skip
NORMALIZATIONS = {
    "none": "none", "expected_average_only_in": "none", "covariance_whitening": "none",
    "layer_norm": "standardize", "constant_norm_rescale": "constant_norm_rescale",
}  # fmt: skip
"""SAELens's normalize_activations → ours (TrainConfig.normalize)."""
THRESHOLDED = ("jumprelu", "batchtopk", "matryoshka_batchtopk")
TOPK_DEFAULT = 100  # SAELens's k for a topk cfg.json that names none


def read(path: Path) -> Imported:
    cfg = read_json(path / CFG)
    meta, arch = metadata(cfg), cfg.get("architecture") or _pre6_architecture(cfg)
    norm = cfg.get("normalize_activations", "none")
    norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)  # pre-6.0: a bool
    if arch not in ARCHITECTURES:
        raise UserError(f"{path / CFG}: SAELens architecture '{arch}' is not one we read ({', '.join(ARCHITECTURES)})")
    if meta.get("hook_head_index") is not None or cfg.get("reshape_activations") == "hook_z":
        raise UserError(f"{path}: an SAE of attention heads ({meta.get('hook_name')}), not of the residual stream")
    if norm not in NORMALIZATIONS:
        raise UserError(
            f"{path / CFG}: normalize_activations '{norm}' is not one we read ({', '.join(NORMALIZATIONS)})"
        )
    tensors = weights(path, cfg, arch)
    spec, tensors = our_spec(arch, cfg, meta, tensors)
    sae = SparseAutoencoder.from_tensors(spec, tensors, normalize=NORMALIZATIONS[norm])
    site = parse_hook(meta.get("hook_name")) or parse_hook(meta.get("hf_hook_name"))
    return Imported(
        sae, "saelens", path.name, [path / CFG, path / WEIGHTS], hook=meta.get("hook_name"),
        model=meta.get("model_name"), site=site and site[0], layer=site and site[1],
        context_size=meta.get("context_size"), dataset=meta.get("dataset_path"),
        details={"architecture": arch, "training_architecture": meta.get("training_architecture"),
                 "normalize_activations": norm, "apply_b_dec_to_input": cfg.get("apply_b_dec_to_input", True),
                 "rescale_acts_by_decoder_norm": bool(cfg.get("rescale_acts_by_decoder_norm"))},
    )  # fmt: skip


def metadata(cfg: dict) -> dict:
    """cfg.json's metadata; a pre-6.0 config keeps it at the top level (hook_point for hook_name)."""
    meta = dict(cfg.get("metadata") or {})
    for key in ("model_name", "hook_name", "hook_head_index", "context_size", "dataset_path", "hf_hook_name"):
        if meta.get(key) is None:
            meta[key] = cfg.get(key)
    meta["hook_name"] = meta["hook_name"] or cfg.get("hook_point")
    return meta


def _pre6_architecture(cfg: dict) -> str:
    return "topk" if cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk" else "standard"


def weights(path: Path, cfg: dict, arch: str) -> dict[str, torch.Tensor]:
    """The four tensors (and threshold [m]) in float32, the encoder as ours: x − b_dec, unscaled latents."""
    raw = load_file(path / WEIGHTS)
    if "threshold" not in raw and "log_threshold" in raw:  # older JumpReLU checkpoints
        raw["threshold"] = raw["log_threshold"].float().exp()
    if "threshold" not in raw and "topk_threshold" in raw:  # the training form of (Matryoshka) BatchTopK
        raw["threshold"] = raw["topk_threshold"].float().expand(raw["b_enc"].shape).contiguous()
    names = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if arch in THRESHOLDED else ())
    tensors = need_tensors(raw, names, path / WEIGHTS)
    d, m = check_shapes(tensors, path / WEIGHTS)
    if (cfg.get("d_in", d), cfg.get("d_sae", m)) != (d, m):
        raise UserError(
            f"{path / CFG} says d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')}; its weights have {d}, {m}"
        )
    if cfg.get("apply_b_dec_to_input", True) is False:
        tensors = fold_b_dec(tensors)
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk") and cfg.get("rescale_acts_by_decoder_norm"):
        tensors = fold_decoder_norms(tensors)  # (after b_dec: SAELens rescales the pre-activations)
    return tensors


def our_spec(arch: str, cfg: dict, meta: dict, tensors: dict) -> tuple[SAESpec, dict]:
    """Our SAESpec of the SAE (its k, widths and sparsity coefficients where the files say), and its tensors."""
    details = meta.get("training_architecture_details") or {}
    trained, m = meta.get("training_architecture"), tensors["W_enc"].shape[1]
    ours = ARCHITECTURES[arch]
    k = cfg.get("k") or details.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    one_theta = "threshold" in tensors and bool((tensors["threshold"] == tensors["threshold"][0]).all())
    if arch == "jumprelu" and trained in ("batchtopk", "matryoshka_batchtopk") and one_theta and k:
        ours = trained  # SAELens's export of a BatchTopK: its θ in every latent's threshold
    widths = tuple(cfg.get("matryoshka_widths") or details.get("matryoshka_widths") or ())
    if ours == "matryoshka_batchtopk" and (not widths or widths[-1] != m):
        raise UserError(
            f"a Matryoshka SAELens SAE needs matryoshka_widths ending at d_sae={m}; its cfg.json has {list(widths)}"
        )
    if ours == "topk" and not k:
        k = TOPK_DEFAULT
    l0 = cfg.get("l0_coefficient", details.get("l0_coefficient"))
    l1 = cfg.get("l1_coefficient", details.get("l1_coefficient"))
    spec = SAESpec(ours, int(k or 0), m, l0, l1, widths if ours == "matryoshka_batchtopk" else ())
    return spec, tensors


# -- the pretrained registry -------------------------------------------------------------------------
def local_dir(reference: str) -> Path:
    """Where `saelens:RELEASE/SAE_ID` is saved: ./saelens/RELEASE/SAE_ID (`sae compare` finds it there too)."""
    release, _, sae_id = reference.removeprefix(PREFIX).partition("/")
    if not release or not sae_id:
        raise UserError(
            f"'{reference}': give a SAELens release and SAE id, saelens:RELEASE/SAE_ID (e.g. "
            "saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre)"
        )
    return Path("saelens") / release / sae_id


def fetch(reference: str) -> Path:
    """The directory of `saelens:RELEASE/SAE_ID`: loaded through SAELens's own registry
    (SAE.from_pretrained: its converters and scaling factors applied) and saved with its save_model,
    once; read() reads it like any SAELens directory."""
    target = local_dir(reference)
    if (target / CFG).is_file() and (target / WEIGHTS).is_file():
        return target
    release, _, sae_id = reference.removeprefix(PREFIX).partition("/")
    try:
        from sae_lens import SAE
    except ImportError:
        raise UserError(f"'{reference}' needs SAELens: pip install sae-lens") from None
    _check_hub(release, reference)
    try:
        sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except ValueError as e:  # an unknown release or id: SAELens says which, before any download
        raise UserError(f"'{reference}': {str(e).strip().splitlines()[0]}") from None
    except OSError as e:  # huggingface_hub's LocalEntryNotFoundError is one (offline, not in the local cache)
        raise UserError(
            f"cannot download '{reference}': {type(e).__name__} (the Hugging Face hub is unreachable and SAELens "
            "has no local copy); download it where there is a network and pass its directory"
        ) from None
    partial = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        sae.save_model(str(partial))
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _check_hub(release: str, reference: str) -> None:
    """One quick look at the hub before SAELens's downloads, which retry an unreachable hub for ≈ 25 s;
    with HF_HUB_OFFLINE set they read the local cache only and fail at once."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory().get(release)
    if huggingface_hub.constants.HF_HUB_OFFLINE or lookup is None:  # an unknown release fails in from_pretrained
        return
    try:
        huggingface_hub.model_info(lookup.repo_id, timeout=5)
    except HfHubHTTPError:  # the hub answered (a gated or private repo): SAELens's download says the rest
        return
    except Exception as e:  # no network, DNS, timeout: whatever the HTTP client raises
        raise UserError(
            f"cannot download '{reference}': the Hugging Face hub is unreachable ({type(e).__name__}); "
            "where SAELens downloaded it before, run with HF_HUB_OFFLINE=1 to read its local copy"
        ) from None
