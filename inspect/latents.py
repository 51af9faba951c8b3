"""latents.json: what `sae inspect` found, for the page (index.html), the terminal card and any script.

    {
      "format": "sae-inspect", "version": 1,
      "run":    {"dir", "name", "arch", "k", "dict_size", "theta", "weights_sha256"},
      "cache":  {"path", "key", "layer", "model", "ctx_len"},
      "source": {"kind": "heldout" (the run's held-out chunks) | "first_rows" (--tokens N),
                 "chunks": [...], "row_ranges": [[start, stop], ...] (cache rows read, stop excluded),
                 "rows": rows read, "rows_gated": rows the SAE's gate leaves alone (no latent is active on them)},
      "config": the InspectConfig fields that decide this content, "window": {"before", "after"},
      "definitions": {field: meaning}, "versions": {...},
      "latents": [{                       one per latent, in id order
        "id", "count" (rows where it is active), "density" (count / rows, gated rows included),
        "max_activation", "mean_activation" (mean over the rows where it is active: sum / count; 0 if dead),
        "dead" (count = 0), "dense" (density > config.dense_threshold),
        "top": [example, ...]             the highest activations, highest first (ties: the lower row)
        "quantiles": [example + "quantile", ...]   at quantiles (i + ½)/Q of a uniform sample of up to
                                          config.quantile_pool of its activations, lowest first
        "histogram": {"edges": [B + 1], "counts": [B]} | null   of the sample of nonzero activations
        "promoted" / "suppressed": [{"id", "token", "logit"}, ...]   decoder direction through the
                                          unembedding (inspect.effects), strongest first; [] without the LM
        "neighbours": [{"id", "cosine"}, ...]   nearest decoder directions, closest first
      }]
    }
    example = {"row" (cache row: context × ctx_len + position), "activation", "context", "position",
               "text" (the window's tokens decoded together), "tokens" (each decoded alone),
               "activations" (this latent's, on each token), "at" (index of the row's token in tokens)}

Activations are in the SAE's units on raw cache rows; they are rounded to 4 significant digits
(window activations to 3).
"""

from collections.abc import Callable

import numpy as np

from sae.inspect.config import InspectConfig
from sae.inspect.effects import Ranked
from sae.inspect.scan import Kept, ScanResult

FORMAT, VERSION = "sae-inspect", 1
DEFINITIONS = {
    "density": "fraction of the rows read on which the latent is active (gated rows count as inactive)",
    "mean_activation": "mean of the latent's nonzero activations (sum / count); 0 for a dead latent",
    "histogram": "of a uniform sample (without replacement) of up to config.sample_size of the latent's nonzero activations; bins from 0 to max_activation",
    "quantiles": "examples at quantiles (i + 1/2) / quantile_samples of a uniform sample of up to config.quantile_pool of the latent's nonzero activations (nested in the histogram's sample)",
    "promoted": "tokens whose logits the decoder direction raises most: W_U (final-norm gain * W_dec[j])",
}


def rounded(x: np.ndarray, digits: int) -> np.ndarray:
    """x to `digits` significant digits, as floats whose repr is short (an integer divided or multiplied
    by an exact power of ten is the double nearest the decimal)."""
    x = np.asarray(x, dtype=np.float64)
    mag = np.floor(np.log10(np.abs(x), where=x != 0, out=np.zeros_like(x)))
    k = (digits - 1 - mag).astype(int)
    n = np.round(x * 10.0**k)
    return np.where(k >= 0, n / 10.0 ** np.maximum(k, 0), n * 10.0 ** np.maximum(-k, 0))


