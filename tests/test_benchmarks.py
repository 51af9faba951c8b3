"""Every benchmark entry point in its tiny mode: it runs, and it prints its figures (issue 23).

Each test calls a script's main with --tiny in this process, as `python -m benchmarks.X --tiny` would
(a child's start-up, seconds of imports, would be most of a tiny run), then reads the JSON line it
printed last and its report lines, and checks what a broken benchmark would get wrong: a rate that is
not a positive finite number, a missing row or ratio, two paths that should agree and do not.
"""

import contextlib
import io
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import __main__ as all_benchmarks
from benchmarks import (
    absorption_saebench,
    batchtopk_study,
    harvest,
    latents,
    loader_s3,
    matryoshka_study,
    models,
    parity,
    peer_compare,
    sae_cli,
    select,
    sharding,
    step,
    storage_study,
    stream_memory,
)
from benchmarks import eval as evaluation
from benchmarks import saelens as saelens_benchmark
from benchmarks import train as train_benchmark
from sae.train.trainer import run_training


def run(module, capsys, *args: str) -> tuple[str, dict | list]:
    """(stdout, the JSON line printed last) of module.main(args)."""
    module.main(list(args))
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


def positive(*values: float) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[str, str]:
    """(directory, stdout) of `python -m benchmarks.models DIR --tiny`: the model the other benchmarks run."""
    directory = tmp_path_factory.mktemp("bench") / "tiny-gpt2"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        models.main([str(directory), "--tiny"])
    return str(directory), out.getvalue()


def test_models(tiny_model):
    directory, out = tiny_model
    path, shape = out.strip().splitlines()
    assert path == directory
    assert json.loads(shape) == {"path": directory, **models.saved_shape(Path(directory))}
    assert json.loads(shape)["n_embd"] == models.TINY_GPT2["n_embd"]


def test_harvest(capsys, tiny_model):
    out, r = run(harvest, capsys, "--tiny", "--model", tiny_model[0])
    assert r["tokens"] == harvest.TINY["tokens"] and r["layer"] == 1
    assert positive(r["plain_tok_s"], r["harvest_tok_s"], r["ratio"], r["plain_mfu"], r["harvest_mfu"])
    assert positive(*r["write_ceiling_tok_s"].values())
    n_codecs = {dtype: sum(c["dtype"] == dtype for c in r["codecs"]) for dtype in ("float16", "int8", "float32")}
    assert n_codecs == {
        "float16": len(harvest.CODECS),
        "int8": len(harvest.SCALED_CODECS),
        "float32": len(harvest.CODECS),
    }
    for c in r["codecs"]:
        assert positive(c["bytes_per_token"], c["encode_MBps"], c["decode_MBps"]), c
        assert 0 <= c["median_row_error"] < 0.1 and 0 <= c["rel_error"] < 0.1, c
    codec = {(c["dtype"], c["codec"]): c for c in r["codecs"]}
    assert codec["float32", "none"]["rel_error"] == 0
    assert codec["int8", "zstd:1"]["bytes_per_token"] < codec["float16", "zstd:1"]["bytes_per_token"]
    assert "ratio              :" in out and "host write ceiling" in out


def test_train(capsys):
    out, r = run(train_benchmark, capsys, "--tiny")
    assert (r["d"], r["m"], r["k"], r["batch"]) == train_benchmark.TINY
    assert set(r["steps"]) == {train_benchmark.BASELINE, train_benchmark.SPARSE, train_benchmark.DENSE}
    for name, s in r["steps"].items():
        assert positive(s["tok_s"], s["loss"], s["vs_baseline"], s["mfu"]), name
    assert r["steps"][train_benchmark.BASELINE]["vs_baseline"] == 1
    assert positive(r["loader_rows_s"], r["loader_vs_demand"], r["sweep_s"], r["separate_s"], r["sweep_vs_separate"])
    assert r["steps"][r["best"]["name"]]["vs_baseline"] == r["best"]["vs_baseline"]
    assert out.count("  step  ") == 3 and "sweep of 3 in one pass" in out


