"""Training straight from the LM (--stream): a bounded window in memory that the trainer follows, the same
SAE as a --follow run on a cache of the same spec, resumed after a kill to the same weights."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae.cli import train_from_stream
from sae.config import to_jsonable
from sae.errors import UserError
from sae.harvest.config import HarvestConfig
from sae.harvest.harvest import harvest
from sae.stream import stream_harvest_config, stream_window, streaming, window_chunks
from sae.train.config import TrainConfig
from sae.train.rundir import WEIGHTS
from sae.train.trainer import run_training
from tests.test_cli import run_sae

CTX, CHUNK_CTX = 32, 8  # 256 rows a chunk
HARVEST = dict(layers=(1,), ctx_len=CTX, chunk_contexts=CHUNK_CTX, device="cpu")


@pytest.fixture
def sources(tiny_gpt2, sample_parquet, tmp_path) -> dict:
    return {"model": str(tiny_gpt2), "dataset": str(sample_parquet), "ctx_len": CTX, "chunk_contexts": CHUNK_CTX}


def config(out: Path, **fields) -> TrainConfig:
    base = dict(
        arch=("batchtopk", "topk"), k=(4,), dict_size=(64,), batch_size=128, buffer_chunks=2, loader_threads=2,
        tokens=256 * 12, layer=1, log_every=4, checkpoint_every=6, stream=True, device="cpu", out=out,
    )  # fmt: skip
    return TrainConfig(**{**base, **fields})


def weights(run_dirs: list[Path]) -> list[dict]:
    return [load_file(d / WEIGHTS) for d in run_dirs]


def assert_same_weights(a: list[Path], b: list[Path]) -> None:
    for wa, wb in zip(weights(a), weights(b), strict=True):
        assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_a_stream_trains_the_sae_a_follow_of_its_cache_would_and_stays_in_its_window(sources, tmp_path):
    cfg = config(tmp_path / "streamed")
    harvest_cfg = stream_harvest_config(None, sources, cfg)
    assert harvest_cfg.tokens == (12 + 1) * 256  # 12 chunks for the training tokens and one held out
    with streaming(harvest_cfg, stream_window(harvest_cfg, cfg), cfg.precision) as stream:
        streamed = run_training(
            cfg, stream.cache, window=stream.window, source={"harvest_config": to_jsonable(harvest_cfg)}
        )
    assert stream.window.size == window_chunks(harvest_cfg, cfg) == 1 + 4 + 2  # held out, sampled, a block
    assert 1 <= stream.window.peak <= stream.window.size
    record = json.loads((streamed[0] / "cfg.json").read_text())
    assert record["stream"]["harvest_config"]["tokens"] == harvest_cfg.tokens
    assert record["cache"]["path"].startswith("memory://") and record["heldout"]["chunks"] == [0]
    # the same rows from a cache on disk, followed (the first pass in harvest order): the same SAE
    cache = harvest(HarvestConfig(**{**sources, **HARVEST, "tokens": harvest_cfg.tokens, "cache_dir": str(tmp_path)}))
    followed = run_training(config(tmp_path / "followed", stream=False, follow=True), cache)
    assert_same_weights(streamed, followed)


def test_a_stream_killed_after_a_checkpoint_resumes_to_the_same_weights(sources, tmp_path):
    whole = train_from_stream(config(tmp_path / "whole"), None, sources, None)

    def killed(state, batch):
        if state.step >= 9:  # after the checkpoint of step 6, within the second block
            raise KeyboardInterrupt
        return batch

    cfg = config(tmp_path / "killed")
    harvest_cfg = stream_harvest_config(None, sources, cfg)
    source = {"harvest_config": to_jsonable(harvest_cfg)}
    with (
        pytest.raises(KeyboardInterrupt),
        streaming(harvest_cfg, stream_window(harvest_cfg, cfg), cfg.precision) as stream,
    ):
        run_training(cfg, stream.cache, window=stream.window, on_batch=killed, source=source)
    position = torch.load(sorted((tmp_path / "killed" / "topk_k4_m64").glob("checkpoint-*.pt"))[-1])["loader"][0]
    assert position["stream"]["chunk"] > 1  # the resumed stream skips the chunks already trained on
    resumed = train_from_stream(cfg, None, {}, tmp_path / "killed" / "topk_k4_m64")
    assert_same_weights(whole, resumed)


def test_a_stream_kept_on_disk_is_a_cache_the_next_stream_reuses(sources, tmp_path):
    """--keep-cache: the second stream's harvest finds its cache complete, and trains (checkpoints too) from it."""
    kept = {**sources, "cache_dir": str(tmp_path / "caches")}
    first = train_from_stream(config(tmp_path / "first", keep_cache=True), None, kept, None)
    (cache,) = (tmp_path / "caches").iterdir()
    written = {path: path.stat().st_mtime_ns for path in cache.rglob("*") if path.is_file()}
    again = train_from_stream(config(tmp_path / "again", keep_cache=True), None, kept, None)
    assert {path: path.stat().st_mtime_ns for path in cache.rglob("*") if path.is_file()} == written
    assert_same_weights(first, again)


def test_a_stream_run_without_its_cache_is_evaluated_on_the_text_after_the_stream(
    sources, tmp_path, monkeypatch, capsys
):
    """No cache on disk: `sae eval` holds out the documents after where the stream ended, as it would
    after the same rows' cache (the same contexts and scores); `sae inspect` says how to make that cache."""
    (run, _) = train_from_stream(config(tmp_path / "streamed"), None, sources, None)
    harvest_cfg = json.loads((run / "cfg.json").read_text())["stream"]["harvest_config"]
    evaluate = ["eval", str(run), "--tokens", "256", "--device", "cpu"]
    code, _, err = run_sae(monkeypatch, capsys, *evaluate)
    assert code == 0, err
    streamed = json.loads((run / "eval.json").read_text())
    assert streamed["eval_spec"]["start_doc"] > 0 and streamed["eval_spec"]["mean_ablation"] == "evaluation_contexts"
    code, _, err = run_sae(monkeypatch, capsys, "inspect", str(run), "--device", "cpu")
    assert code == 1 and "was trained from a stream it did not keep" in err and "sae harvest --model" in err
    cache = harvest(HarvestConfig(**{**harvest_cfg, "cache_dir": str(tmp_path / "caches")}))  # the same rows
    code, _, err = run_sae(monkeypatch, capsys, *evaluate, "--cache", cache)
    assert code == 0, err
    cached = json.loads((run / "eval.json").read_text())
    assert cached["eval_spec"]["tokens_sha256"] == streamed["eval_spec"]["tokens_sha256"]
    assert (cached["nmse"], cached["ce_spliced"], cached["l0_mean"]) == (
        streamed["nmse"],
        streamed["ce_spliced"],
        streamed["l0_mean"],
    )


def test_stream_settings_that_cannot_work_are_one_line_errors(sources, tmp_path, monkeypatch, capsys):
    with pytest.raises(UserError, match="--stream needs --tokens"):
        stream_harvest_config(None, sources, config(tmp_path, tokens=None))
    with pytest.raises(UserError, match=r"--stream-window 512 rows holds 2 chunks of 256; the trainer needs 5"):
        window_chunks(stream_harvest_config(None, sources, config(tmp_path)), config(tmp_path, stream_window=512))
    with pytest.raises(UserError, match="a stream is read once: epochs 2 needs --keep-cache"):
        config(tmp_path, epochs=2.0)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_sae(monkeypatch, capsys, "train", "--cache", str(tmp_path), "--model", "gpt2")
    assert code == 1 and err.strip() == "error: --model is a harvest setting: it applies to --stream only"
