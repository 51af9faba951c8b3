"""`sae harvest` flags; each one overrides its twin in pipeline.toml [harvest]."""

from pathlib import Path

import typer

from sae.config import apply_storage_options, parse_count, parse_ints, stage_config
from sae.harvest.config import HarvestConfig

Opt = typer.Option


def harvest_command(
    model: str = Opt(None, help="HF hub id, local model dir, or smollm2-135m (embedded)."),
    layer: str = Opt(None, help="Block(s) to read, e.g. 8 or 6,8,10 (one forward pass for all)."),
    site: str = Opt(None, help="resid_pre (block input, the paper's site) or resid_post."),
    dataset: str = Opt(None, help="Hub id, parquet/jsonl/txt file, save_to_disk dir, or openwebtext-sample."),
    dataset_config: str = Opt(None, help="Hub dataset configuration name."),
    split: str = Opt(None, help="Dataset split."),
    text_column: str = Opt(None, help="Column holding the text."),
    seed: int = Opt(None, help="Seed of the document order."),
    ctx_len: int = Opt(None, help="Tokens per context."),
    packing: str = Opt(None, help="bos_per_doc (reference code) or bos_per_context."),
    tokens: str = Opt(None, help="Target tokens in the cache, e.g. 2e8; more than cached extends it."),
    batch_contexts: int = Opt(None, help="Contexts per forward pass."),
    model_dtype: str = Opt(None, help="float32, bfloat16 or float16 compute."),
    dtype: str = Opt(None, help="Storage dtype: float16, bfloat16, float32, int8 or float8_e4m3 (scaled)."),
    codec: str = Opt(None, help="Chunk compression, e.g. zstd:1, blosc-zstd:1:shuffle, none."),
    chunk_contexts: int = Opt(None, help="Contexts per stored chunk."),
    device: str = Opt(None, help="auto, cpu, cuda, cuda:1, ..."),
    cache_dir: str = Opt(
        None, help="Root of the caches, a path or s3://bucket/prefix (default: $SAE_CACHE_DIR, else ./caches)."
    ),
    config: Path = Opt(None, help="pipeline.toml to read (default: ./pipeline.toml if present)."),
) -> None:
    """Run the LM over text and write residual-stream activations to a zarr cache (resumable)."""
    from sae.harvest.harvest import harvest

    overrides = dict(
        model=model, layers=parse_ints(layer), site=site, dataset=dataset, dataset_config=dataset_config,
        dataset_split=split, text_column=text_column, seed=seed, ctx_len=ctx_len, packing=packing,
        tokens=parse_count(tokens), batch_contexts=batch_contexts, model_dtype=model_dtype, dtype=dtype,
        codec=codec, chunk_contexts=chunk_contexts, device=device, cache_dir=cache_dir,
    )  # fmt: skip
    cfg = stage_config(HarvestConfig, "harvest", config, overrides)
    apply_storage_options(config)
    path = harvest(cfg)
    print(path)  # stdout carries only the result, so scripts can capture it