def test_latents(capsys):
    out, r = run(latents, capsys, "--tiny")
    assert r["rows"] == latents.TINY["rows"] and r["m"] == latents.TINY["m"]
    rates = [r[f"{name}_rows_s"] for name in ("encode", "floor", "update", "pass")]
    assert positive(*rates, r["update_vs_encode"], r["pass_vs_encode"], r["pass_vs_floor"], r["encode_mfu"])
    assert "inspect pass (from the cache)" in out


def test_select(capsys):
    out, r = run(select, capsys, "--tiny", "--profile")
    (s,) = r["shapes"]  # the selections agreed, or measure_shape would have failed
    assert (s["name"], s["d"], s["m"], s["k"], s["batch"]) == select.TINY
    assert positive(*s["select_ms"].values(), *s["step_tok_s"].values(), s["select_vs_before"], s["step_vs_before"])
    ops = r["profile"]["ops"]
    assert ops and all(op["self_ms_per_step"] >= 0 for op in ops) and 0 < sum(op["share"] for op in ops) <= 1 + 1e-9
    assert "select" in out and "profile of whole CPU training steps" in out


def test_eval(capsys, tiny_model):
    out, r = run(evaluation, capsys, "--tiny", "--model", tiny_model[0])
    assert [(row["layer"], row["saes"]) for row in r["rows"]] == [(1, 1), (2, 1)]
    for row in r["rows"]:
        assert positive(row["seconds"]["full"], row["seconds"]["prefix"], row["ratio"])
        assert row["max_rel_diff"] < 1e-3  # the prefix-sharing evaluation computes what the full passes do
    assert out.count("from the site") == 2


def test_saelens(capsys):
    pytest.importorskip("sae_lens")
    out, r = run(saelens_benchmark, capsys, "--tiny")
    assert set(r["archs"]) == {"batchtopk", "topk"} and r["tokens"] == 16 * 128
    for arch, s in r["archs"].items():
        assert positive(s["ours"]["tok_s"], s["sae_lens"]["tok_s"], s["tok_s_ratio"]), arch
        assert 0 < s["ours"]["fvu"] < 1 and 0 < s["sae_lens"]["fvu"] < 2, arch  # ours learns in 16 steps
    assert out.count("held-out FVU") == 2


def test_loader_s3(capsys):
    pytest.importorskip("moto")
    pytest.importorskip("obstore")
    before = os.environ.get("AWS_ENDPOINT_URL")
    out, r = run(loader_s3, capsys, "--tiny")
    assert positive(r["rows_s"]["local"], r["rows_s"]["s3"], r["s3_vs_local"])
    assert os.environ.get("AWS_ENDPOINT_URL") == before  # the moto endpoint was for the run only
    assert "s3 / local" in out


def test_sharding(capsys):
    out, r = run(sharding, capsys, "--tiny")
    assert [row["chunks_per_file"] for row in r["rows"]] == [1, 4, 16]
    for row in r["rows"]:
        assert positive(row["write_MBps"], row["read_MBps"], row["write_vs_unsharded"], row["read_vs_unsharded"])
        assert row["files"] == 16 // row["chunks_per_file"]
    assert out.count("\n") == 2 + len(r["rows"]) + 1


def test_storage_study(capsys, tiny_model, tmp_path):
    out, rows = run(storage_study, capsys, "--tiny", "--model", tiny_model[0], "--out", str(tmp_path))
    assert [(row["dtype"], row["arch"]) for row in rows] == [
        (dtype, arch) for dtype in ("float16", "int8") for arch in ("batchtopk", "topk")
    ]
    for row in rows:
        assert positive(row["bytes_per_token"], row["l0_mean"], row["nmse"], row["nmse_stderr"], row["fvu"])
        assert math.isfinite(row["ce_degradation"]) and positive(row["ce_degradation_stderr"])
    size = {row["dtype"]: row["bytes_per_token"] for row in rows}
    assert size["int8"] < size["float16"]
    assert json.loads((tmp_path / "storage_study.json").read_text()) == rows
    assert out.count("| int8 |") == 2 and "+ sae eval" in out


