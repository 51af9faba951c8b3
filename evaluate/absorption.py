"""First-letter feature absorption (Chanin et al., 2024), measured as SAEBench's `absorption` eval does.

A general latent ("starts with S") is absorbed where it stops firing on tokens a more specific latent
("short") takes over, the specific one's decoder carrying the general direction. The measure:
1. Words: a seeded sample of the tokenizer's alphabetic tokens (an optional leading space), split 80/20
   into the probes' training words and test words.
2. Prompts: 10 in-context examples "{w} has the first letter: W" of other words of the same split, one
   per line, then "{word} has the first letter:"; the activation at the SAE's site on the word's token.
3. The ground truth: a logistic probe per letter on those activations. Its accuracy and F1 on the test
   words say whether the LM spells at this site at all; letters with probe F1 ≤ 0.6 are not scored.
4. Each letter's main latents: an L1 probe on the SAE's latents ranks them; a logistic regression on
   the first k (k = 1..10) is kept while its test F1 rises by more than 0.03 (the feature-split rule).
5. On the test words whose probe says the letter rightly, with p̂ the probe's unit direction, P = x·p̂
   and proj_j latent j's contribution to the reconstruction along p̂ (in raw units), M = Σ over main
   latents, A the other latents with cos(W_dec_j, p̂) ≥ 0.1 and proj_j > 0, T the sum of A's top 3:
   absorption fraction = 0 if M ≥ P or T < 0.4·P, 1 if M ≤ 0, else min(T, P − M) / (min(T, P − M) + M);
   full absorption: no main latent fires and one latent's proj ≥ 0.4·P (its cos ≥ 0.025).
Per letter the means over its words, then the mean over the scored letters.

Differences from SAEBench (docs/evaluation.md, with a cross-check): seeded sampling and probe starts;
a sample of the vocabulary, not all of it; the L1 probe's batches keep at least 8 steps an epoch (as
SAEBench's 4,096 give its ~30k words; on fewer words its probe takes one step an epoch and finds
noise); the test words' activations are reused for step 5 instead of re-prompting them with new
examples; proj_j is the latent's contribution in raw units, the units of P (a_j·(W_dec_j·p̂), times each
row's std for a standardising SAE), where SAEBench's a_j·cos_j is in the SAE's standardised units and
understates a standardising SAE's contributions by the rows' std (≈ 4.3× on SmolLM2 layer 6).
"""

import math
import random
import re
import string

import numpy as np
import torch
from torch import Tensor

from sae.evaluate.probes import f1_score, fit_logistic, train_probes
from sae.harvest.hooks import capture
from sae.harvest.model import LoadedModel
from sae.progress import make_progress
from sae.train.sae import SparseAutoencoder

LETTERS = string.ascii_lowercase
TEMPLATE = "{word} has the first letter:"
ICL_EXAMPLES, TRAIN_SHARE, BATCH_PROMPTS = 10, 0.8, 64
PROBE_F1_MIN, MAX_K, F1_JUMP = 0.6, 10, 0.03  # SAEBench's min_GT_probe_f1, max_k_value, f1_jump_threshold
COS_ABSORBING, COS_FULL, PROJECTION_SHARE, MAX_ABSORBING = 0.1, 0.025, 0.4, 3


def alphabetic_tokens(tokenizer) -> list[tuple[int, str]]:
    """(token id, text) of every token that is letters only, after an optional leading space."""
    words = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if re.fullmatch(r" ?[A-Za-z]+", text) and token_id not in tokenizer.all_special_ids:
            words.append((token_id, text))
    return words


def letter(text: str) -> int:
    return LETTERS.index(text.strip()[0].lower())


