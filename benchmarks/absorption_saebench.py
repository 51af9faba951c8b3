"""Our first-letter absorption (evaluate/absorption.py) against SAEBench's own `absorption` eval, on one SAE.

    python -m benchmarks.absorption_saebench RUN_DIR --saebench-python /tmp/saebench/venv/bin/python
    python -m benchmarks.absorption_saebench RUN_DIR --saebench-python PY --k-sparse-probe-batch-size 400
    python -m benchmarks.absorption_saebench RUN_DIR --saebench-python PY --saebench-full-vocab   # SAEBench on all words
    python -m benchmarks.absorption_saebench RUN_DIR                     # our side only
    python -m benchmarks.absorption_saebench --tiny [--model DIR]        # seconds: our side on a tiny GPT-2

Two interpreters: sae-bench 0.6.0 pins numpy<2 and datasets<4 and cannot go into the project's venv,
so our side runs here (the project venv) and SAEBench's in its own venv, as a child process running
this same file with `--side saebench` (stdlib and torch at import; nothing of ours; `python -P`, or
benchmarks/select.py would shadow the standard library's select). The SAEBench venv, on CPU (sae-bench's
torchvision pulls torch 2.14.1 with CUDA wheels, whose torchvision then cannot load against the CPU torch;
absorption never imports torchvision):

    python -m venv /tmp/saebench/venv && /tmp/saebench/venv/bin/pip install torch==2.13.0
    /tmp/saebench/venv/bin/pip install sae-bench==0.6.0 && /tmp/saebench/venv/bin/pip install torch==2.13.0
    /tmp/saebench/venv/bin/pip uninstall -y torchvision   # and, to save 1 GB, the nvidia-* / triton wheels

What the child does to run SAEBench on our SAE and model, and nothing else:
- The model: TransformerLens 3.9's HookedTransformer knows SmolLM2 by no name, and from_pretrained refuses
  a local directory. The child builds it as from_pretrained_no_processing would for a Llama: a
  HookedTransformerConfig from the HF config (Llama's conversion: RMS, rotary, gated SiLU MLP, GQA),
  the weights by TransformerLens's own convert_llama_weights from the HF model loaded from the directory
  our loader converted the GGUF into, no folding or centring; run_eval's HookedTransformer is replaced by
  a shim returning it. Checked before the eval: the prompts' tokens as TransformerLens makes them equal
  ours, its blocks.{L-1}.hook_resid_post equals our capture of resid_pre L on the same prompts (max abs
  difference 5e-4 on values up to 754, 1e-5 at the word), and SAELens's latents equal ours (2e-6).
  Its run_with_cache stops after that block (SAEBench runs all 30 and the unembedding; checked equal).
- The SAE: SAELens's SAE.load_from_disk of the run directory, with cfg.hook_layer = L − 1 for a
  resid_pre-L SAE (SAEBench reads blocks.{hook_layer}.hook_resid_post; from the hook name it would take L).
  A cfg.json written before metadata.sae_lens_version (b208c2e) loads as a pre-6.0 config without
  hook_name and model_name, which SAEBench needs: they are put back from cfg.json (metadata_restored).
- The words: SAEBench's get_alpha_tokens is replaced by our sampled words (the ones our side probes,
  `random.Random(seed).sample(alphabetic_tokens(tokenizer), n)`), for its probes and its re-prompting
  examples alike, unless --saebench-full-vocab. Python's random, numpy and torch are seeded just before
  run_eval (SAEBench seeds nothing: its config's random_seed is unused); so seeded, two runs drew the same
  split, prompts and probe.
- Its caches: the ground-truth probe is cached by model name and layer inside the sae_bench package and
  force_rerun does not retrain it: the child deletes it first. min_feats_for_eval is 1 (SAEBench's 20
  letters with probe F1 > 0.6 would drop the whole result silently below 20); the count is reported.
Everything else is SAEBench's defaults (llm_batch_size 10, float32, CPU), the L1 probe's batch of 4,096
included: on a 3,200-word training split that is one step an epoch, 50 in all, and its main latents are
mostly noise (k-sparse F1 0.14); --k-sparse-probe-batch-size 400 gives it the 8 steps an epoch it has on
its full vocabulary, as ours does.

What it showed (the Matryoshka BatchTopK k 32 m 4,608 of the study, SmolLM2 resid_pre 6, 4,000 words,
seed 0): ours absorption fraction 0.382, full 0.111; SAEBench 0.201 / 0.084 with its batch, 0.077 / 0.027
with batch 400. The gap is SAEBench's projection a_j·cos_j, which for a standardising SAE is in
standardised units while P = x·p̂ is raw (the rows' std at the word is ≈ 4.3): ours with a_j·cos_j gives
0.073 / 0.026, and SAEBench's own probe, words and main latents with our raw-unit projection 0.385 / 0.131.

Prints both sides' figures side by side (absorption fraction, full absorption rate, probe accuracy and
F1, letters scored, main latents and the k-sparse probes' F1), one row per letter, and one JSON line.
Each side's outputs go to --out: SAEBench's probe weights, its probe data, its per-word results.
--tiny: our side on a tiny random GPT-2 and a random standardising SAE (seconds; the figures mean
nothing) and the reference rows; SAEBench is not run there (its imports alone take longer) and a line
says it was not available.
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TINY = {"words": 200, "m": 256, "k": 8, "layer": 1}
REFERENCE_PROMPTS = 8
HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_pre|resid_post)$")


# -- our side (the project venv) -------------------------------------------------------------------
def site_of(run_dir: Path) -> tuple[str, str, int]:
    """(model, site, layer) of one of our run directories, from its SAELens metadata."""
    meta = json.loads((run_dir / "cfg.json").read_text())["metadata"]
    found = HOOK.match(meta["hook_name"])
    if found is None:
        raise SystemExit(f"{run_dir}: hook {meta['hook_name']} is not a residual-stream site")
    return meta["model_name"], found.group(2), int(found.group(1))


def ours(loaded, sae, site: str, layer: int, n_words: int, seed: int) -> dict:
    """Our measure as `sae eval --absorption` runs it, timed, with the words it sampled."""
    from sae.evaluate.absorption import alphabetic_tokens, probe_data, sae_absorption

    start = time.perf_counter()
    data = probe_data(loaded, site, layer, n_words, seed)
    result = sae_absorption(sae, data, seed)
    seconds = time.perf_counter() - start
    words = random.Random(seed).sample(alphabetic_tokens(loaded.tokenizer), n_words)  # probe_data's sample
    return {"seconds": seconds, "result": result, "words": [text for _, text in words]}


def reference_rows(loaded, sae, site: str, layer: int, words: list[str], seed: int) -> dict:
    """A few probe prompts (token ids, right-padded) with our activations at the site and the SAE's latents
    at the word: what the SAEBench side must reproduce through TransformerLens and SAELens."""
    from sae.evaluate.absorption import ICL_EXAMPLES, TEMPLATE, prompt_ids
    from sae.harvest.hooks import capture

    rng = random.Random(seed)
    chosen = rng.sample(words, REFERENCE_PROMPTS)
    prompts = [
        prompt_ids(loaded.tokenizer, loaded.bos_token_id, w, rng.sample([v for v in words if v != w], ICL_EXAMPLES))
        for w in chosen
    ]
    T = max(map(len, prompts))
    ids_BT = torch.tensor([p + [loaded.bos_token_id] * (T - len(p)) for p in prompts])
    acts_BTD = capture(loaded.model, loaded.blocks, site, [layer], ids_BT)[layer].float()
    suffix = len(loaded.tokenizer(TEMPLATE.format(word=""), add_special_tokens=False)["input_ids"])
    at_B = torch.tensor([len(p) - suffix - 1 for p in prompts])
    word_BD = acts_BTD[torch.arange(len(prompts)), at_B]
    with torch.no_grad():
        latents_BM = sae.encode(word_BD).float()
    texts = [loaded.tokenizer.decode(p[1:]) for p in prompts]  # SAEBench's prompt strings (it adds the BOS)
    return {"ids": ids_BT, "lengths": [len(p) for p in prompts], "acts": acts_BTD, "texts": texts,
            "word_acts": word_BD, "latents": latents_BM}  # fmt: skip


def tiny_setup(tmp: Path, model: str | None):
    """(loaded model, SAE, site, layer) for --tiny: the tests' tiny GPT-2 (built unless given) and a random
    standardising TopK SAE."""
    from benchmarks.models import tiny_gpt2
    from sae.harvest.model import load_model
    from sae.train.config import SAESpec
    from sae.train.sae import SparseAutoencoder

    loaded = load_model(model or str(tiny_gpt2(tmp / "tiny-gpt2")))
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec("topk", TINY["k"], TINY["m"], 0.0, 0.0), loaded.d_model, normalize="standardize")
    return loaded, sae.eval(), "resid_pre", TINY["layer"]


# -- SAEBench's side (its own venv; run as a child with --side saebench) ----------------------------
def hooked_llama(model_dir: str, name: str):
    """A TransformerLens HookedTransformer with exactly the weights of the Llama-architecture HF model in
    model_dir: TransformerLens's own Llama config conversion and weight converter, nothing folded."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    c = hf.config
    if c.model_type != "llama":
        raise SystemExit(f"{model_dir}: model type {c.model_type}; this builds Llama-architecture models only")
    rope = getattr(c, "rope_parameters", None) or {}
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads, n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, eps=c.rms_norm_eps, d_vocab=c.vocab_size,
        n_key_value_heads=c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None,
        act_fn=c.hidden_act, normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=c.hidden_size // c.num_attention_heads, rotary_base=rope.get("rope_theta", getattr(c, "rope_theta", 1e4)),
        final_rms=True, gated_mlp=True, original_architecture="LlamaForCausalLM", model_name=name,
        tokenizer_name=model_dir, dtype=torch.float32, device="cpu", default_prepend_bos=True, init_weights=False,
        n_ctx=2048,  # prompts are < 100 tokens; the config's 8,192 would hold 30 causal masks of 8k² (2 GB)
    )  # fmt: skip
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(model_dir), move_to_device=False)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )  # fmt: skip
    return model.eval()


