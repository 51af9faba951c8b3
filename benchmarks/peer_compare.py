"""Ours beside a SAELens SAE and a sparsify SAE, each trained by its own library on the same cache rows, then
one `sae eval` and one `sae compare` of the three (README, "SAEs other libraries trained"; issue 22).

    python -m benchmarks.peer_compare --cache CACHE --out DIR                 # k 32, m 2,304, 200k tokens
    python -m benchmarks.peer_compare --cache CACHE --out DIR --tokens 1e6 --dict-size 4608
    python -m benchmarks.peer_compare --cache CACHE --out DIR --tiny          # k 8, m 128, 4,096 tokens

The rows: the batches `sae train` steps on, which our plan and loader draw from the cache's training chunks
(its held-out chunk left out) in its seeded order; read once into memory, [N, D] float32, they feed
SAELens and sparsify the same batches in the same order. Ours is the `sae train` command itself (its
recorded config is checked to be the one whose batches were read).

    ours      BatchTopK, `sae train --arch batchtopk` with our defaults: each row standardised, b_dec from the
              rows' geometric median, Adam betas 0.9/0.99, AuxK (α 1/32) on latents dead for 20,480 tokens,
              θ calibrated on the held-out chunk so that its L0 is k
    SAELens   BatchTopK, sae_lens's BatchTopKTrainingSAE stepped by its own SAETrainer.fit() (its
              training_forward_pass, Adam, scheduler) on our batches (its data provider is an iterator of
              batches), saved by its save_inference_model: a JumpReLU with its running threshold and k in
              the metadata. Its defaults otherwise: raw rows (normalize_activations "none"), b_dec 0,
              decoder init norm 0.1, acts rescaled by decoder norm, Adam betas 0.9/0.999, constant lr, AuxK
              (coefficient 1) on latents dead for 1,000 steps (so none in a run this short); its threshold is
              a running mean (rate 0.01 a step) of each batch's smallest kept activation, from 0
    sparsify  TopK (its only SAE), sparsify's SparseCoder with its own forward and FVU loss, stepped as
              its Trainer steps (b_dec set to the first batch's mean, the decoder normalised before every
              step and its gradient's parallel part removed), saved by SparseCoder.save_to_disk into a
              hookpoint folder. Its Trainer needs a model to hook, so the loop is here. Its defaults
              otherwise: raw rows, no AuxK (auxk_alpha 0), no multi-TopK. Its default optimiser is
              sign-SGD at its own lr scale; we use its Adam option (torch's Adam, betas 0.9/0.999) at the
              common lr, constant (its Adam schedule warms up over 1,000 steps, longer than this run)

Equal for all three: k, the dictionary size, the batch size, the tokens (steps × batch), the learning rate
(3e-4, ours and SAELens's default) and the seed of the initialisation. Neither SAELens's nor sparsify's
files name our model and site, so `sae eval` gets the cache's with --model, --site and --layer, and with
--cache it scores all three on the same held-out text after the cache's stream end, sharing its passes.

--tiny: a cache the caller made (tests/test_benchmarks.py: a tiny GPT-2's layer 1), k 8, m 128, batch 256,
4,096 tokens, 512 evaluation tokens, the `sae` commands run in this process (benchmarks/sae_cli.py).
"""

import argparse
import csv
import json
import os
from functools import partial
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's progress bar

import torch  # noqa: E402

from benchmarks import parse_with_tiny, sae_cli  # noqa: E402
from benchmarks.saelens import fit_saelens  # noqa: E402
from sae.cache.store import open_cache  # noqa: E402
from sae.config import parse_count, to_jsonable  # noqa: E402
from sae.evaluate.compare import summary  # noqa: E402
from sae.pipeline import train_config  # noqa: E402
from sae.train.config import TrainConfig  # noqa: E402
from sae.train.loader import Loader  # noqa: E402
from sae.train.plan import plan_training  # noqa: E402

TINY = {"tokens": "4096", "k": 8, "dict_size": 128, "batch_size": 256, "eval_tokens": "512"}


def our_config(cache: str, out: Path, args) -> TrainConfig:
    """`sae train`'s config for these settings, built as the command builds it (./pipeline.toml, then flags)."""
    settings = {
        "cache": cache, "arch": ("batchtopk",), "k": (args.k,), "dict_size": (args.dict_size,),
        "tokens": parse_count(args.tokens), "batch_size": args.batch_size, "lr": args.lr, "out": str(out / "runs"),
    }  # fmt: skip
    return train_config(None, settings)


def train_ours(cfg: TrainConfig, sae) -> Path:
    """`sae train` with cfg's settings as flags; its run directory, once its recorded config is cfg."""
    (spec,) = cfg.specs()
    flags = {
        "--cache": cfg.cache, "--arch": spec.arch, "--k": spec.k, "--dict-size": spec.dict_size,
        "--tokens": cfg.tokens, "--batch-size": cfg.batch_size, "--lr": cfg.lr, "--out": cfg.out,
    }  # fmt: skip
    (run_dir,) = map(Path, sae("train", *(str(x) for pair in flags.items() for x in pair)).split())
    recorded = json.loads((run_dir / "cfg.json").read_text())["train_config"]
    if recorded != to_jsonable(cfg):  # then the other libraries would not get the batches ours stepped on
        differ = sorted(key for key, value in to_jsonable(cfg).items() if recorded.get(key) != value)
        raise SystemExit(f"{run_dir} was trained with other settings than the rows were read for: {differ}")
    return run_dir


