"""Caches on object storage, against a real S3 API: moto's server on 127.0.0.1, not a mock of boto calls.

Harvest to s3://, SIGKILL, resume (the stale lock of this host is taken over): the same bytes as an
uninterrupted local harvest; train and evaluate from it; `sae cache verify` names a corrupt object;
the lock is a conditional write; bad locations are one-line errors that write nothing.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sae.cache.location import as_location
from sae.cache.lock import LOCK_NAME, writer_lock
from sae.cache.store import open_cache
from sae.errors import UserError
from sae.harvest.harvest import harvest
from tests.test_cli import run_sae
from tests.test_harvest import arrays, small_config

pytest.importorskip("obstore")
BUCKET = "caches"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free loopback port, with a bucket; the AWS_* variables pointing at it."""
    boto3 = pytest.importorskip("boto3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    process = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
    }  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and process.poll() is None, "moto_server did not start"
            time.sleep(0.1)
    boto3.client("s3", endpoint_url=endpoint, **_boto_credentials(env)).create_bucket(Bucket=BUCKET)
    yield env
    process.terminate()
    process.wait()
    log.close()


def _boto_credentials(env: dict) -> dict:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_REGION"],
    }  # fmt: skip


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """An empty s3:// prefix of its own for each test, with the environment set for obstore."""
    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    return f"s3://{BUCKET}/{request.node.name[:40]}-{os.getpid()}"


N_CONTEXTS = 60
SCRIPT = """
import sys
from sae.harvest.harvest import harvest
from tests.test_harvest import small_config
harvest(small_config(sys.argv[1], sys.argv[2], sys.argv[3], tokens=32 * {n}, chunk_contexts=2, batch_contexts=2))
"""


def committed(url: str) -> int:
    raw = as_location(url).read("zarr.json") if as_location(url).exists("zarr.json") else None
    return json.loads(raw)["attributes"].get("sae_cache", {}).get("n_contexts", 0) if raw else 0


