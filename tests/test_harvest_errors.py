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


def test_empty_dataset(tiny_gpt2, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array(["", "  "], pa.string())}), empty)
    with pytest.raises(UserError, match="yielded no complete context of 32 tokens"):
        harvest(small_config(tiny_gpt2, empty, tmp_path))
    with pytest.raises(UserError, match="has no column 'body'"):
        harvest(small_config(tiny_gpt2, empty, tmp_path, text_column="body"))
    with pytest.raises(UserError, match="dataset file .*missing.parquet does not exist"):
        harvest(small_config(tiny_gpt2, tmp_path / "missing.parquet", tmp_path))


def test_non_finite_activations_commit_nothing(tiny_gpt2, sample_parquet, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e6)  # residual norms beyond float16's 65504
    model.save_pretrained(tmp_path / "huge")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "huge" / name).write_bytes((tiny_gpt2 / name).read_bytes())
    with pytest.raises(UserError, match=r"non-finite activations \(NaN/inf\) at layer 1 in contexts 0..15"):
        harvest(small_config(tmp_path / "huge", sample_parquet, tmp_path))


def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "from sae.cli import main; main()", "harvest", "--site", "resid_mid"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: unknown site 'resid_mid'; choose one of resid_pre, resid_post"
    ]
