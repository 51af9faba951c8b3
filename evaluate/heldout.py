"""The evaluation contexts: text the harvest never read, packed exactly as at harvest time.

The harvest reads documents in a seeded order and records where its token stream stopped
(`stream_end`). With the same dataset and order, every document after that point is unseen by the
cache, so the held-out set is "the same data, further on". Another dataset or split is allowed; the
same data read in another order, or from a document the harvest read, is refused.
"""

import hashlib
import itertools

import numpy as np

from sae.errors import UserError
from sae.evaluate.config import EvalConfig
from sae.harvest.text import DatasetSource, iter_contexts, iter_documents, iter_token_docs, open_dataset


def first_unread_doc(stream_end: dict) -> int:
    """The first document the harvest did not read: the one it stopped in is partly read."""
    return stream_end["doc"] + (1 if stream_end["offset"] > 0 else 0)


def _same_data(source: DatasetSource, config: str | None, split: str, spec: dict) -> bool:
    """Whether (source, config, split) holds the documents the cache was harvested from."""
    if source.revision != "unversioned":  # local data: compare content, not names
        if source.revision != spec["dataset_revision"]:
            return False
        return source.kind == "file" or split == spec["dataset_split"]  # a data file has one split
    return (source.location, config, split) == (spec["dataset"], spec["dataset_config"], spec["dataset_split"])


def eval_plan(cfg: EvalConfig, spec: dict, stream_end: dict, cache_path: str) -> tuple[dict, DatasetSource]:
    """Which documents, in which order, and how many tokens, and their resolved source (resolving
    hashes local data, so it is done once); raises if they overlap the cache.

    spec is the training cache's spec; fields cfg leaves as None are taken from it."""
    dataset = cfg.dataset if cfg.dataset is not None else spec["dataset"]
    config = cfg.dataset_config if cfg.dataset_config is not None else spec["dataset_config"]
    split = cfg.dataset_split if cfg.dataset_split is not None else spec["dataset_split"]
    seed = cfg.seed if cfg.seed is not None else spec["seed"]
    source = DatasetSource.resolve(dataset)
    same = _same_data(source, config, split, spec)
    unread = first_unread_doc(stream_end) if same else 0
    start_doc = cfg.start_doc if cfg.start_doc is not None else unread
    if same and seed != spec["seed"]:
        raise UserError(
            f"evaluation dataset overlaps the training cache {cache_path}: '{dataset}' in seed-{seed} order "
            f"mixes in documents the harvest read (seed {spec['seed']}); omit --seed or use another --dataset/--split"
        )
    if same and start_doc < unread:
        raise UserError(
            f"evaluation dataset overlaps the training cache {cache_path}: it read documents 0..{unread - 1} of "
            f"'{dataset}', evaluation starts at document {start_doc}; use --start-doc {unread} or later, or "
            f"another --dataset/--split"
        )
    plan = {
        "dataset": dataset,
        "dataset_revision": source.revision,
        "dataset_config": config,
        "dataset_split": split,
        "text_column": cfg.text_column if cfg.text_column is not None else spec["text_column"],
        "seed": seed,
        "same_data_as_cache": same,
        "first_unread_doc": unread if same else None,
        "start_doc": start_doc,
        "ctx_len": spec["ctx_len"],
        "packing": spec["packing"],
        "bos_token_id": spec["bos_token_id"],
        **_contexts(cfg.tokens, spec["ctx_len"]),
    }
    return plan, source


def text_plan(cfg: EvalConfig, dataset: str, ctx_len: int, bos_token_id: int) -> tuple[dict, DatasetSource]:
    """The plan of an evaluation without a training cache (an imported SAE with none of its site):
    `dataset` in its seeded order (cfg.seed, else 0) from cfg.start_doc (else its first document), in
    contexts of ctx_len tokens with a BOS before each document, as a harvest packs them."""
    source = DatasetSource.resolve(dataset)
    plan = {
        "dataset": dataset,
        "dataset_revision": source.revision,
        "dataset_config": cfg.dataset_config,
        "dataset_split": cfg.dataset_split or "train",
        "text_column": cfg.text_column or "text",
        "seed": cfg.seed if cfg.seed is not None else 0,
        "same_data_as_cache": False,
        "first_unread_doc": None,
        "start_doc": cfg.start_doc or 0,
        "ctx_len": ctx_len,
        "packing": "bos_per_doc",
        "bos_token_id": bos_token_id,
        **_contexts(cfg.tokens, ctx_len),
    }
    return plan, source


def _contexts(tokens: int, ctx_len: int) -> dict:
    n_contexts = tokens // ctx_len
    if n_contexts < 2:
        raise UserError(
            f"too few evaluation tokens: tokens={tokens} is less than 2 contexts of {ctx_len} "
            f"tokens (standard errors need at least 2); raise --tokens"
        )
    return {"n_contexts": n_contexts, "n_tokens": n_contexts * ctx_len}


def heldout_tokens(plan: dict, source: DatasetSource, tokenizer) -> tuple[np.ndarray, dict]:
    """int32 [n_contexts, ctx_len] and the plan completed with where the stream stopped and a hash."""
    start, bos = plan["start_doc"], plan["bos_token_id"]
    dataset = open_dataset(source, plan["dataset_config"], plan["dataset_split"], plan["text_column"])
    documents = iter_documents(dataset, plan["text_column"], plan["seed"], start_doc=start)
    token_docs = iter_token_docs(documents, tokenizer, bos, first_doc=start)
    contexts = iter_contexts(token_docs, plan["ctx_len"], plan["packing"], bos, {"doc": start, "offset": 0})
    taken = list(itertools.islice(contexts, plan["n_contexts"]))
    if len(taken) < plan["n_contexts"]:
        have = len(taken) * plan["ctx_len"]
        raise UserError(
            f"too few evaluation tokens: '{plan['dataset']}' has {have:,} tokens in whole contexts from document "
            f"{start} on, fewer than the {plan['n_tokens']:,} asked; lower --tokens (at least "
            f"{2 * plan['ctx_len']}) or use a larger --dataset"
        )
    tokens_CT = np.stack([context for context, _ in taken])
    digest = hashlib.sha256(tokens_CT.astype("<i4").tobytes()).hexdigest()[:16]
    return tokens_CT, {**plan, "stream_end": taken[-1][1], "tokens_sha256": digest}
