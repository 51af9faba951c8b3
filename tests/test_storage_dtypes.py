"""The scaled storage dtypes (int8, float8_e4m3): exact encode/decode arithmetic, bounded error, NaNs
kept visible, and every reader (harvest statistics, the loader on CPU and in its GPU form) seeing the
same rows."""

import numpy as np
import pytest
import torch

from sae.cache.codecs import StoredRows, decode_rows, dim_scale, encode_rows
from sae.cache.store import open_cache
from sae.harvest.harvest import harvest
from sae.train.gate import build_gate, kept_rows
from sae.train.loader import Loader
from tests.test_harvest import arrays, small_config


def residual_like(n: int = 512, d: int = 64, seed: int = 0) -> torch.Tensor:
    """Rows with two outlier dimensions 40× the rest and a few massive rows, as residual streams have."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x[:, [3, 17]] *= 40
    x[::50] *= 8
    return x


def test_int8_rounds_each_element_to_its_step_and_uses_the_full_range():
    x = residual_like()
    s_dim = dim_scale(x)
    stored = encode_rows(x, "int8", s_dim)
    assert stored.values_RD.dtype == torch.int8 and stored.scale_R.dtype == torch.float32
    assert (stored.values_RD.abs().amax(1) == 127).all()  # each row's largest |x/s_dim| is ±127
    step_RD = stored.scale_R[:, None] * s_dim  # one quantisation step per element
    error_RD = (decode_rows(stored, s_dim) - x).abs()
    assert (error_RD <= 0.5 * step_RD * (1 + 1e-5)).all()


def test_the_per_dimension_scale_is_what_makes_int8_accurate_here():
    x = residual_like()
    row_error = {}
    for name, s_dim in (("row only", None), ("row x dim", dim_scale(x))):
        x_hat = decode_rows(encode_rows(x, "int8", s_dim), s_dim)
        row_error[name] = float(((x_hat - x).norm(dim=1) / x.norm(dim=1)).median())
    assert row_error["row x dim"] < 0.5 * row_error["row only"] and row_error["row x dim"] < 0.01, row_error
    fp8 = decode_rows(encode_rows(x, "float8_e4m3"))
    assert float(((fp8 - x).norm(dim=1) / x.norm(dim=1)).median()) < 0.04  # 3 mantissa bits


def test_non_finite_rows_stay_non_finite_and_zero_rows_stay_zero():
    x = residual_like(8)
    x[2, 5], x[4, 0], x[6] = float("nan"), float("inf"), 0.0
    for dtype, s_dim in (("int8", dim_scale(x[[0, 1, 3, 5, 7]])), ("float8_e4m3", None)):
        x_hat = decode_rows(encode_rows(x, dtype, s_dim), s_dim)
        assert not torch.isfinite(x_hat[2]).all() and not torch.isfinite(x_hat[4]).all()  # the NaN check sees them
        assert (x_hat[6] == 0).all() and torch.isfinite(x_hat[[0, 1, 3, 5, 7]]).all()


@pytest.fixture(scope="module")
def caches(tiny_llama, tmp_path_factory, sample_texts):
    """The same 40 contexts harvested as float32, int8 and float8_e4m3."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("dtypes")
    data = root / "docs.parquet"
    pq.write_table(pa.table({"text": sample_texts[:40]}), data)
    return {
        dtype: harvest(small_config(tiny_llama, data, root, dtype=dtype))
        for dtype in ("float32", "int8", "float8_e4m3")
    }


@pytest.mark.parametrize("dtype, bound", [("int8", 0.02), ("float8_e4m3", 0.05)])
def test_a_scaled_harvest_stores_the_model_rows_within_its_error_and_counts_what_it_stored(caches, dtype, bound):
    exact, lossy = arrays(caches["float32"]), arrays(caches[dtype])
    np.testing.assert_array_equal(exact["tokens"], lossy["tokens"])
    x, x_hat = torch.from_numpy(exact["acts/1"]), torch.from_numpy(lossy["acts/1"])
    assert x_hat.dtype == torch.float32
    assert float(((x_hat - x).norm(dim=1) / x.norm(dim=1)).median()) < bound
    stats = open_cache(caches[dtype]).stats(1)  # statistics describe the stored rows, as for float16
    np.testing.assert_allclose(stats["mean_D"], x_hat.double().mean(0).numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats["mean_norm"], x_hat.double().norm(dim=1).mean().item(), rtol=1e-9)
    cache = open_cache(caches[dtype])
    stored = cache.read_stored(1, 0)
    assert stored.values_RD.element_size() == 1 and len(stored.scale_R) == cache.chunk_rows
    assert (cache.dim_scale(1) is not None) == (dtype == "int8")