def check_against_ours(model, sae, hook: str, reference: dict) -> dict:
    """Max abs differences of TransformerLens's activations and SAELens's latents from ours on the same prompts."""
    tokens_BT = model.to_tokens(reference["texts"])  # padded right with the pad token: compare the prompts only
    same_tokens = all(
        torch.equal(tokens_BT[b, :n], reference["ids"][b, :n]) for b, n in enumerate(reference["lengths"])
    )
    with torch.no_grad():
        _, cache = model.run_with_cache(reference["ids"], names_filter=[hook])
        acts_BTD = cache[hook].float()
        mask_BT = torch.arange(acts_BTD.shape[1])[None, :] < torch.tensor(reference["lengths"])[:, None]
        diff = (acts_BTD - reference["acts"]).abs()[mask_BT]
        _, by_text = model.run_with_cache(reference["texts"], names_filter=[hook])
        word_BD = by_text[hook][:, -6].float()  # SAEBench's read: the word token, 6th from the end
        latents_BM = sae.encode(reference["word_acts"]).float()
    return {
        "tokens_equal": same_tokens,
        "acts_max_abs_diff": float(diff.max()),
        "acts_max_abs": float(reference["acts"].abs().max()),
        "word_acts_max_abs_diff": float((word_BD - reference["word_acts"]).abs().max()),
        "latents_max_abs_diff": float((latents_BM - reference["latents"]).abs().max()),
        "decoder_norm_range": [float(n) for n in sae.W_dec.norm(dim=1).aminmax()],
    }


