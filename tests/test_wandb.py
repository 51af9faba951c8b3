"""`sae train --wandb` with the real wandb package in offline mode: what the run file holds is what
metrics.jsonl and cfg.json say."""

import json
import struct
import time
import zlib
from pathlib import Path

import pytest

from sae.train.config import TrainConfig
from sae.train.trainer import run_training
from tests.synthetic import planted_acts, write_cache

wandb = pytest.importorskip("wandb")


def wandb_records(path: Path):
    """The protobuf records of an offline run file (run-*.wandb): wandb's log format, a 7-byte header
    then 32 KiB blocks of records, each [crc32, length, kind] + data, split across blocks as FIRST /
    MIDDLE / LAST (kind 2/3/4) or whole (FULL, 1). wandb 0.31 has no Python reader of its own; every
    record's checksum is checked, so a misread cannot pass silently."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        body = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) == crc
        parts, pos = parts + body, pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def finished_records(path: Path, timeout_s: float = 30.0) -> list:
    """The run file's records once wandb's service process has written its last, the exit record: it
    writes the file on its own, and twice in some 40 runs of this test it was read before it held even
    the run record."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(path))
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def items(update) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}


def test_an_offline_wandb_run_records_the_config_and_every_logged_metric(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cache = write_cache(tmp_path / "caches", planted_acts(8 * 256, 32, 64, 4), ctx_len=16, chunk_contexts=16)
    cfg = TrainConfig(
        arch=("batchtopk", "topk"), k=(4,), dict_size=(64,), batch_size=64, log_every=7, dead_tokens=128,
        out=tmp_path / "runs", wandb="sae-tests",
    )  # fmt: skip
    run_dirs = run_training(cfg, cache)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = finished_records(run_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = items(run.config.update)
    assert config["arch"] == ["batchtopk", "topk"] and config["runs"] == [d.name for d in run_dirs]
    assert config["k"] == [4] and config["dict_size"] == [64] and config["batch_size"] == 64
    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    for run_dir in run_dirs:
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][:-1]
        assert [h["_step"] for h in history] == [m["step"] for m in logged] == [7, 14, 21, 28]
        for h, m in zip(history, logged, strict=True):
            for key in ("loss", "mse", "l0", "dead_frac", "aux", "tokens"):
                assert h[f"{run_dir.name}/{key}"] == m[key], key  # the same numbers, exactly
        summary = {}
        for r in records:
            if r.WhichOneof("record_type") == "summary":
                summary.update(items(r.summary.update))
        heldout = json.loads((run_dir / "cfg.json").read_text())["heldout"]
        assert summary[f"{run_dir.name}/heldout_fvu"] == heldout["fvu"]
        assert summary[f"{run_dir.name}/heldout_l0"] == heldout["l0"] and summary[f"{run_dir.name}/dead_frac"] >= 0
