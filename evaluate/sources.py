"""Where an evaluation's contexts and statistics come from, for a group of runs that share them.

Runs with a cache (ours, and an imported SAE whose model's residual stream at its site is cached) are
evaluated on the text after the cache's stream end, with the cache's mean for mean ablation and its
rows for a norm gate's median. An imported SAE without one is evaluated on the dataset its files name
(or --dataset, else the bundled sample) from its first document in the seeded order, in contexts of
its own length; the mean for mean ablation is then its site's mean over those very contexts, from a
first pass that runs the model up to the site. A run trained from a stream it did not keep (no cache on
disk) is evaluated on the text after where its stream ended, with that mean too.
"""

from typing import NamedTuple

import numpy as np
import torch

from sae.cache.convert import require_stream
from sae.commands import harvest_command_line
from sae.errors import UserError
from sae.evaluate.config import EvalConfig
from sae.evaluate.heldout import eval_plan, heldout_tokens, text_plan
from sae.harvest.config import HarvestConfig
from sae.harvest.hooks import capture
from sae.harvest.model import LoadedModel
from sae.harvest.text import BUNDLED_DATASETS, DatasetSource
from sae.train.gate import Gate, build_gate
from sae.train.rundir import Run


class EvalData(NamedTuple):
    site: str
    layer: int
    tokens_CT: np.ndarray
    plan: dict
    """eval.json's eval_spec: which text, how it was packed, where the mean for mean ablation is from."""
    mean_D: torch.Tensor
    """The activation mean-ablation splices in at every position."""
    gate: Gate
    """The evaluation's own gate (cfg.gate_*), united with each SAE's."""


def group_key(run: Run) -> tuple:
    """Runs with equal keys share their evaluation contexts and passes."""
    if run.cache is not None:
        return ("cache", str(run.cache.path), run.layer)
    if run.imported is None:  # a stream's: its spec and where it ended name its text
        return ("stream", run.cfg["cache"]["key"], str(run.cfg["stream"]["stream_end"]), run.layer)
    spec = run.spec
    return ("text", str(spec["dataset"]), spec["site"], run.layer, spec["ctx_len"])


def eval_data(run: Run, loaded: LoadedModel, cfg: EvalConfig, device: torch.device) -> EvalData:
    if run.cache is not None:
        return cache_data(run, loaded, cfg, device)
    return stream_data(run, loaded, cfg, device) if run.imported is None else text_data(run, loaded, cfg, device)


def cache_data(run: Run, loaded: LoadedModel, cfg: EvalConfig, device: torch.device) -> EvalData:
    """The held-out text after the cache's stream end; the cache's mean and gate statistics."""
    cache, layer = run.cache, run.layer
    plan, source = eval_plan(cfg, cache.spec, require_stream(cache.meta["stream_end"], cache.path), str(cache.path))
    tokens_CT, plan = heldout_tokens(plan, source, loaded.tokenizer)
    plan["model_revision"] = loaded.revision
    plan["mean_ablation"] = "cache"
    mean_D = torch.tensor(cache.stats(layer)["mean_D"], device=device)  # the training data's mean
    gate = build_gate(cache, layer, cfg.gate_bos, cfg.gate_first, cfg.gate_norm)
    return EvalData(cache.spec["site"], layer, tokens_CT, plan, mean_D, gate)


def stream_data(run: Run, loaded: LoadedModel, cfg: EvalConfig, device: torch.device) -> EvalData:
    """A run trained from a stream it did not keep: the held-out text after where the stream ended, as
    after a cache's; the site's mean over the evaluation contexts, as for text_data."""
    check_no_norm_gate(run, cfg)
    where = f"the stream {run.path} was trained on"
    return uncached_data(run, loaded, cfg, device, *eval_plan(cfg, run.spec, run.cfg["stream"]["stream_end"], where))


def text_data(run: Run, loaded: LoadedModel, cfg: EvalConfig, device: torch.device) -> EvalData:
    """An imported SAE without a cache: its dataset from the first document, its site's mean over the
    evaluation contexts."""
    check_no_norm_gate(run, cfg)
    dataset = cfg.dataset or run.spec["dataset"] or BUNDLED_DATASETS[0]
    return uncached_data(run, loaded, cfg, device, *text_plan(cfg, dataset, run.spec["ctx_len"], loaded.bos_token_id))


def check_no_norm_gate(run: Run, cfg: EvalConfig) -> None:
    if cfg.gate_norm:
        spec = run.spec
        hint = HarvestConfig(model=spec["model"], layers=(run.layer,), site=spec["site"], ctx_len=spec["ctx_len"])
        raise UserError(
            f"run {run.path}: --gate-norm needs the median row norm of a cache of {spec['model']} {spec['site']} "
            f"layer {run.layer}, and there is none; make one with `{harvest_command_line(hint)}`, or drop --gate-norm"
        )


def uncached_data(run: Run, loaded: LoadedModel, cfg: EvalConfig, device: torch.device, plan: dict,
                  source: DatasetSource) -> EvalData:  # fmt: skip
    """The evaluation contexts of `plan`; the mean for mean ablation from a first pass up to the site."""
    tokens_CT, plan = heldout_tokens(plan, source, loaded.tokenizer)
    plan["model_revision"] = loaded.revision
    plan["mean_ablation"] = "evaluation_contexts"
    mean_D = site_mean(loaded, run.spec["site"], run.layer, tokens_CT, cfg.batch_size, device)
    gate = Gate(loaded.bos_token_id if cfg.gate_bos else None, cfg.gate_first)
    return EvalData(run.spec["site"], run.layer, tokens_CT, plan, mean_D, gate)


@torch.inference_mode()
def site_mean(loaded: LoadedModel, site: str, layer: int, tokens_CT: np.ndarray, batch_size: int,
              device: torch.device) -> torch.Tensor:  # fmt: skip
    """The mean activation [D] at the site over every position of the contexts (float64 sums)."""
    sum_D, rows = torch.zeros(loaded.d_model, dtype=torch.float64, device=device), 0
    for c0 in range(0, len(tokens_CT), batch_size):
        ids_BT = torch.from_numpy(tokens_CT[c0 : c0 + batch_size]).to(device).long()
        acts_BTD = capture(loaded.model, loaded.blocks, site, [layer], ids_BT)[layer]
        sum_D += acts_BTD.double().sum((0, 1))
        rows += ids_BT.numel()
    return (sum_D / rows).float()