def saebench_side(job: dict) -> dict:
    """Run SAEBench 0.6.0's absorption eval on job's SAE and model; its figures and what it kept."""
    import numpy as np
    import sae_bench.evals.absorption.common as common
    import sae_bench.evals.absorption.feature_absorption as feature_absorption
    import sae_bench.evals.absorption.main as saebench_main
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
    from sae_lens import SAE

    out = Path(job["out"])
    start = time.perf_counter()
    name = job["model_name"]
    model = hooked_llama(job["model_dir"], name)
    hook_layer = job["layer"] - 1 if job["site"] == "resid_pre" else job["layer"]
    if hook_layer < 0:
        raise SystemExit("SAEBench reads resid_post of a block: a resid_pre SAE of layer 0 cannot be expressed")
    hook = f"blocks.{hook_layer}.hook_resid_post"
    sae = SAE.load_from_disk(job["run_dir"], device="cpu")
    saved = json.loads((Path(job["run_dir"]) / "cfg.json").read_text())["metadata"]
    restored = getattr(sae.cfg.metadata, "hook_name", None) is None
    if restored:  # a cfg.json without metadata.sae_lens_version (before b208c2e): SAELens read it as pre-6.0
        sae.cfg.metadata.hook_name, sae.cfg.metadata.model_name = saved["hook_name"], saved["model_name"]
    sae.cfg.hook_layer = hook_layer  # explicit: _standardize_sae_cfg would take the hook name's number
    check = check_against_ours(model, sae, hook, torch.load(job["reference"]))
    build_seconds = time.perf_counter() - start

    if job["words"] is not None:
        words = list(job["words"])
        common.get_alpha_tokens = feature_absorption.get_alpha_tokens = lambda tokenizer, **_: list(words)
    saebench_main.HookedTransformer = type("Prebuilt", (), {"from_pretrained_no_processing": lambda *a, **k: model})
    # SAEBench runs all 30 blocks and the unembedding for one block's activations: stop after that block
    # (the same computation up to it, checked equal below; 5× faster on CPU)
    full_run_with_cache = model.run_with_cache
    model.run_with_cache = lambda *a, **k: full_run_with_cache(*a, **{"stop_at_layer": hook_layer + 1, **k})
    with torch.no_grad():
        texts = torch.load(job["reference"])["texts"]
        check["stop_at_layer_equal"] = torch.equal(
            model.run_with_cache(texts, names_filter=[hook])[1][hook],
            full_run_with_cache(texts, names_filter=[hook])[1][hook],
        )
    probes_dir = common.PROBES_DIR / name / f"layer_{hook_layer}"
    shutil.rmtree(probes_dir, ignore_errors=True)  # cached by model and layer only; force_rerun keeps it
    config = AbsorptionEvalConfig(
        model_name=name, random_seed=job["seed"], llm_batch_size=job["llm_batch_size"], llm_dtype="float32",
        min_feats_for_eval=1, k_sparse_probe_batch_size=job["k_sparse_probe_batch_size"],
    )  # fmt: skip
    random.seed(job["seed"])
    np.random.seed(job["seed"])
    torch.manual_seed(job["seed"])
    (out / "saebench_results").mkdir(exist_ok=True)
    os.chdir(out)  # run_eval writes artifacts/absorption/*_k_sparse_probing.json under the working directory
    start = time.perf_counter()
    results = saebench_main.run_eval(config, [("ours", sae)], "cpu", str(out / "saebench_results"), force_rerun=True)
    eval_seconds = time.perf_counter() - start

    # what SAEBench does not report: its ground-truth probe's accuracy and F1 over all 26 letters
    data = np.load(probes_dir / "data.npz")
    probe = torch.load(probes_dir / "probe.pth", weights_only=False).float()
    with torch.no_grad():
        logits_WC = probe(torch.from_numpy(data["X_test"]).float())
    y_W = torch.from_numpy(data["y_test"]).long()
    f1 = [f1_of(logits_WC[:, c] > 0, y_W == c) for c in range(26)]
    for kept in ("data.npz", "train_df.csv", "test_df.csv"):
        shutil.copy(probes_dir / kept, out / f"saebench_{kept}")
    torch.save({"weight": probe.weights.detach(), "bias": probe.biases.detach()}, out / "saebench_probe.pt")
    sae_name = "ours_custom_sae"
    parquet = common.RESULTS_DIR / "feature_absorption" / sae_name / f"layer_{hook_layer}_{sae_name}.parquet"
    shutil.copy(parquet, out / "saebench_words.parquet")  # per word: prompt, fraction, full absorption
    k_sparse = json.loads((out / "artifacts" / "absorption" / f"{sae_name}_k_sparse_probing.json").read_text())
    per_letter = {}
    for row in k_sparse:
        k = len(row["split_feats"])
        per_letter[row["letter"]] = {
            "probe_f1": row["f1_probe"], "latents": row["split_feats"], "f1": row[f"f1_sparse_sae_{k}"],
            "f1_k1": row["f1_sparse_sae_1"],
        }  # fmt: skip
    output = results.get(sae_name) if results else None
    if output is not None:
        for detail in output["eval_result_details"]:
            per_letter[detail["first_letter"]].update(
                absorption_fraction=detail["mean_absorption_fraction"],
                full_absorption_rate=detail["full_absorption_rate"],
                probe_true_positives=detail["num_probe_true_positives"],
            )
    mean = output["eval_result_metrics"]["mean"] if output else {}
    return {
        "build_seconds": build_seconds, "eval_seconds": eval_seconds, "check": check, "hook": hook,
        "metadata_restored": restored,
        "words": len(job["words"]) if job["words"] is not None else "all",
        "mean_absorption_fraction": mean.get("mean_absorption_fraction_score"),
        "mean_full_absorption_rate": mean.get("mean_full_absorption_score"),
        "mean_main_latents": mean.get("mean_num_split_features"),
        "letters_scored": len(output["eval_result_details"]) if output else 0,
        "probe": {
            "train_words": len(data["y_train"]), "test_words": len(y_W),
            "accuracy": float((logits_WC.argmax(1) == y_W).float().mean()),
            "mean_f1": sum(f1) / 26, "letters_above_f1_min": sum(f > 0.6 for f in f1),
        },
        "letters": per_letter,
    }  # fmt: skip