class Vocab:
    """Token ids as text: each id decoded alone (a token), or a window's ids together (its text).
    Without a tokenizer, ids are shown as [id]."""

    def __init__(self, tokenizer=None):
        # the Rust tokenizer of a fast one decodes 100k windows in a second; batch_decode takes ten
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.known: dict[int, str] = {}

    def decode(self, id_lists: list[list[int]]) -> list[str]:
        if self.backend is not None:
            return self.backend.decode_batch(id_lists, skip_special_tokens=False)
        return self.tokenizer.batch_decode(id_lists)

    def tokens(self, ids: np.ndarray) -> np.ndarray:
        """An object array of ids' shape: each id's string."""
        unique, inverse = np.unique(ids, return_inverse=True)
        new = [i for i in unique.tolist() if i not in self.known]
        if new:
            strings = self.decode([[i] for i in new]) if self.tokenizer else [f"[{i}]" for i in new]
            self.known.update(zip(new, strings, strict=True))
        table = np.array([self.known[i] for i in unique.tolist()], dtype=object)
        return table[inverse].reshape(np.shape(ids))

    def texts(self, windows: list[np.ndarray]) -> list[str]:
        if self.tokenizer is None:
            return ["".join(self.tokens(w)) for w in windows]
        return self.decode([w.tolist() for w in windows])


def examples(kept: Kept, latent_E: np.ndarray, slot_E: np.ndarray, tokens_of: Callable[[np.ndarray], np.ndarray],
             vocab: Vocab, cfg: InspectConfig, ctx_len: int) -> list[dict]:  # fmt: skip
    """The kept entries (latent_E[e], slot_E[e]) as example records, windows cut to their contexts."""
    rows_E = kept.row_MK[latent_E, slot_E]
    position_E = rows_E % ctx_len
    lo_E = np.maximum(0, cfg.window_before - position_E)  # the window's slice inside the context
    hi_E = np.minimum(cfg.window, cfg.window_before + ctx_len - position_E)
    offsets_W = np.arange(-cfg.window_before, cfg.window_after + 1)
    start_E = rows_E - position_E
    ids_EW = tokens_of(np.clip(rows_E[:, None] + offsets_W, start_E[:, None], (start_E + ctx_len - 1)[:, None]))
    windows = [ids_EW[e, lo_E[e] : hi_E[e]] for e in range(len(rows_E))]
    texts, strings_EW = vocab.texts(windows), vocab.tokens(ids_EW)
    acts_EW = rounded(kept.window_MPW[latent_E, slot_E], 3)
    values_E = rounded(kept.value_MK[latent_E, slot_E], 4)
    acts_EW[np.arange(len(rows_E)), cfg.window_before] = values_E  # the row's own activation, exact
    records = []
    for e, (row, value, lo, hi) in enumerate(
        zip(rows_E.tolist(), values_E.tolist(), lo_E.tolist(), hi_E.tolist(), strict=True)
    ):
        records.append({
            "row": row, "activation": value, "context": row // ctx_len, "position": row % ctx_len,
            "text": texts[e], "tokens": strings_EW[e, lo:hi].tolist(), "activations": acts_EW[e, lo:hi].tolist(),
            "at": cfg.window_before - lo,
        })  # fmt: skip
    return records


