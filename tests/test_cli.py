"""The `sae` command as a user runs it: results on stdout, one-line errors on stderr, exit codes."""

import json
import sys

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