def f1_of(predicted, truth) -> float:
    tp = float((predicted & truth).sum())
    denominator = float(predicted.sum() + truth.sum())
    return 2 * tp / denominator if denominator else 0.0


def run_saebench(python: str, job: dict) -> dict:
    """SAEBench's side in its own interpreter: this file with --side saebench; its result JSON."""
    job_path = Path(job["out"]) / "saebench_job.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    log = Path(job["out"]) / "saebench.log"
    with open(log, "w") as f:  # -P: not this folder first on sys.path (benchmarks/select.py would shadow select)
        done = subprocess.run([python, "-P", os.path.abspath(__file__), "--side", "saebench", str(job_path)], stdout=f,
                              stderr=subprocess.STDOUT, env=env, cwd=job["out"])  # fmt: skip
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"SAEBench side failed (exit {done.returncode}); {log}:\n" + "\n".join(tail))
    return json.loads((Path(job["out"]) / "saebench_result.json").read_text())


# -- the comparison ---------------------------------------------------------------------------------
def summary_ours(measured: dict) -> dict:
    r = measured["result"]
    scored = [e for e in r["letters"].values() if "absorption_fraction" in e]
    return {
        "seconds": measured["seconds"], "words": r["probe"]["words"],
        "mean_absorption_fraction": r["mean_absorption_fraction"],
        "mean_full_absorption_rate": r["mean_full_absorption_rate"],
        "letters_scored": r["letters_scored"],
        "mean_main_latents": sum(len(e["latents"]) for e in scored) / len(scored) if scored else None,
        "mean_main_latents_all_letters": r["mean_main_latents"],
        "probe": {key: r["probe"][key] for key in ("train_words", "test_words", "accuracy", "mean_f1",
                                                   "letters_above_f1_min")},
        "letters": r["letters"],
    }  # fmt: skip


