"""Cache key, lock, verify and the errors a damaged or busy cache gives."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sae.cache.lock import LOCK_NAME, unlock, writer_lock
from sae.cache.spec import KEY_FIELDS, cache_key
from sae.cache.store import chunk_file, open_cache
from sae.cache.verify import describe, verify
from sae.errors import UserError
from sae.harvest.harvest import harvest
from tests.test_harvest import small_config

SPEC = {
    "model": "gpt2", "model_revision": "abc", "model_dtype": "float32", "site": "resid_pre", "layers": [8],
    "dataset": "Skylion007/openwebtext", "dataset_config": None, "dataset_split": "train",
    "dataset_revision": "unversioned", "text_column": "text", "seed": 0, "ctx_len": 128, "packing": "bos_per_doc",
    "bos_token_id": 50256, "dtype": "float16",
}  # fmt: skip


def test_equal_specs_share_a_key_and_every_key_field_changes_it():
    assert cache_key(SPEC) == cache_key(dict(reversed(list(SPEC.items()))))
    assert cache_key({**SPEC, "vocab_size": 50257}) == cache_key(SPEC)  # not a key field
    keys = {cache_key(SPEC)}
    for field in KEY_FIELDS:
        value = SPEC[field]
        changed = (
            value + [9] if isinstance(value, list) else (value or 0) + 1 if isinstance(value, int) else f"{value}x"
        )
        keys.add(cache_key({**SPEC, field: changed}))
    assert len(keys) == len(KEY_FIELDS) + 1


@pytest.fixture
def cache_path(tiny_gpt2, sample_parquet, tmp_path):
    return harvest(small_config(tiny_gpt2, sample_parquet, tmp_path))


def test_info_describes_the_format(cache_path):
    info = describe(open_cache(cache_path))
    assert info["layers"] == [1] and info["site"] == "resid_pre" and info["ctx_len"] == 32
    assert info["d_model"] == 32 and info["rows"] == 40 * 32 and info["dtype"] == "int8"  # the default
    import zarr

    group = zarr.open_group(cache_path, mode="r")  # plain zarr reads it, as the README says
    assert group[info["arrays"]["tokens"]].shape == (40, 32)
    assert group[info["arrays"]["acts"]["1"]].shape == (40 * 32, 32)
    assert group[info["arrays"]["scales"]["1"]].shape == (40 * 32,)  # int8's row scales
    json.dumps(info)


def test_verify_names_a_corrupt_and_a_missing_chunk(cache_path):
    assert all(problem is None for _, problem in verify(open_cache(cache_path)))
    corrupt = chunk_file(cache_path, "acts/1", 1)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    missing = chunk_file(cache_path, "tokens", 2)
    missing.unlink()
    problems = dict(verify(open_cache(cache_path)))
    assert problems[0] is None
    assert str(corrupt) in problems[1] and "corrupt chunk" in problems[1]
    assert str(missing) in problems[2] and "missing chunk" in problems[2]
    with pytest.raises(UserError, match="corrupt chunk .*acts/1/c/1/0"):
        open_cache(cache_path).read_acts(1, 1)


def test_a_live_writer_locks_the_cache(cache_path, tiny_gpt2, sample_parquet, tmp_path):
    with writer_lock(cache_path):
        with pytest.raises(UserError, match=f"locked by a live writer \\(pid {os.getpid()}"):
            harvest(small_config(tiny_gpt2, sample_parquet, tmp_path, tokens=32 * 80))
        with pytest.raises(UserError, match="live writer"):
            unlock(cache_path)
    assert not (Path(cache_path) / LOCK_NAME).exists()


def test_a_stale_lock_of_this_host_is_taken_over_and_one_of_another_host_is_named(
    cache_path, tiny_gpt2, sample_parquet, tmp_path, capsys
):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = {"pid": int(dead.stdout), "host": socket.gethostname(), "since": "earlier"}
    (Path(cache_path) / LOCK_NAME).write_text(json.dumps(lock))
    harvest(small_config(tiny_gpt2, sample_parquet, tmp_path, tokens=32 * 60))
    assert f"took over the stale lock of {cache_path}: its writer (pid {lock['pid']}, this host) is gone" in " ".join(
        capsys.readouterr().err.split()
    )
    assert open_cache(cache_path).n_contexts == 60 and not (Path(cache_path) / LOCK_NAME).exists()
    elsewhere = {**lock, "host": "another-host"}  # its pid cannot be checked from here
    (Path(cache_path) / LOCK_NAME).write_text(json.dumps(elsewhere))
    with pytest.raises(UserError, match="locked by a writer on another host .*if it is gone, run `sae cache unlock"):
        harvest(small_config(tiny_gpt2, sample_parquet, tmp_path, tokens=32 * 80))
    assert json.loads((Path(cache_path) / LOCK_NAME).read_text()) == elsewhere  # named, not broken
    unlock(cache_path)
    harvest(small_config(tiny_gpt2, sample_parquet, tmp_path, tokens=32 * 80))
    assert open_cache(cache_path).n_contexts == 80


def test_spec_mismatch_when_extending(cache_path, tiny_gpt2, sample_parquet, tmp_path):
    with pytest.raises(UserError, match="spec mismatch extending .*codec: cache has 'zstd:1', asked 'none'"):
        harvest(small_config(tiny_gpt2, sample_parquet, tmp_path, tokens=32 * 80, codec="none"))


def test_reader_sees_only_committed_rows(cache_path):
    cache = open_cache(cache_path)
    rows = sum(len(cache.read_acts(1, i)) for i in range(cache.n_chunks))
    assert rows == cache.rows == 40 * 32
    assert np.array_equal(cache.read_tokens(2), cache.group["tokens"][32:40])