def test_harvest_to_s3_killed_and_resumed_equals_a_local_harvest(tiny_llama, sample_parquet, s3, tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", SCRIPT.format(n=N_CONTEXTS), str(tiny_llama), str(sample_parquet), s3],
        cwd=Path(__file__).parent.parent, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    cache_url = None
    while child.poll() is None and time.monotonic() < deadline:
        names = as_location(s3).children()
        if names and committed(cache_url := f"{s3}/{names[0]}") >= 6:
            break
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = committed(cache_url)
    assert child.returncode == -signal.SIGKILL and 6 <= killed_at < N_CONTEXTS, "the kill must land mid-way"
    assert as_location(cache_url).exists(LOCK_NAME)  # stale: the rerun takes it over

    cfg = dict(tokens=32 * N_CONTEXTS, chunk_contexts=2, batch_contexts=2)
    resumed = harvest(small_config(tiny_llama, sample_parquet, s3, **cfg))
    local = harvest(small_config(tiny_llama, sample_parquet, tmp_path, **cfg))
    assert resumed == cache_url and not as_location(cache_url).exists(LOCK_NAME)
    a, b = arrays(resumed), arrays(local)
    assert len(b["tokens"]) == N_CONTEXTS
    for name in b:
        np.testing.assert_array_equal(a[name], b[name])
    meta_a, meta_b = open_cache(resumed).meta, open_cache(local).meta
    for meta in (meta_a, meta_b):
        for volatile in ("created", "updated", "harvest_config"):  # times, and the cache_dir asked for
            meta.pop(volatile)
    assert meta_a == meta_b
    assert open_cache(resumed).group["acts/1"].shape == open_cache(local).group["acts/1"].shape


@pytest.fixture
def s3_cache(tiny_gpt2, sample_parquet, s3) -> str:
    return harvest(small_config(tiny_gpt2, sample_parquet, s3, tokens=32 * 64, chunk_contexts=8))


def test_train_and_eval_read_an_s3_cache_and_verify_names_a_corrupt_object(s3_cache, tmp_path, monkeypatch, capsys):
    from sae.evaluate.config import EvalConfig
    from sae.evaluate.evaluate import evaluate_runs
    from sae.train.config import TrainConfig
    from sae.train.trainer import run_training

    cfg = TrainConfig(arch=("batchtopk",), k=(4,), dict_size=(64,), batch_size=64, out=tmp_path / "runs")
    (run_dir,) = run_training(cfg, s3_cache)
    record = json.loads((run_dir / "cfg.json").read_text())
    assert record["cache"]["path"] == s3_cache and record["heldout"]["rows"] == 8 * 32
    (eval_json,) = evaluate_runs([run_dir], EvalConfig(tokens=8 * 32, batch_size=4, device="cpu"))
    assert json.loads(eval_json.read_text())["run"]["cache_path"] == s3_cache

    code, _, err = run_sae(monkeypatch, capsys, "cache", "verify", s3_cache)
    assert code == 0 and "all good" in err
    code, out, _ = run_sae(monkeypatch, capsys, "cache", "info", "--json", s3_cache)
    assert code == 0 and json.loads(out)["size_bytes"] > 64 * 32 * 32 / 1.5  # compressed int8 rows
    import obstore

    obstore.put(as_location(s3_cache).store, "acts/1/c/3/0", b"garbage")
    code, _, err = run_sae(monkeypatch, capsys, "cache", "verify", s3_cache)
    assert code == 1 and f"{s3_cache}/acts/1/c/3/0" in err
    assert err.strip().splitlines()[-1] == f"error: 1 of 8 chunks are bad in {s3_cache}"


def test_the_lock_is_a_conditional_write(s3):
    location = as_location(f"{s3}/cache")
    with writer_lock(location):
        holder = json.loads(location.read(LOCK_NAME))
        assert holder["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"cache {location} is locked by a live writer \\(pid {os.getpid()}"):
            with writer_lock(location):
                pass
        assert not location.create(LOCK_NAME, b"another writer")  # If-None-Match: the store refuses
        stale = json.dumps({**holder, "pid": 2**22 + 7}).encode()  # no such pid: a stale lock of this host
        assert not location.replace(LOCK_NAME, b"x", expected=stale)  # If-Match an object that is not there
    assert not location.exists(LOCK_NAME)


@pytest.mark.parametrize(
    "where, message",
    [
        (
            "ftp://host/caches",
            "unknown location scheme 'ftp://' in ftp://host/caches; use a local path, s3://, gs:// or az://",
        ),
        ("s3://no-such-bucket-here/caches", "cannot access s3://no-such-bucket-here/caches: its bucket does not exist"),
    ],
)
def test_bad_locations_are_one_line_errors_and_write_nothing(s3, where, message, monkeypatch, capsys, tmp_path):
    code, out, err = run_sae(monkeypatch, capsys, "cache", "ls", "--cache-dir", where)
    assert code == 1 and out == "" and err.strip().splitlines() == [f"error: {message}"]
    monkeypatch.chdir(tmp_path)  # a harvest fails before it loads the model, and leaves nothing behind
    code, out, err = run_sae(monkeypatch, capsys, "harvest", "--cache-dir", where, "--tokens", "1e3")
    assert code == 1 and out == "" and err.strip().splitlines() == [f"error: {message}"]
    assert list(tmp_path.iterdir()) == []


def test_missing_credentials_and_missing_obstore(s3, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws/credentials either
    code, _, err = run_sae(monkeypatch, capsys, "cache", "ls", "--cache-dir", s3)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: cannot access {s3}: no credentials found (set AWS_ACCESS_KEY_ID")
    monkeypatch.setitem(sys.modules, "obstore.store", None)  # as if obstore were not installed
    code, _, err = run_sae(monkeypatch, capsys, "cache", "ls", "--cache-dir", s3)
    assert code == 1 and err.strip() == "error: s3:// locations need obstore: pip install 'sae[s3]'"


def test_an_http_endpoint_without_allow_http_says_what_to_set(s3, monkeypatch, capsys):
    monkeypatch.delenv("AWS_ALLOW_HTTP")
    code, _, err = run_sae(monkeypatch, capsys, "cache", "ls", "--cache-dir", s3)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: cannot access {s3}: ") and "an http:// endpoint needs AWS_ALLOW_HTTP=true" in err