def test_the_gpu_form_of_the_loader_decodes_to_the_cpu_form(caches):
    """On a GPU the loader moves int8 rows and their scales and decodes there; here both forms run on
    the CPU and must give the same floats, gate included."""
    cache = open_cache(caches["int8"])
    gate = build_gate(cache, 1, bos=True, first=True, norm_ratio=1.2)
    decoded = kept_rows(cache, 1, 1, gate, decode=True)
    compact = kept_rows(cache, 1, 1, gate, decode=False)
    assert compact.values_RD.dtype == torch.int8 and 0 < len(compact.values_RD) < cache.chunk_rows
    assert torch.equal(decode_rows(compact, cache.dim_scale(1)), decoded.values_RD)
    loader = Loader(cache, [1], [0, 1], 32, seed=0, gate=gate, buffer_chunks=2, threads=1)
    try:
        batch = next(loader)[1]
    finally:
        loader.close()
    rows = torch.cat([kept_rows(cache, 1, c, gate).values_RD for c in loader.block_chunks(0, 0)])
    assert batch.dtype == torch.float32 and all((row == rows).all(1).any() for row in batch)
    assert isinstance(compact, StoredRows)


def test_converting_the_float32_cache_re_encodes_the_same_harvest_and_a_half_conversion_is_refused(caches, tmp_path):
    """`sae cache convert` re-encodes what the model produced: float16 from the exact float32 rows is the
    rounding of those rows to the bit; int8 is within int8's error (its s_dim comes from the whole first
    chunk, where a harvest takes its first batch); stream positions and tokens are the source's."""
    import shutil

    from sae.cache.convert import convert
    from sae.cache.store import acts_name, chunk_file
    from sae.errors import UserError

    source = open_cache(caches["float32"])
    exact = arrays(caches["float32"])
    for dtype, median_bound in (("float16", 1e-3), ("int8", 0.02)):
        copy = open_cache(convert(caches["float32"], dtype, cache_root=tmp_path / "converted"))
        assert copy.spec == {**source.spec, "dtype": dtype} and copy.meta["converted_from"]["dtype"] == "float32"
        assert [copy.meta[k] for k in ("n_contexts", "resume", "stream_end")] == [
            source.meta[k] for k in ("n_contexts", "resume", "stream_end")
        ]
        rows = arrays(copy.path)
        np.testing.assert_array_equal(rows["tokens"], exact["tokens"])
        x, x_hat = torch.from_numpy(exact["acts/1"]), torch.from_numpy(rows["acts/1"]).float()
        if dtype == "float16":
            assert torch.equal(x_hat, x.half().float())
        assert 0 < float(((x_hat - x).norm(dim=1) / x.norm(dim=1)).median()) < median_bound
        np.testing.assert_allclose(copy.stats(1)["mean_D"], x_hat.double().mean(0).numpy(), rtol=1e-9, atol=1e-9)

    # A source chunk that cannot be read stops the conversion after the chunks before it; the copy
    # then has no stream position to give, so harvest and eval refuse it until convert is rerun.
    damaged = tmp_path / "damaged"
    shutil.copytree(source.path, damaged / source.location.name)
    chunk_file(damaged / source.location.name, acts_name(1), 1).unlink()
    with pytest.raises(UserError, match="missing chunk"):
        convert(damaged / source.location.name, "bfloat16")
    half = open_cache(next(p for p in damaged.iterdir() if p.name != source.location.name))
    assert half.n_contexts == source.chunk_contexts and half.meta["stream_end"] is None
    chunk_file(damaged / source.location.name, acts_name(1), 0).unlink()  # now nothing can be converted
    with pytest.raises(UserError, match="missing chunk"):
        convert(damaged / source.location.name, "float16")
    assert sorted(p.name for p in damaged.iterdir()) == sorted([source.location.name, half.location.name])
    with pytest.raises(UserError, match="conversion still under way"):
        made = source.meta["harvest_config"]
        harvest(small_config(made["model"], made["dataset"], damaged, dtype="bfloat16", tokens=32 * 80))