def training_rows(cfg: TrainConfig) -> torch.Tensor:
    """[steps·B, D] float32: the batches `sae train` steps on with cfg, in its order (our plan's training
    chunks, the held-out ones left out, through our loader with cfg's seed and shuffle buffer), read once."""
    plan = plan_training(cfg, open_cache(cfg.cache), world=1)
    (layer,) = plan.layers
    loader = Loader(plan.cache, plan.layers, plan.train_chunks, cfg.batch_size, cfg.seed, plan.setups[layer].gate,
                    cfg.buffer_chunks, cfg.loader_threads)  # fmt: skip
    rows_ND = torch.empty(plan.steps * cfg.batch_size, plan.cache.d_model)
    try:
        for x_BD in rows_ND.split(cfg.batch_size):
            x_BD.copy_(next(loader)[layer])
    finally:
        loader.close()
    return rows_ND


def train_saelens(rows_ND: torch.Tensor, cfg: TrainConfig, path: Path) -> Path:
    """SAELens's BatchTopK, trained by its SAETrainer on rows_ND's batches in order, saved as it deploys it."""
    (spec,) = cfg.specs()
    n, d = rows_ND.shape
    batches = iter(rows_ND.split(cfg.batch_size))
    sae = fit_saelens("batchtopk", batches, n, d, spec.dict_size, spec.k, cfg.batch_size, seed=cfg.seed, lr=cfg.lr)
    sae.save_inference_model(path)
    return path


def train_sparsify(rows_ND: torch.Tensor, cfg: TrainConfig, path: Path) -> Path:
    """sparsify's TopK SparseCoder, stepped on rows_ND's batches in order as its Trainer steps, saved by it."""
    from sparsify import SparseCoder, SparseCoderConfig

    (spec,) = cfg.specs()
    torch.manual_seed(cfg.seed)
    coder = SparseCoder(rows_ND.shape[1], SparseCoderConfig(num_latents=spec.dict_size, k=spec.k))
    optimizer = torch.optim.Adam(coder.parameters(), lr=cfg.lr)
    for step, x_BD in enumerate(rows_ND.split(cfg.batch_size)):
        if step == 0:  # its Trainer centres the pre-activations at the start
            coder.b_dec.data = x_BD.mean(0)
        coder.set_decoder_norm_to_unit_norm()  # its Trainer renormalises before each forward
        out = coder(x_BD)
        out.fvu.backward()  # its Trainer's loss, with its defaults (no AuxK, no multi-TopK): the FVU
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
    coder.save_to_disk(path)
    return path


def hookpoint(site: str, layer: int) -> str:
    """sparsify's name for the site: the output of block L (`layers.L`) is resid_post L and resid_pre L+1."""
    return f"layers.{layer - 1 if site == 'resid_pre' else layer}"


def table_rows(comparison: Path, run_dirs: list[Path]) -> list[dict]:
    """compare's table.csv rows (L0, NMSE, FVU, CE degradation), each with the format that wrote its SAE."""
    formats = {}
    for run_dir in run_dirs:
        run = json.loads((run_dir / "eval.json").read_text())["run"]
        formats[run["name"]] = run.get("format", "ours")
    keys = ("l0_mean", "nmse", "fvu", "ce_degradation")
    rows = []
    for row in csv.DictReader((comparison / "table.csv").open()):
        figures = {column: float(row[column]) for key in keys for column in (key, f"{key}_stderr")}
        rows.append({"name": row["name"], "format": formats[row["name"]], "arch": row["arch"], **figures})
    return rows


def run(args) -> dict:
    """Train the three, evaluate them together, compare; prints the comparison's table."""
    sae = partial(sae_cli.sae, in_process=args.tiny)
    cache = open_cache(args.cache)
    cfg = our_config(str(args.cache), args.out, args)
    (spec,) = cfg.specs()
    ours = train_ours(cfg, sae)
    rows_ND = training_rows(cfg)
    (layer,) = cfg.layer or cache.layers  # one layer: `sae train` refused a cache of several without --layer
    site, name = cache.spec["site"], f"k{spec.k}_m{spec.dict_size}"
    print(f"training SAELens and sparsify on the {len(rows_ND):,} rows ours stepped on, batches of {cfg.batch_size}")
    theirs = [
        train_saelens(rows_ND, cfg, args.out / f"saelens_batchtopk_{name}"),
        train_sparsify(rows_ND, cfg, args.out / f"sparsify_topk_{name}" / hookpoint(site, layer)),
    ]
    run_dirs = [ours, *theirs]
    where = ("--cache", str(args.cache), "--model", cache.spec["model"], "--site", site, "--layer", str(layer))
    sae("eval", *map(str, run_dirs), *where, "--tokens", args.eval_tokens)
    comparison = Path(sae("compare", *map(str, run_dirs), "--out", str(args.out / "comparison")).strip())
    print(summary(comparison))  # `sae compare` prints its folder; this is its table's headline, as `sae run` prints it
    return {"tokens": len(rows_ND), "batch_size": cfg.batch_size, "k": spec.k, "dict_size": spec.dict_size,
            "lr": cfg.lr, "rows": table_rows(comparison, run_dirs)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="one of our caches (one layer)")
    parser.add_argument("--out", type=Path, required=True, help="the three SAEs, their evaluations and comparison")
    parser.add_argument("--tiny", action="store_true", help=f"the defaults below become {TINY}")
    parser.add_argument("--tokens", default="200000", help="training tokens of each SAE, rounded down to whole batches")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dict-size", type=int, default=2304)
    parser.add_argument("--batch-size", type=int, default=1024, help="~200 steps at the default tokens")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-tokens", default="16384")
    args = parse_with_tiny(parser, argv, TINY)
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