def prompt_ids(tokenizer, bos_token_id: int, word: str, examples: list[str]) -> list[int]:
    lines = [f"{TEMPLATE.format(word=w)} {w.strip()[0].upper()}" for w in examples]
    text = "\n" + "\n".join(lines) + "\n" + TEMPLATE.format(word=word)
    return [bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def word_activations(
    loaded: LoadedModel, site: str, layer: int, words: list[tuple[int, str]], seed: int
) -> tuple[Tensor, Tensor]:
    """([W', D] float32 activations on each word's token, [W'] their first letters): a word whose token
    the prompt's tokenization merges with its neighbours is dropped."""
    rng = random.Random(seed)
    texts = [text for _, text in words]
    suffix = len(loaded.tokenizer(TEMPLATE.format(word=""), add_special_tokens=False)["input_ids"])
    prompts, kept = [], []
    for token_id, text in words:
        examples = rng.sample([t for t in texts if t != text], ICL_EXAMPLES)
        ids = prompt_ids(loaded.tokenizer, loaded.bos_token_id, text, examples)
        if ids[len(ids) - suffix - 1] == token_id:
            prompts.append(ids)
            kept.append((token_id, text))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad little
    acts_WD = torch.zeros(len(prompts), loaded.d_model)
    with make_progress("prompts") as progress:
        task = progress.add_task(f"absorption prompts at {site} {layer}", total=len(order), status="")
        for start in range(0, len(order), BATCH_PROMPTS):
            batch = order[start : start + BATCH_PROMPTS]
            acts_WD[batch] = batch_activations(loaded, site, layer, [prompts[i] for i in batch], suffix)
            progress.advance(task, len(batch))
    return acts_WD, torch.tensor([letter(text) for _, text in kept])


def batch_activations(loaded: LoadedModel, site: str, layer: int, prompts: list[list[int]], suffix: int) -> Tensor:
    """[B, D] float32: each prompt's activation on the token before its `suffix` last tokens (the word)."""
    T = max(len(ids) for ids in prompts)
    # right padding: a causal model's activation at the word does not see the pad after it
    ids_BT = torch.tensor([ids + [loaded.bos_token_id] * (T - len(ids)) for ids in prompts], device=loaded.device)
    acts_BTD = capture(loaded.model, loaded.blocks, site, [layer], ids_BT)[layer]
    at_B = torch.tensor([len(ids) - suffix - 1 for ids in prompts], device=acts_BTD.device)
    return acts_BTD[torch.arange(len(prompts), device=acts_BTD.device), at_B].float().cpu()


def probe_data(loaded: LoadedModel, site: str, layer: int, n_words: int, seed: int) -> dict:
    """The words, their activations and the ground-truth probes, shared by every SAE at this site."""
    words = alphabetic_tokens(loaded.tokenizer)
    words = random.Random(seed).sample(words, min(n_words, len(words)))
    cut = int(TRAIN_SHARE * len(words))
    train_x, train_y = word_activations(loaded, site, layer, words[:cut], seed)
    test_x, test_y = word_activations(loaded, site, layer, words[cut:], seed + 1)
    W_CD, b_C = train_probes(train_x, train_y, len(LETTERS), seed=seed)
    logits_WC = test_x @ W_CD.T + b_C
    f1_C = [f1_score(logits_WC[:, c] > 0, test_y == c) for c in range(len(LETTERS))]
    return {
        "train": (train_x, train_y), "test": (test_x, test_y), "probe": (W_CD, b_C), "test_logits": logits_WC,
        "record": {
            "words": len(words), "train_words": len(train_y), "test_words": len(test_y),
            "dropped_words": len(words) - len(train_y) - len(test_y),
            "accuracy": float((logits_WC.argmax(1) == test_y).float().mean()),
            "mean_f1": float(np.mean(f1_C)), "letters_above_f1_min": sum(f > PROBE_F1_MIN for f in f1_C),
            "f1": dict(zip(LETTERS, f1_C, strict=True)),
        },
    }  # fmt: skip


def main_latents(train_AM: Tensor, train_y: Tensor, test_AM: Tensor, test_y: Tensor, seed: int) -> list[dict]:
    """Per letter: its main latents by k-sparse probing, with the F1 at k = 1 and at the chosen k."""
    # SAEBench's batches of 4,096 give its ~30k training words 8 steps an epoch; fewer words keep the 8
    batch_size = min(4096, math.ceil(len(train_AM) / 8))
    W_CM, _ = train_probes(
        train_AM, train_y, len(LETTERS), batch_size=batch_size, weight_decay=1e-6, l1=0.01, seed=seed
    )
    found = []
    for c in range(len(LETTERS)):
        ranked = W_CM[c].topk(MAX_K).indices
        best, chosen, f1_k1 = -100.0, ranked[:1], None
        for k in range(1, MAX_K + 1):
            w_K, b = fit_logistic(train_AM[:, ranked[:k]], (train_y == c).float())
            f1 = f1_score(test_AM[:, ranked[:k]] @ w_K + b > 0, test_y == c)
            f1_k1 = f1 if k == 1 else f1_k1
            if f1 <= best + F1_JUMP:
                break
            best, chosen = f1, ranked[:k]
        found.append({"latents": chosen.tolist(), "f1": best, "f1_k1": f1_k1})
    return found


def absorption(proj_WM: Tensor, cos_M: Tensor, acts_WM: Tensor, P_W: Tensor, main: list[int]) -> tuple[Tensor, Tensor]:
    """([W] absorption fraction, [W] bool full absorption) of words of one letter: proj_WM each latent's
    contribution along the probe, cos_M its decoder's cosine with it, P_W the activation's projection."""
    is_main_M = torch.zeros(len(cos_M), dtype=torch.bool)
    is_main_M[main] = True
    M_W = proj_WM[:, is_main_M].sum(1)
    others_WM = proj_WM.masked_fill(is_main_M | (cos_M < COS_ABSORBING), 0).clamp(min=0)
    T_W = others_WM.topk(min(MAX_ABSORBING, others_WM.shape[1]), dim=1).values.sum(1)
    absorbed_W = torch.minimum(T_W, P_W - M_W)
    fraction_W = (absorbed_W / (absorbed_W + M_W)).clamp(0, 1)
    fraction_W = torch.where(M_W <= 0, torch.ones_like(fraction_W), fraction_W)
    fraction_W = torch.where((M_W >= P_W) | (T_W < PROJECTION_SHARE * P_W) | (P_W <= 0), 0, fraction_W)
    top_proj_W, top_W = proj_WM.max(1)
    full_W = (
        (acts_WM[:, is_main_M] < 1e-8).all(1) & (cos_M[top_W] >= COS_FULL) & (P_W > 0)
        & (top_proj_W >= PROJECTION_SHARE * P_W)
    )  # fmt: skip
    return fraction_W, full_W


def projections(sae: SparseAutoencoder, x_WD: Tensor, direction_D: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(latents [W, m], each latent's contribution along the unit direction in raw units [W, m], the
    decoder rows' cosine with it [m]) of raw rows."""
    device = sae.W_dec.device
    x_WD, direction_D = x_WD.to(device), direction_D.to(device)
    with torch.no_grad():
        x_n, mult, _ = sae.normalize(x_WD)
        acts_WM = sae.encode_normalized(x_n)
        along_M = sae.W_dec @ direction_D
        cos_M = along_M / sae.W_dec.norm(dim=1).clamp(min=1e-12)
        proj_WM = acts_WM * along_M * mult  # mult: each row's std [W, 1] for a standardising SAE, else a scalar
    return acts_WM.float().cpu(), proj_WM.float().cpu(), cos_M.float().cpu()


def sae_absorption(sae: SparseAutoencoder, data: dict, seed: int) -> dict:
    """eval.json's "absorption" block of one SAE at the probes' site."""
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    with torch.no_grad():
        train_AM, test_AM = (sae.encode(x.to(sae.W_dec.device)).float().cpu() for x in (train_x, test_x))
    mains = main_latents(train_AM, train_y, test_AM, test_y, seed)
    W_CD, _ = data["probe"]
    letters = {}
    for c, name in enumerate(LETTERS):
        probe_f1 = data["record"]["f1"][name]
        right_W = (test_y == c) & (data["test_logits"][:, c] > 0)
        entry = {"probe_f1": probe_f1, "probe_true_positives": int(right_W.sum()), **mains[c]}
        if probe_f1 > PROBE_F1_MIN and right_W.any():
            direction_D = W_CD[c] / W_CD[c].norm()
            acts_WM, proj_WM, cos_M = projections(sae, test_x[right_W], direction_D)
            fraction_W, full_W = absorption(proj_WM, cos_M, acts_WM, test_x[right_W] @ direction_D, mains[c]["latents"])
            entry.update(
                absorption_fraction=float(fraction_W.mean()), full_absorption_rate=float(full_W.float().mean())
            )
        letters[name] = entry
    scored = [e for e in letters.values() if "absorption_fraction" in e]
    summary = {"letters_scored": len(scored)}
    summary.update(mean_over("absorption_fraction", scored) | mean_over("full_absorption_rate", scored))
    # the k-sparse probes' quality: where no small set of latents carries a letter, there is little to absorb
    summary.update(mean_over("f1", list(letters.values())) | mean_over("f1_k1", list(letters.values())))
    summary["mean_main_latents"] = float(np.mean([len(e["latents"]) for e in scored])) if scored else None
    return {**summary, "probe": data["record"], "letters": letters}


def mean_over(key: str, entries: list[dict]) -> dict:
    """{mean_<key>, mean_<key>_stderr} over letters (None where there are too few)."""
    values = [e[key] for e in entries]
    mean = float(np.mean(values)) if values else None
    stderr = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
    return {f"mean_{key}": mean, f"mean_{key}_stderr": stderr}