def report(sides: dict) -> None:
    def cell(value, fmt="{:.3f}"):
        return "—" if value is None else fmt.format(value) if isinstance(value, float) else str(value)

    names = list(sides)
    rows = [
        ("words (train / test)", lambda s: f"{s['probe']['train_words']} / {s['probe']['test_words']}"),
        ("probe 26-way accuracy", lambda s: cell(s["probe"]["accuracy"])),
        ("probe mean F1 (26 letters)", lambda s: cell(s["probe"]["mean_f1"])),
        ("letters with probe F1 > 0.6", lambda s: cell(s["probe"]["letters_above_f1_min"])),
        ("letters scored", lambda s: cell(s["letters_scored"])),
        ("mean absorption fraction", lambda s: cell(s["mean_absorption_fraction"])),
        ("mean full absorption rate", lambda s: cell(s["mean_full_absorption_rate"])),
        ("main latents (scored letters)", lambda s: cell(s["mean_main_latents"], "{:.2f}")),
        ("k-sparse F1 at the main latents", lambda s: cell(mean_of(s, "f1"))),
        ("seconds", lambda s: cell(s["seconds"], "{:.0f}")),
    ]
    print(f"{'':34}" + "".join(f"{n:>14}" for n in names))
    for label, get in rows:
        print(f"{label:34}" + "".join(f"{get(sides[n]):>14}" for n in names))
    print("\nper letter: probe F1, absorption fraction, full absorption rate, main latents")
    for c in LETTERS:
        line = f"  {c}"
        for n in names:
            e = sides[n]["letters"].get(c, {})
            line += f"   {cell(e.get('probe_f1'), '{:.2f}')} {cell(e.get('absorption_fraction'))} "
            line += f"{cell(e.get('full_absorption_rate'))} {e.get('latents', [])}"
        print(line)