def test_batchtopk_study(capsys, tiny_model, tmp_path):
    out_dir = str(tmp_path / "study")
    batchtopk_study.main(["train", "--tiny", "--model", tiny_model[0], "--out", out_dir])
    batchtopk_study.main(["eval", "--tiny", "--out", out_dir])
    capsys.readouterr()  # the report's own lines only, below
    out, r = run(batchtopk_study, capsys, "report", "--tiny", "--out", out_dir)
    tokens = int(batchtopk_study.TINY["snapshots"]), batchtopk_study.TINY["tokens"]
    assert sorted((row["tokens"], row["arch"]) for row in r["rows"]) == [
        (t, arch) for t in tokens for arch in ("batchtopk", "topk")
    ]
    for row in r["rows"]:
        assert positive(row["l0"], row["fvu"], row["fvu_stderr"], row["nmse_standardized"]), row
    assert [gap["tokens"] for gap in r["gaps"]] == list(tokens)
    assert all(math.isfinite(gap["fvu"]) and positive(gap["fvu_stderr"]) for gap in r["gaps"])
    docs = tmp_path / "study" / "docs"
    assert {p.name for p in docs.iterdir()} >= {"table.md", "gaps.json", "rows.json", "gap_vs_tokens.png"}
    assert out.count("| b | 8 |") == 4


def test_parity(capsys):
    out, r = run(parity, capsys, "--tiny")
    assert [(s["arch"], s["form"]) for s in r["summary"]] == [
        ("batchtopk", "batch"), ("batchtopk", "θ"), ("topk", ""), ("jumprelu", "")
    ]  # fmt: skip
    for row in r["rows"]:
        assert positive(row["fvu_ours"], row["fvu_ref"], row["l0_ours"], row["l0_ref"]), row
        assert row["fvu_ours"] < 1 and row["fvu_ref"] < 1, row  # both learned something in 8 steps
    for s in r["summary"]:
        assert math.isfinite(s["delta"]) and s["seeds"] == 2 and s["seed_spread"] >= 0
    assert "mean over seeds" in out and "warning" not in out  # ours' FVU here is its own held-out report's


def test_all(capsys, tiny_model):
    """`python -m benchmarks --tiny`: every script's report, the summary table of ratios, one JSON line."""
    out, r = run(all_benchmarks, capsys, "--tiny", "--model", tiny_model[0])
    assert set(r) >= {"harvest", "train", "latents", "select", "eval"}
    table = out[out.index("\nsummary on ") :].strip().splitlines()[2:-1]
    # harvest, 5 of train, codecs, inspect; 2 of select; one per eval row; one per SAELens arch
    assert len(table) == 8 + 2 * len(r["select"]["shapes"]) + len(r["eval"]["rows"]) + 2 * ("saelens" in r)
    for line in table:
        ratio = float(line[42:].split("x")[0])
        assert positive(ratio), line


def test_matryoshka_study(capsys, tiny_model, tmp_path):
    out_dir = str(tmp_path / "study")
    matryoshka_study.main(["probes", "--tiny", "--model", tiny_model[0], "--out", out_dir])
    probes = json.loads((tmp_path / "study" / "probes.json").read_text())
    assert [p["layer"] for p in probes] == [1] and 0 <= probes[0]["accuracy"] <= 1
    matryoshka_study.main(["train", "--tiny", "--model", tiny_model[0], "--out", out_dir])
    matryoshka_study.main(["eval", "--tiny", "--out", out_dir])
    capsys.readouterr()
    _, r = run(matryoshka_study, capsys, "report", "--tiny", "--out", out_dir)
    archs = sorted(row["arch"] for row in r["rows"] if row["arch"] != "prefix")
    assert archs == ["batchtopk", "jumprelu", "jumprelu", "matryoshka_batchtopk", "topk"]
    assert sum(row["arch"] == "prefix" for row in r["rows"]) == 4  # the reference's m/16 .. m/2 prefixes
    for row in r["rows"]:
        assert positive(row["l0_mean"], row["fvu"]) and math.isfinite(row["ce_degradation"]), row
    assert {p.name for p in (tmp_path / "study" / "docs").iterdir()} >= {"table.md", "rows.json", "metrics_vs_l0.png"}


