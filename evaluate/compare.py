"""`sae compare`: evaluated runs side by side, a table (markdown + CSV) and the paper's Figure 1 plots.
Ours and other libraries' SAEs mix: eval.json holds what the table needs, whatever made the SAE."""

import csv
import json
from pathlib import Path

from sae.errors import UserError
from sae.evaluate.plots import l0_distributions, metric_vs_l0
from sae.train.archs import sparsity_knob
from sae.train.formats import saelens
from sae.train.rundir import EVAL

TABLE_MD, TABLE_CSV = "table.md", "table.csv"
NMSE_PNG, CE_PNG, L0_PNG = "nmse_vs_l0.png", "ce_degradation_vs_l0.png", "l0_distributions.png"
RUN_COLUMNS = ("name", "arch", "dict_size", "k")
METRIC_COLUMNS = (
    "l0_mean", "nmse", "fvu", "nmse_standardized", "nmse_excl_bos", "ce_degradation", "ce_degradation_every_position",
    "ce_recovered_zero", "ce_recovered_mean", "kl",
)  # fmt: skip
COUNT_COLUMNS = ("gated_fraction", "dead_latents", "dense_latents", "n_tokens")


def load_results(run_dirs: list[Path]) -> list[dict]:
    """Each run's eval.json: ours or another library's SAE (saelens:RELEASE/SAE_ID: where `sae eval` saved it)."""
    results = []
    for run_dir in run_dirs:
        if str(run_dir).startswith(saelens.PREFIX):
            run_dir = saelens.local_dir(str(run_dir))
        path = Path(run_dir) / EVAL
        if not path.is_file():
            raise UserError(f"run {run_dir} has no {EVAL}; evaluate it first with `sae eval {run_dir}`")
        results.append(json.loads(path.read_text()))
    return results


def prefixes(result: dict) -> list[dict]:
    """A Matryoshka run's nested prefixes, each as the result of an SAE of its own (name RUN[:width])."""
    blocks = [block for key, block in result.items() if key.startswith("prefix_")]
    run = result["run"]
    return [
        {**block, "run": {**run, "name": f"{run['name']}[:{block['width']}]", "dict_size": block["width"]}}
        for block in sorted(blocks, key=lambda block: block["width"])
    ]


def table_rows(results: list[dict]) -> list[dict]:
    """One flat row per run and per Matryoshka prefix, sorted by architecture, dictionary size and L0."""
    rows = []
    nested = [prefix for result in results for prefix in prefixes(result)]
    for r in [*results, *nested]:
        row = {c: r["run"].get(c) for c in RUN_COLUMNS}
        if sparsity_knob(r["run"]["arch"]) != "k":
            row["k"] = None  # k is not a knob of jumprelu and relu
        for c in METRIC_COLUMNS:
            row[c], row[f"{c}_stderr"] = r.get(c), r.get(f"{c}_stderr")
        every = r.get("every_position", r)  # an SAE without a gate is spliced everywhere in its headline
        column = "ce_degradation_every_position"
        row[column], row[f"{column}_stderr"] = every["ce_degradation"], every["ce_degradation_stderr"]
        row.update({c: r.get(c) for c in COUNT_COLUMNS})
        rows.append(row)
    return sorted(rows, key=lambda row: (row["arch"], row["dict_size"], row["l0_mean"]))


def _markdown(rows: list[dict], note: str) -> str:
    def cell(row: dict, c: str) -> str:
        value = row[c]
        if value is None:
            return "–"
        if c in METRIC_COLUMNS:
            return f"{value:.4g} ± {row[f'{c}_stderr']:.2g}"
        if isinstance(value, float):
            return f"{value:.2%}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    columns = [*RUN_COLUMNS, *METRIC_COLUMNS, *COUNT_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in rows]
    return "\n".join([note, "", *lines, ""])


def summary(out: Path) -> str:
    """The comparison's headline, for a terminal: per run L0, NMSE and CE degradation with their
    standard errors (and the gated share of rows), then where the table and the plots are."""
    rows = list(csv.DictReader((Path(out) / TABLE_CSV).open()))

    def pm(row: dict, key: str, digits: int) -> str:
        return f"{float(row[key]):.{digits}f} ± {float(row[key + '_stderr']):.{digits}f}"

    width = max(len(row["name"]) for row in rows)
    lines = [f"{'run':{width}}  {'L0':>12}  {'NMSE':>15}  {'CE degradation (nats)':>21}  gated rows"]
    for row in rows:
        lines.append(
            f"{row['name']:{width}}  {pm(row, 'l0_mean', 1):>12}  {pm(row, 'nmse', 4):>15}  "
            f"{pm(row, 'ce_degradation', 3):>21}  {float(row['gated_fraction']):.1%}"
        )
    lines += [f"table: {Path(out) / TABLE_MD}"]
    lines += [f"plot: {Path(out) / name}" for name in (NMSE_PNG, CE_PNG, L0_PNG)]
    return "\n".join(lines)


def compare_runs(run_dirs: list[Path], out: Path) -> Path:
    """Write table.md, table.csv, nmse_vs_l0.png, ce_degradation_vs_l0.png and l0_distributions.png
    into out; returns out."""
    if not run_dirs:
        raise UserError("no runs given; e.g. `sae compare runs/*`")
    results = load_results(run_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(results)
    sets = {r["eval_spec"]["tokens_sha256"] for r in results}
    gates = {tuple(r["config"][k] for k in ("gate_bos", "gate_first", "gate_norm")) for r in results}
    note = (
        "# SAE comparison\n\n± is one standard error over evaluation contexts; NMSE = Σ‖x−x̂‖²/Σ‖x‖² (raw). "
        "Headline figures are each SAE as deployed: rows its gate names pass through unspliced and are out "
        "of the reconstruction metrics (gated_fraction); ce_degradation_every_position splices every row."
    )
    if len(sets) > 1 or len(gates) > 1:
        note += "\n\n**Warning:** these runs were evaluated on different texts or evaluation gates."
    (out / TABLE_MD).write_text(_markdown(rows, note))
    with open(out / TABLE_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    nested = {r["run"]["name"]: prefixes(r) for r in results}
    metric_vs_l0(
        results, "nmse", "NMSE  Σ‖x−x̂‖² / Σ‖x‖²  (raw activations)", "Reconstruction error vs sparsity", out / NMSE_PNG,
        nested,
    )  # fmt: skip
    metric_vs_l0(
        results, "ce_degradation", "CE degradation (nats per token)", "LM loss increase when spliced vs sparsity",
        out / CE_PNG, nested,
    )  # fmt: skip
    l0_distributions(results, out / L0_PNG)
    return out
