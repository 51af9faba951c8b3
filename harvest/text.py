"""Documents in a fixed seeded order, tokenized and packed into contexts, resumable at any context.

The stream of tokens is the concatenation, over documents in order, of [BOS] + tokens(document).
Its position is (doc, offset): the document being read and how many of its tokens (BOS included)
are used. Saving that position after every committed chunk lets a killed harvest continue exactly.
"""

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae.cache.spec import file_sha256
from sae.errors import UserError

BUNDLED_DATASETS = ("openwebtext-sample",)  # shipped in sae/data/ with a data card
_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text", ".csv": "csv"}
_TOKENIZE_DOCS = 64  # documents per tokenizer call: batching makes fast tokenizers ~10x faster


def bundled_path(name: str) -> Path:
    """Where a bundled dataset (BUNDLED_DATASETS) sits in the installed package."""
    import sae

    return Path(sae.__file__).parent / "data" / f"{name}.parquet"


@dataclass(frozen=True)
class DatasetSource:
    name: str  # as given
    kind: str  # "hub", "file" or "disk"
    location: str  # hub id or local path
    revision: str  # content hash for local data; "unversioned" for the hub

    @classmethod
    def resolve(cls, name: str) -> "DatasetSource":
        if name in BUNDLED_DATASETS:
            path = bundled_path(name)
            return cls(name, "file", str(path), "sha256:" + file_sha256([path]))
        path = Path(name)
        if path.is_dir():
            if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
                raise UserError(f"dataset directory {path} was not written by datasets' save_to_disk")
            return cls(name, "disk", str(path), "sha256:" + file_sha256([p for p in path.rglob("*") if p.is_file()]))
        if path.exists():
            if path.suffix not in _FILE_BUILDERS:
                raise UserError(f"dataset file {path}: use one of {', '.join(_FILE_BUILDERS)}")
            return cls(name, "file", str(path), "sha256:" + file_sha256([path]))
        if name.startswith((".", "/")) or name.endswith(tuple(_FILE_BUILDERS)):
            raise UserError(f"dataset file {path} does not exist")
        return cls(name, "hub", name, "unversioned")


def open_dataset(source: DatasetSource, config: str | None, split: str, text_column: str):
    """The dataset (a hub dataset streamed), checked now, before any model is loaded: it loads, has
    the text column and, when local, at least one document."""
    import datasets

    datasets.disable_progress_bars()
    empty = UserError(f"dataset '{source.name}' is empty: it has no documents")
    if source.kind == "file" and _empty_file(Path(source.location)):
        raise empty  # datasets fails on these with a different error per format
    try:
        if source.kind == "hub":
            ds = datasets.load_dataset(source.location, config, split=split, streaming=True)
        elif source.kind == "disk":
            ds = datasets.load_from_disk(source.location)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            builder = _FILE_BUILDERS[Path(source.location).suffix]
            ds = datasets.load_dataset(builder, data_files=source.location, split="train")
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        if "corresponds to no data" in str(e):  # a csv of a header only, a json of []
            raise empty from None
        raise UserError(f"cannot load dataset '{source.name}': {str(e).splitlines()[0]}") from None
    except datasets.exceptions.DatasetGenerationError as e:
        raise UserError(f"cannot load dataset '{source.name}': {str(e.__cause__ or e).splitlines()[0]}") from None
    if text_column not in ds.column_names:
        raise UserError(f"dataset '{source.name}' has no column '{text_column}' (it has {ds.column_names})")
    if source.kind != "hub" and len(ds) == 0:
        raise empty
    return ds


def _empty_file(path: Path) -> bool:
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        return True
    return path.suffix == ".parquet" and pq.ParquetFile(path).metadata.num_rows == 0


def iter_documents(ds, text_column: str, seed: int, start_doc: int) -> Iterator[str]:
    """Texts of an opened dataset in its seeded order, from document index start_doc on; a missing
    text (a csv's empty cell) is an empty document."""
    import datasets

    if isinstance(ds, datasets.IterableDataset):  # the hub: a seeded shuffle buffer over the stream
        yield from (row[text_column] or "" for row in ds.shuffle(seed=seed, buffer_size=10_000).skip(start_doc))
        return
    ds = ds.shuffle(seed=seed)
    for start in range(start_doc, len(ds), 1024):
        yield from (text or "" for text in ds[start : start + 1024][text_column])


def iter_token_docs(documents: Iterator[str], tokenizer, bos_token_id: int, first_doc: int) -> Iterator:
    """(document index, int32 [BOS] + tokens) for each non-empty document, tokenized in batches."""
    doc, documents = first_doc, iter(documents)
    while batch := list(itertools.islice(documents, _TOKENIZE_DOCS)):
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for tokens in ids:
            if tokens:
                yield doc, np.array([bos_token_id, *tokens], dtype=np.int32)
            doc += 1


def iter_contexts(
    token_docs: Iterator, ctx_len: int, packing: str, bos_token_id: int, position: dict
) -> Iterator[tuple[np.ndarray, dict]]:
    """(context int32 [ctx_len], stream position after it), resuming at position {"doc", "offset"}.

    token_docs must start at document position["doc"]; a partial context at the end of the data is dropped.
    """
    prefix = [np.array([bos_token_id], dtype=np.int32)] if packing == "bos_per_context" else []
    body = ctx_len - len(prefix)
    parts, n_parts = list(prefix), 0
    for doc, tokens in token_docs:
        offset = position["offset"] if doc == position["doc"] else 0
        while offset < len(tokens):
            take = min(body - n_parts, len(tokens) - offset)
            parts.append(tokens[offset : offset + take])
            n_parts, offset = n_parts + take, offset + take
            if n_parts == body:
                yield np.concatenate(parts), {"doc": doc, "offset": offset}
                parts, n_parts = list(prefix), 0
