"""`sae inspect` as a function: the run and its cache, the LM's token effects, the streaming pass,
then latents.json and the page (another library's SAE too, over a cache of its site). The LM is loaded only for its tokenizer and unembedding, and
dropped before the pass; the pass itself never runs it (the cache holds the tokens)."""

import json
from pathlib import Path

import numpy as np
import torch

from sae.cache.store import Cache, default_cache_root
from sae.commands import harvest_command_line
from sae.config import build_config
from sae.device import keep_freed_memory, resolve_device
from sae.errors import UserError
from sae.harvest.config import HarvestConfig
from sae.inspect.config import InspectConfig
from sae.inspect.effects import final_norm, nearest_latents, norm_gain, token_effects, unembedding
from sae.inspect.latents import DEFINITIONS, FORMAT, VERSION, Vocab, latent_records
from sae.inspect.page import write_page
from sae.inspect.scan import plan_rows, scan
from sae.train.rundir import INSPECT, Run, load_sae, read_run
from sae.versions import library_versions

JSON_NAME = "latents.json"


def output_dir(run: Run, cfg: InspectConfig) -> Path:
    return Path(cfg.out) if cfg.out is not None else run.path / INSPECT


def read_inspected(run_dir: Path, cfg: InspectConfig) -> Run:
    """The run and a cache of its rows: its training cache, or for another library's SAE a cache of its
    model's residual stream at its site (else one line with the `sae harvest` that makes one)."""
    run = read_run(run_dir, cfg.cache, cfg.model, cfg.site, cfg.layer)
    if run.cache is None and run.imported is None:
        harvest = build_config(HarvestConfig, run.cfg["stream"]["harvest_config"], {}, f"{run.path} stream")
        raise UserError(
            f"run {run.path} was trained from a stream it did not keep, and sae inspect reads rows from a cache: "
            f"make its rows with `{harvest_command_line(harvest)}` and pass --cache (or train with --keep-cache)"
        )
    if run.cache is None:
        spec = run.spec
        harvest = HarvestConfig(model=spec["model"], layers=(run.layer,), site=spec["site"], ctx_len=spec["ctx_len"])
        raise UserError(
            f"run {run.path}: sae inspect reads rows of {spec['model']} {spec['site']} layer {run.layer} from a cache, "
            f"and there is none in {cfg.cache or default_cache_root(None).url}; make one with `{harvest_command_line(harvest)}`"
        )
    return run


def check_source(run: Run, cfg: InspectConfig) -> list[tuple[int, int]]:
    """The (chunk, contexts) plan of the pass, or a one-line error."""
    cache = run.cache
    if cfg.tokens is None and run.imported is not None:  # rows it never trained on: the cache's last chunk
        full = cache.n_contexts // cache.chunk_contexts
        return plan_rows(cache, list(range(max(full - 1, 0), cache.n_chunks)), None)
    if cfg.tokens is None:
        chunks = run.cfg.get("heldout", {}).get("chunks") or []
        if not chunks:
            raise UserError(f"run {run.path} has no held-out chunks; read the cache's first rows with --tokens N")
        return plan_rows(cache, chunks, None)
    if cfg.tokens < cache.ctx_len:
        raise UserError(f"--tokens {cfg.tokens} is less than one context of {cache.ctx_len} tokens; raise --tokens")
    if cfg.tokens > cache.rows:
        raise UserError(
            f"--tokens {cfg.tokens:,} exceeds the {cache.rows:,} rows of cache {cache.path}; lower --tokens"
        )
    return plan_rows(cache, [], cfg.tokens)


def token_reader(cache: Cache):
    """tokens_of(rows): the token ids of cache rows (any shape), each chunk's tokens read once."""
    chunks: dict[int, np.ndarray] = {}

    def tokens_of(rows: np.ndarray) -> np.ndarray:
        ids, chunk_of = np.zeros(rows.shape, dtype=np.int64), rows // cache.chunk_rows
        for chunk in np.unique(chunk_of).tolist():
            if chunk not in chunks:
                chunks[chunk] = cache.read_tokens(chunk).reshape(-1)
            here = chunk_of == chunk
            ids[here] = chunks[chunk][rows[here] - chunk * cache.chunk_rows]
        return ids

    return tokens_of


def lm_effects(run: Run, W_dec_MD: torch.Tensor, cfg: InspectConfig, device: torch.device):
    """(tokenizer, (promoted, suppressed)) from the cache's LM; the model is freed on return."""
    from sae.harvest.model import load_model

    spec = run.cache.spec
    try:
        loaded = load_model(spec["model"], spec["model_dtype"], str(device))
    except UserError as e:
        raise UserError(f"{e}; or inspect without the LM (token ids, no token effects) with --no-lm") from None
    if loaded.d_model != W_dec_MD.shape[1]:
        raise UserError(
            f"run {run.path}: the SAE has d_in={W_dec_MD.shape[1]} but {spec['model']} has d_model={loaded.d_model}"
        )
    if not cfg.effects:
        return loaded.tokenizer, None
    gain_D = norm_gain(final_norm(loaded.model), loaded.d_model, device)
    return loaded.tokenizer, token_effects(
        W_dec_MD, unembedding(loaded.model, len(loaded.tokenizer)), gain_D, cfg.effects
    )