def test_absorption_saebench(capsys, tiny_model):
    """Without SAEBench's venv (as in CI) --tiny runs our side and says SAEBench was not available."""
    out, r = run(absorption_saebench, capsys, "--tiny", "--model", tiny_model[0])
    assert r["saebench"] is None and "SAEBench not available" in out
    ours = r["ours"]
    assert ours["words"] == 200 and 0 <= ours["probe"]["accuracy"] <= 1 and ours["letters_scored"] >= 0


def test_stream_memory(capsys, tiny_model):
    out, r = run(stream_memory, capsys, "--tiny", "--model", tiny_model[0])
    assert [row["window_chunks"] for row in r] == list(stream_memory.TINY["windows"])
    assert all(positive(row["peak_rss_mib"], row["seconds"]) for row in r)


@pytest.fixture(scope="module")
def tiny_cache(tiny_model, tmp_path_factory) -> str:
    """A cache of the tiny model's layer 1: 8 chunks of 1,024 rows, the last held out."""
    root = tmp_path_factory.mktemp("peer") / "caches"
    out = sae_cli.sae("harvest", "--model", tiny_model[0], "--layer", "1", "--tokens", "8192", "--chunk-contexts", "8",
                      "--cache-dir", str(root), in_process=True)  # fmt: skip
    return out.split()[-1]


def test_peer_compare_rows_are_the_batches_ours_steps_on(tiny_cache, tmp_path):
    sizes = SimpleNamespace(k=8, dict_size=128, tokens="2048", batch_size=256, lr=3e-4)
    cfg = peer_compare.our_config(tiny_cache, tmp_path, sizes)
    seen = []
    run_training(cfg, cfg.cache, on_batch=lambda state, batch: seen.append(batch[1].clone()) or batch)
    assert len(seen) == 8 and torch.equal(peer_compare.training_rows(cfg), torch.cat(seen))


def test_peer_compare(capsys, tiny_cache, tmp_path):
    """Ours, SAELens's and sparsify's SAEs on the same rows: the comparison's table has a row of figures for each."""
    pytest.importorskip("sae_lens")
    pytest.importorskip("sparsify")
    capsys.readouterr()  # the harvest's lines
    out, r = run(peer_compare, capsys, "--tiny", "--cache", tiny_cache, "--out", str(tmp_path))
    assert r["tokens"] == int(peer_compare.TINY["tokens"])
    figure = r"(-?\d+\.\d+) ± (\d+\.\d+)"
    table = re.findall(rf"^(\S+)\s+{figure}\s+{figure}\s+{figure}\s+\d+\.\d%$", out, re.MULTILINE)
    assert sorted(row[0] for row in table) == sorted(row["name"] for row in r["rows"])
    assert sorted(row["format"] for row in r["rows"]) == ["ours", "saelens", "sparsify"]
    for name, l0, _, nmse, _, ce, _ in table:
        assert positive(float(l0), float(nmse)) and math.isfinite(float(ce)), name


def test_step(capsys):
    out, r = run(step, capsys, "--tiny", "--contend")
    assert [(row["shape"], row["arch"]) for row in r] == [("tiny", arch) for arch in step.ARCHS]
    for row in r:
        assert (row["d"], row["m"], row["k"], row["B"]) == step.TINY["tiny"]
        assert positive(row["step_ms"], row["matmul_ms"], row["kernel_ms"], row["reference_ms"], row["tok_s"])
        assert positive(row["contended_step_ms"], row["contended_matmul_ms"])
        ops = row["ops"]
        assert ops and all(op["calls"] >= 1 and op["self_ms_per_step"] >= 0 for op in ops)
        assert 0 < sum(op["share"] for op in ops) <= 1 + 1e-9
    assert "| d 64, m 512, B 256 | batchtopk |" in out and "beside one single-threaded job" in out
