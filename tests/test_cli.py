"""The `sae` command as a user runs it: results on stdout, one-line errors on stderr, exit codes."""

import json
import sys
import time

import pytest

from sae.cache.store import chunk_file
from sae.cli import main


def run_sae(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["sae", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_harvest_then_cache_commands(monkeypatch, capsys, tiny_gpt2, sample_parquet, tmp_path):
    code, out, _ = run_sae(
        monkeypatch, capsys, "harvest", "--model", str(tiny_gpt2), "--dataset", str(sample_parquet),
        "--layer", "0,2", "--ctx-len", "32", "--tokens", "1.28e3", "--chunk-contexts", "16", "--device", "cpu",
        "--cache-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 0
    path = out.strip()
    code, out, _ = run_sae(monkeypatch, capsys, "cache", "info", "--json", path)
    info = json.loads(out)
    assert code == 0 and info["layers"] == [0, 2] and info["rows"] == 1280 and info["path"] == path
    code, _, err = run_sae(monkeypatch, capsys, "cache", "ls", "--cache-dir", str(tmp_path))
    assert code == 0 and "1,280" in err
    code, _, err = run_sae(monkeypatch, capsys, "cache", "verify", path)
    assert code == 0 and "all good" in err
    code, out, _ = run_sae(monkeypatch, capsys, "cache", "convert", path, "--dtype", "float16")
    converted = json.loads(run_sae(monkeypatch, capsys, "cache", "info", "--json", out.strip())[1])
    assert code == 0 and converted["dtype"] == "float16" and converted["rows"] == 1280
    code, _, err = run_sae(monkeypatch, capsys, "cache", "convert", path, "--dtype", "int4")
    assert code == 1 and err.startswith("error: unknown storage dtype 'int4'")

    chunk_file(tmp_path / path.split("/")[-1], "acts/2", 1).write_bytes(b"garbage")
    code, _, err = run_sae(monkeypatch, capsys, "cache", "verify", path)
    assert code == 1
    assert "acts/2/c/1/0" in err and err.strip().splitlines()[-1] == f"error: 1 of 3 chunks are bad in {path}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["cache", "info", "/nonexistent"], "error: /nonexistent is not an activation cache"),
        (["cache", "unlock", "/tmp"], "error: /tmp is not locked"),
        (["harvest", "--tokens", "many"], "error: expected a count like 1e6, got 'many'"),
        (["harvest", "--config", "/no/pipeline.toml"], "error: config file /no/pipeline.toml does not exist"),
    ],
)
def test_bad_input_is_one_line(monkeypatch, capsys, args, message):
    code, out, err = run_sae(monkeypatch, capsys, *args)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith(message)


def test_without_a_terminal_progress_is_plain_lines_never_cut(tmp_path):
    """stderr to a file (CI, nohup): a line per task at a steady interval with rate, ETA and every
    SAE's loss, however long, instead of one bar cut to 80 columns at the end."""
    import os
    import subprocess

    from tests.synthetic import planted_acts, write_cache

    cache = write_cache(tmp_path / "caches", planted_acts(8 * 256, 32, 64, 4), ctx_len=16, chunk_contexts=16)
    args = ["train", "--cache", str(cache), "--arch", "batchtopk,topk", "--k", "4", "--dict-size", "64"]
    args += ["--batch-size", "64", "--log-every", "2", "--out", str(tmp_path / "runs")]
    env = {**os.environ, "SAE_PROGRESS_INTERVAL": "0.05"}
    done = subprocess.run([sys.executable, "-m", "sae", *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) >= 2 and all(line.startswith("train 2 SAE(s): ") for line in lines)
    last = lines[-1]
    assert "1,792/1,792 tok (100%)" in last and "tok/s" in last and "ETA" in last and len(last) > 120
    assert "batchtopk_k4_m64: loss" in last and "topk_k4_m64: loss" in last


def test_stages_running_at_once_share_one_display_and_a_finished_stage_is_said_once(monkeypatch, capsys):
    """`sae run`'s harvest thread and its training: rich draws one live display at a time, so they share
    one; in plain lines the finished harvest is not repeated beside the training's every interval."""
    from sae import progress

    monkeypatch.setenv("SAE_PROGRESS_INTERVAL", "0.02")
    with progress.shared_progress("tok") as shared:
        with progress.make_progress("tok") as harvest:
            harvest.update(harvest.add_task("harvest", total=10, status=""), completed=10)
        with progress.make_progress("tok") as train:
            task = train.add_task("train", total=10, status="")
            time.sleep(0.2)  # several intervals
            train.update(task, completed=10)
    assert harvest is train is shared
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines].count("harvest") == 1 and len(lines) >= 4
    assert lines[-1].startswith("train: 10/10 tok (100%)")