def header(run: Run, cfg: InspectConfig, plan: list[tuple[int, int]], rows_gated: int) -> dict:
    cache, T = run.cache, run.cache.ctx_len
    ranges = []
    for chunk, contexts in plan:
        start = chunk * cache.chunk_rows
        if ranges and ranges[-1][1] == start:
            ranges[-1][1] = start + contexts * T
        else:
            ranges.append([start, start + contexts * T])
    return {
        "format": FORMAT,
        "version": VERSION,
        "run": {
            "dir": str(run.path), "name": run.imported.name if run.imported else run.path.name,
            "arch": run.cfg["training_architecture"], "k": run.cfg["sae"]["k"], "dict_size": run.cfg["d_sae"],
            "theta": run.cfg.get("theta"), "weights_sha256": run.weights_sha256(),
            **({"format": run.imported.format, "source": run.cfg["source"]} if run.imported else {}),
        },
        "cache": {"path": str(cache.path), "key": cache.key, "layer": run.layer, "model": cache.spec["model"], "ctx_len": T},
        "source": {
            "kind": "heldout" if cfg.tokens is None else "first_rows", "chunks": [chunk for chunk, _ in plan],
            "row_ranges": ranges, "rows": sum(stop - start for start, stop in ranges), "rows_gated": rows_gated,
        },
        "config": cfg.pass_record(),
        "window": {"before": cfg.window_before, "after": cfg.window_after},
        "definitions": DEFINITIONS,
        "versions": library_versions(),
    }  # fmt: skip


def inspect_data(run: Run, cfg: InspectConfig) -> dict:
    """latents.json's content for a run (the whole computation)."""
    plan = check_source(run, cfg)
    device = resolve_device(cfg.device)
    keep_freed_memory(device)
    sae = load_sae(run, device)
    tokenizer, effects = lm_effects(run, sae.W_dec.detach(), cfg, device) if cfg.lm else (None, None)
    neighbours = nearest_latents(sae.W_dec.detach(), cfg.neighbours)
    result = scan(sae, run.cache, run.layer, plan, cfg, device)
    latents = latent_records(
        result, cfg, run.cache.ctx_len, token_reader(run.cache), Vocab(tokenizer), effects, neighbours
    )
    return {**header(run, cfg, plan, result.rows_gated), "latents": latents}


def inspect_run(run_dir: Path, cfg: InspectConfig) -> Path:
    """Inspect a run: DIR/latents.json, DIR/latents.js and DIR/index.html; returns index.html's path."""
    run = read_inspected(run_dir, cfg)
    return write_page(output_dir(run, cfg), inspect_data(run, cfg))


def saved_or_new(run_dir: Path, cfg: InspectConfig, latent: int | None = None) -> dict:
    """latents.json of this run from cfg.out if it was made from these weights, cache and settings,
    else a new pass (written out too). A latent id out of range is refused before any work."""
    run = read_inspected(run_dir, cfg)
    m = run.cfg["d_sae"]
    if latent is not None and not 0 <= latent < m:
        raise UserError(f"latent {latent} out of range: run {run.path} has latents 0..{m - 1}")
    path = output_dir(run, cfg) / JSON_NAME
    if path.is_file():
        saved = json.loads(path.read_text())
        same = (
            saved.get("format") == FORMAT and saved.get("version") == VERSION
            and saved["run"]["weights_sha256"] == run.weights_sha256()
            and saved["cache"]["key"] == run.cache.key and saved["config"] == as_saved(cfg.pass_record())
        )  # fmt: skip
        if same:
            return saved
    data = inspect_data(run, cfg)
    write_page(output_dir(run, cfg), data)
    return data


def as_saved(record: dict) -> dict:
    """A record as it reads back from latents.json."""
    return json.loads(json.dumps(record))


def inspect_pipeline_runs(run_dirs: list[Path], cfg: InspectConfig) -> Path | None:
    """`sae run`'s inspection: the page of its BatchTopK run (else of its first run)."""
    if not run_dirs:
        return None
    archs = [json.loads((Path(d) / "cfg.json").read_text()).get("training_architecture") for d in run_dirs]
    run_dir = run_dirs[archs.index("batchtopk")] if "batchtopk" in archs else run_dirs[0]
    return inspect_run(Path(run_dir), cfg)