def mean_of(side: dict, key: str) -> float | None:
    values = [e[key] for e in side["letters"].values() if key in e]
    return sum(values) / len(values) if values else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="one of our run directories (read only)")
    parser.add_argument("--words", type=int, default=4000, help="alphabetic tokens sampled (our --absorption-words)")
    parser.add_argument("--seed", type=int, default=0, help="our --absorption-seed, and SAEBench's seeds")
    parser.add_argument("--saebench-python", default=os.environ.get("SAEBENCH_PYTHON"),
                        help="the SAEBench venv's python (default $SAEBENCH_PYTHON; none: our side only)")  # fmt: skip
    parser.add_argument("--saebench-full-vocab", action="store_true", help="SAEBench on every alphabetic token")
    parser.add_argument("--llm-batch-size", type=int, default=10, help="SAEBench's re-prompting batch")
    parser.add_argument("--k-sparse-probe-batch-size", type=int, default=4096, help="SAEBench's L1 probe batch")
    parser.add_argument("--skip-ours", action="store_true", help="sample our words but do not run our measure")
    parser.add_argument("--out", help="where both sides' outputs go (default: a temporary directory)")
    parser.add_argument("--tiny", action="store_true", help="seconds: our side on a tiny GPT-2, no SAEBench")
    parser.add_argument("--model", help="--tiny: this model directory instead of building the tiny GPT-2")
    parser.add_argument("--side", choices=["saebench"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side == "saebench":  # the child, in SAEBench's venv: args.run is the job file
        job = json.loads(Path(args.run).read_text())
        result = saebench_side(job)
        (Path(job["out"]) / "saebench_result.json").write_text(json.dumps(result, indent=1))
        return
    if not args.tiny and args.run is None:
        parser.error("give a run directory, or --tiny")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp).resolve()
        out.mkdir(parents=True, exist_ok=True)
        sides = compare(args, out, Path(tmp))
    print(json.dumps(sides))


def compare(args, out: Path, tmp: Path) -> dict:
    from sae.harvest.model import load_model
    from sae.train.rundir import load_sae

    if args.tiny:
        loaded, sae, site, layer = tiny_setup(tmp, args.model)
        args.words = TINY["words"]
        model_name = "tiny-gpt2"
    else:
        run_dir = Path(args.run).resolve()
        model_name, site, layer = site_of(run_dir)
        loaded, sae = load_model(model_name), load_sae(run_dir).eval()
    print(f"{model_name} {site} {layer}: our measure on {args.words:,} words, seed {args.seed}", flush=True)
    sides = {}
    if args.skip_ours:
        from sae.evaluate.absorption import alphabetic_tokens

        measured = {
            "words": [t for _, t in random.Random(args.seed).sample(alphabetic_tokens(loaded.tokenizer), args.words)]
        }
    else:
        measured = ours(loaded, sae, site, layer, args.words, args.seed)
        sides["ours"] = summary_ours(measured)
        (out / "ours_result.json").write_text(json.dumps(sides["ours"], indent=1))
    reference = reference_rows(loaded, sae, site, layer, measured["words"], args.seed)
    torch.save(reference, out / "reference.pt")
    if args.tiny or not args.saebench_python:
        why = "--tiny runs our side only" if args.tiny else "no --saebench-python / $SAEBENCH_PYTHON given"
        print(
            f"SAEBench not available: {why}; the cross-check needs sae-bench 0.6.0 in its own venv (see the docstring)"
        )
        sides["saebench"] = None
    else:
        job = {
            "out": str(out), "run_dir": str(run_dir), "model_dir": str(loaded.model.name_or_path),
            "model_name": model_name, "site": site, "layer": layer, "seed": args.seed,
            "words": None if args.saebench_full_vocab else measured["words"], "reference": str(out / "reference.pt"),
            "llm_batch_size": args.llm_batch_size, "k_sparse_probe_batch_size": args.k_sparse_probe_batch_size,
        }  # fmt: skip
        train_words = int(0.8 * len(measured["words"]))
        if job["words"] is not None and args.k_sparse_probe_batch_size >= train_words:
            print(
                f"note: SAEBench's L1 probe batch {args.k_sparse_probe_batch_size} ≥ its {train_words:,} training "
                "words: one step an epoch (--k-sparse-probe-batch-size 400 gives 8, as ours)"
            )
        result = run_saebench(args.saebench_python, job)
        check = result["check"]
        print(
            f"TransformerLens vs ours at {result['hook']}: tokens equal {check['tokens_equal']}, max abs diff "
            f"{check['acts_max_abs_diff']:.2e} (values up to {check['acts_max_abs']:.0f}), at the word "
            f"{check['word_acts_max_abs_diff']:.2e}; SAELens latents vs ours {check['latents_max_abs_diff']:.2e}"
        )
        result["seconds"] = result["build_seconds"] + result["eval_seconds"]
        sides["saebench"] = result
    measured_sides = {name: side for name, side in sides.items() if side is not None}
    if measured_sides:
        report(measured_sides)
    return sides


if __name__ == "__main__":
    main()