def quantile_slots(sample: Kept, q: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per latent, (the pool's slots at quantiles (i + ½)/q of its values, lowest first and without
    repeats, the quantile of each within the pool). The pool is the sample's first P slots: the P
    smallest random keys, a uniform sample of P, the slots whose windows are kept."""
    pool = sample.window_MPW.shape[1]
    valid_MP = sample.row_MK[:, :pool] >= 0
    n_valid_M = valid_MP.sum(1)
    by_value_MP = np.argsort(np.where(valid_MP, sample.value_MK[:, :pool], np.inf), axis=1, kind="stable")
    picks_MQ = np.floor((np.arange(q) + 0.5) / q * n_valid_M[:, None]).astype(int)
    found = []
    for j, n in enumerate(n_valid_M.tolist()):
        ranks = np.unique(picks_MQ[j]) if n else np.zeros(0, int)  # sorted: lowest value first
        found.append((by_value_MP[j, ranks], (ranks + 0.5) / max(n, 1)))
    return found


def histograms(sample: Kept, max_M: np.ndarray, bins: int) -> np.ndarray:
    """[m, bins] counts of each latent's sampled nonzero activations over [0, max]."""
    m = len(max_M)
    valid_MK = sample.row_MK >= 0
    scaled_MK = sample.value_MK / np.where(max_M > 0, max_M, 1)[:, None]
    bin_MK = np.clip((scaled_MK * bins).astype(int), 0, bins - 1)
    flat = (np.arange(m)[:, None] * bins + bin_MK)[valid_MK]
    return np.bincount(flat, minlength=m * bins).reshape(m, bins)


def latent_records(result: ScanResult, cfg: InspectConfig, ctx_len: int, tokens_of: Callable[[np.ndarray], np.ndarray],
                   vocab: Vocab, effects: tuple[Ranked, Ranked] | None, neighbours: Ranked) -> list[dict]:  # fmt: skip
    """latents.json's "latents": one record per latent, in id order."""
    m = len(result.count_M)
    density_M = result.count_M / max(result.rows, 1)
    mean_M = result.sum_M / np.maximum(result.count_M, 1)
    n_top_M = (result.top.row_MK >= 0).sum(1)
    latent_E = np.repeat(np.arange(m), n_top_M)
    slot_E = np.concatenate([np.zeros(0, int), *(np.arange(n) for n in n_top_M)])
    top = examples(result.top, latent_E, slot_E, tokens_of, vocab, cfg, ctx_len)
    picked = quantile_slots(result.sample, cfg.quantile_samples)
    n_q_M = np.array([len(slots) for slots, _ in picked], dtype=int)
    q_slot_E = np.concatenate([np.zeros(0, int), *(slots for slots, _ in picked)])
    quantiles = examples(result.sample, np.repeat(np.arange(m), n_q_M), q_slot_E, tokens_of, vocab, cfg, ctx_len)
    for example, fraction in zip(quantiles, np.concatenate([np.zeros(0), *(f for _, f in picked)]), strict=True):
        example["quantile"] = round(float(fraction), 4)
    hist_MB = histograms(result.sample, result.max_M, cfg.histogram_bins)
    max_r, mean_r, density_r = (rounded(x, 4).tolist() for x in (result.max_M, mean_M, density_M))
    token_lists = {}
    if effects is not None:
        for name, ranked in zip(("promoted", "suppressed"), effects, strict=True):
            strings = vocab.tokens(ranked.ids_MK.reshape(-1)).tolist()
            logits = rounded(ranked.values_MK, 4).tolist()
            n = ranked.ids_MK.shape[1]
            token_lists[name] = [
                [
                    {"id": int(i), "token": strings[j * n + r], "logit": logits[j][r]}
                    for r, i in enumerate(ranked.ids_MK[j])
                ]
                for j in range(m)
            ]
    cosines = rounded(neighbours.values_MK, 4).tolist()
    records, t, q = [], 0, 0
    for j in range(m):
        count = int(result.count_M[j])
        edges = rounded(np.linspace(0, result.max_M[j], cfg.histogram_bins + 1), 4).tolist()
        records.append({
            "id": j, "count": count, "density": density_r[j], "max_activation": max_r[j],
            "mean_activation": mean_r[j], "dead": count == 0, "dense": bool(density_M[j] > cfg.dense_threshold),
            "top": top[t : t + n_top_M[j]], "quantiles": quantiles[q : q + n_q_M[j]],
            "histogram": {"edges": edges, "counts": hist_MB[j].tolist()} if count else None,
            "promoted": token_lists["promoted"][j] if effects else [],
            "suppressed": token_lists["suppressed"][j] if effects else [],
            "neighbours": [{"id": int(i), "cosine": c} for i, c in zip(neighbours.ids_MK[j], cosines[j], strict=True)],
        })  # fmt: skip
        t, q = t + n_top_M[j], q + n_q_M[j]
    return records
