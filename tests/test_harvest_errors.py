"""Every bad input gets one clear line: the message is checked, not just the exception type."""

import subprocess
import sys

import pytest
import torch

from sae.errors import UserError
from sae.harvest.config import HarvestConfig
from sae.harvest.harvest import harvest
from tests.test_harvest import small_config


def test_unknown_model_path(sample_parquet, tmp_path):
    with pytest.raises(UserError, match="does not exist|cannot load model 'no/such-model-here'"):
        harvest(small_config("no/such-model-here", sample_parquet, tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a transformers model directory"):
        harvest(small_config(tmp_path / "empty", sample_parquet, tmp_path))


def test_layer_out_of_range_names_the_valid_range(tiny_gpt2, sample_parquet, tmp_path):
    with pytest.raises(UserError, match=r"layer 3 out of range: this model has layers 0..2"):
        harvest(small_config(tiny_gpt2, sample_parquet, tmp_path, layers=(1, 3)))


def test_unknown_site_and_other_config_values():
    with pytest.raises(UserError, match="unknown site 'resid_mid'; choose one of resid_pre, resid_post"):
        HarvestConfig(site="resid_mid")
    with pytest.raises(UserError, match="unknown codec 'brotli'"):
        HarvestConfig(codec="brotli")
    with pytest.raises(UserError, match="ctx_len must be positive"):
        HarvestConfig(ctx_len=0)


EMPTY_FILES = {  # every supported local format: no documents at all, or only empty ones
    "empty.parquet": None, "empty.jsonl": "", "empty.json": "[]", "empty.txt": "", "empty.csv": "text\n",
    "blank.parquet": None, "blank.jsonl": '{"text": ""}\n{"text": "  "}\n', "blank.json": '[{"text": ""}]',
    "blank.txt": "\n\n", "blank.csv": 'text\n""\n"  "\n',
}  # fmt: skip


@pytest.mark.parametrize("name", list(EMPTY_FILES))
def test_empty_datasets_are_one_line_errors_and_leave_no_cache(tiny_gpt2, tmp_path, name):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"text": pa.array([] if name.startswith("empty") else ["", "  "], pa.string())}), path)
    else:
        path.write_text(EMPTY_FILES[name])
    message = "is empty: it has no documents" if name.startswith("empty") else "yielded no complete context of 32"
    with pytest.raises(UserError, match=message):
        harvest(small_config(tiny_gpt2, path, tmp_path / "caches"))
    assert not (tmp_path / "caches").exists() or not any((tmp_path / "caches").iterdir())


def test_missing_dataset_or_column(tiny_gpt2, sample_parquet, tmp_path):
    with pytest.raises(UserError, match="has no column 'body'"):
        harvest(small_config(tiny_gpt2, sample_parquet, tmp_path, text_column="body"))
    with pytest.raises(UserError, match="dataset file .*missing.parquet does not exist"):
        harvest(small_config(tiny_gpt2, tmp_path / "missing.parquet", tmp_path))


def test_an_unreachable_hub_fails_within_seconds_in_one_line(tmp_path):
    """Without the quick look at the hub, from_pretrained retried for ≈ 50 s before failing."""
    import os
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path)}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "sae", "harvest", "--model", "gpt2", "--tokens", "1000", "--cache-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1 and time.monotonic() - start < 40
    assert done.stderr.strip().splitlines() == [
        "error: cannot load model 'gpt2': the Hugging Face hub is unreachable (ConnectError) and the model is not "
        "in the local cache; connect, or download it where there is a network"
    ]


def test_non_finite_activations_commit_nothing(tiny_gpt2, sample_parquet, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e6)  # residual norms beyond float16's 65504
    model.save_pretrained(tmp_path / "huge")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "huge" / name).write_bytes((tiny_gpt2 / name).read_bytes())
    with pytest.raises(UserError, match=r"non-finite activations \(NaN/inf\) at layer 1 in contexts 0..15"):
        harvest(small_config(tmp_path / "huge", sample_parquet, tmp_path, dtype="float16"))


def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "from sae.cli import main; main()", "harvest", "--site", "resid_mid"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: unknown site 'resid_mid'; choose one of resid_pre, resid_post"
    ]
