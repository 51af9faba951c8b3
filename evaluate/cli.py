"""`sae eval` and `sae compare` flags; eval's flags override their twins in pipeline.toml [eval]."""

from pathlib import Path

import typer

from sae.config import apply_storage_options, parse_count, stage_config
from sae.evaluate.config import EvalConfig

Opt = typer.Option


def eval_command(
    runs: list[Path] = typer.Argument(..., help="Run directories, e.g. runs/* (the LM is loaded once per model)."),
    tokens: str = Opt(None, help="Evaluation tokens, e.g. 1e6 (whole contexts)."),
    batch_size: int = Opt(None, help="Contexts per forward pass."),
    dataset: str = Opt(None, help="Evaluation text (default: the run's harvest dataset, documents it did not read)."),
    dataset_config: str = Opt(None, help="Hub dataset configuration name."),
    split: str = Opt(None, help="Dataset split (default: the cache's)."),
    text_column: str = Opt(None, help="Column holding the text (default: the cache's)."),
    seed: int = Opt(None, help="Seed of the document order (default: the cache's)."),
    start_doc: int = Opt(None, help="First document (default: the first one the harvest did not read)."),
    gate_bos: bool = Opt(None, "--gate-bos/--no-gate-bos", help="Add BOS rows to every SAE's gate (pass through)."),
    gate_first: bool = Opt(
        None, "--gate-first/--no-gate-first", help="Add each context's first position to every SAE's gate."
    ),
    gate_norm: float = Opt(
        None, help="Add rows above this multiple of the median row norm to every SAE's gate, e.g. 4."
    ),
    batch_mode: bool = Opt(
        None, "--batch-mode/--no-batch-mode", help="Also evaluate BatchTopK in batch mode (beside θ)."
    ),
    dense_threshold: float = Opt(None, help="Latents active on more than this fraction of tokens are dense."),
    cache: str = Opt(None, help="The training cache (path or URL), if it moved since training."),
    device: str = Opt(None, help="auto, cpu, cuda, cuda:1, ..."),
    config: Path = Opt(None, help="pipeline.toml to read (default: ./pipeline.toml if present)."),
) -> None:
    """Splice each run's SAE into its LM on held-out text: eval.json, report.md and PNGs in the run dir."""
    from sae.evaluate.evaluate import evaluate_runs

    overrides = dict(
        tokens=parse_count(tokens), batch_size=batch_size, dataset=dataset, dataset_config=dataset_config,
        dataset_split=split, text_column=text_column, seed=seed, start_doc=start_doc, gate_bos=gate_bos,
        gate_first=gate_first, gate_norm=gate_norm, batch_mode=batch_mode, dense_threshold=dense_threshold, cache=cache, device=device,
    )  # fmt: skip
    cfg = stage_config(EvalConfig, "eval", config, overrides)
    apply_storage_options(config)
    for path in evaluate_runs(runs, cfg):
        print(path)  # stdout carries only the results, so scripts can capture them


def compare_command(
    runs: list[Path] = typer.Argument(..., help="Evaluated run directories, e.g. runs/*."),
    out: Path = Opt(Path("comparison"), help="Folder for table.md, table.csv and the plots."),
) -> None:
    """Compare evaluated runs: a table and NMSE-vs-L0 and CE-degradation-vs-L0 plots (paper Figure 1)."""
    from sae.evaluate.compare import compare_runs

    print(compare_runs(runs, out))
