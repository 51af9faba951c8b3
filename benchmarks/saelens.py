"""Our trainer against SAELens's own, side by side on the same rows, shapes and batch size.

    pip install -e ".[saelens]"                         # sae-lens 6.54.12
    python -m benchmarks.saelens                        # planted rows; d 576, m 4608, k 32, B 1024
    python -m benchmarks.saelens --cache PATH           # rows of one of our caches (real activations)
    python -m benchmarks.saelens --tiny                 # d 64, m 512, k 8, B 128, 16 steps: seconds

Ours is `run_training` on a cache holding the rows (the loader, the step, θ, the metrics: the trainer
as `sae train` runs it, tok/s from its own metrics.jsonl after the first logging window). Theirs is
sae_lens's SAETrainer.fit() on BatchTopKTrainingSAE / TopKTrainingSAE, fed the same training rows
from memory (their data provider is an iterator of batches), timed from the batch after the warm-up
to the end of fit(). Their settings are their runner config's defaults (Adam betas 0.9/0.999, lr
3e-4, decoder init norm 0.1, acts rescaled by decoder norm, AuxK with k_aux = d/2), except the
dead-feature window, set to our dead_tokens / B steps so that both run AuxK in a short run.

Both see rows scaled so that E‖x‖ = √d (our default normalisation, done once here; neither
normalises again). Held-out FVU: the same rows (the cache's last chunk, never trained on), the
training form of each SAE (the top B·k of each batch of B for BatchTopK, the top k per row for TopK).
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's progress bar; ours is off below

import torch  # noqa: E402

from benchmarks import parse_with_tiny  # noqa: E402
from sae.cache.store import open_cache  # noqa: E402
from sae.train.config import TrainConfig  # noqa: E402
from sae.train.rundir import load_sae  # noqa: E402
from sae.train.trainer import run_training  # noqa: E402
from tests.synthetic import planted_acts, write_cache  # noqa: E402

CTX_LEN, HELD_BATCHES, LOG_EVERY = 128, 8, 5
# --tiny: 16 steps, so that two logging windows follow the warm-up one
TINY = {"steps": 16, "d": 64, "m": 512, "k": 8, "B": 128}


def rows(cache: Path | None, n_train: int, n_held: int, d: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows), scaled so E‖x‖ = √d: a cache's first and last rows, or planted ones."""
    if cache is None:
        n = n_train + n_held
        x_RD = torch.cat([planted_acts(min(8192, n - r), d, 4 * d, k, seed=r) for r in range(0, n, 8192)])
    else:
        c = open_cache(cache)
        layer = c.layers[0]
        held, first_held = [], c.n_chunks  # from the end: the last chunk may hold only a few rows
        while sum(map(len, held)) < n_held and first_held > 0:
            first_held -= 1
            held.insert(0, c.read_acts(layer, first_held).float())
        train, chunk = [], 0
        while sum(map(len, train)) < n_train and chunk < first_held:
            train.append(c.read_acts(layer, chunk).float())
            chunk += 1
        if sum(map(len, train)) < n_train:
            raise SystemExit(f"cache {cache} has too few rows for {n_train:,} training and {n_held:,} held-out ones")
        x_RD = torch.cat([torch.cat(train)[:n_train], torch.cat(held)[-n_held:]])
    x_RD *= x_RD.shape[1] ** 0.5 / x_RD[:n_train].norm(dim=1).mean()
    return x_RD[:n_train], x_RD[n_train:]


@torch.no_grad()
def fvu(recon, held_RD: torch.Tensor, B: int) -> float:
    err = sum(float((recon(x_BD) - x_BD).double().square().sum()) for x_BD in held_RD.split(B))
    return err / float((held_RD - held_RD.mean(0)).double().square().sum())


def ours(arch: str, train_RD, held_RD, m: int, k: int, B: int, tmp: Path) -> dict:
    chunk_contexts = len(held_RD) // CTX_LEN  # the held-out rows are exactly the last chunk
    cache = write_cache(tmp / "cache", torch.cat([train_RD, held_RD]), CTX_LEN, chunk_contexts)
    cfg = TrainConfig(
        arch=(arch,), k=(k,), dict_size=(m,), batch_size=B, normalize="none", tokens=len(train_RD),
        log_every=LOG_EVERY, checkpoint_every=10**9, out=tmp / "runs", theta="eq7",
    )  # fmt: skip
    (run_dir,) = run_training(cfg, cache)
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [w for w in windows if "tokens_per_s" in w]
    # tokens of each window after the first (the warm-up)
    timed = [(w["step"] - before["step"]) * B for before, w in zip(windows, windows[1:], strict=False)]
    seconds = sum(tokens / w["tokens_per_s"] for tokens, w in zip(timed, windows[1:], strict=True))
    sae = load_sae(run_dir).eval()
    return {"tok_s": sum(timed) / seconds, "fvu": fvu(lambda x: sae(x).recon_BD, held_RD, B)}


def fit_saelens(arch: str, batches, n_rows: int, d: int, m: int, k: int, B: int, seed: int = 49, lr: float = 3e-4,
                **trainer_fields):  # fmt: skip
    """A SAELens BatchTopK or TopK training SAE, seeded, stepped by its own SAETrainer.fit() on `batches`
    (an iterator of [B, d] rows, n_rows in all) with its runner's defaults (lr_end lr / 10) but
    trainer_fields; returned after fit()."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    config, model = {
        "batchtopk": (BatchTopKTrainingSAEConfig, BatchTopKTrainingSAE),
        "topk": (TopKTrainingSAEConfig, TopKTrainingSAE),
    }[arch]
    torch.manual_seed(seed)
    sae = model(config(d_in=d, d_sae=m, k=k, device="cpu", dtype="float32"))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=n_rows, train_batch_size_samples=B, lr=lr, lr_end=lr / 10, device="cpu",
        **trainer_fields,
    )  # fmt: skip
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches).fit()
    return sae


def theirs(arch: str, train_RD, held_RD, m: int, k: int, B: int, dead_tokens: int) -> dict:
    stamps = []

    def batches():
        for x_BD in train_RD.split(B):
            stamps.append(time.perf_counter())
            yield x_BD

    n, d = train_RD.shape
    sae = fit_saelens(arch, batches(), n, d, m, k, B, dead_feature_window=dead_tokens // B)
    end = time.perf_counter()
    sae.eval()
    timed = len(stamps) - LOG_EVERY  # the same warm-up as ours
    return {
        "tok_s": timed * B / (end - stamps[LOG_EVERY]),
        "fvu": fvu(lambda x: sae.decode(sae.encode_with_hidden_pre(x)[0]), held_RD, B),
    }


def measure(cache: Path | None = None, steps: int = 48, d: int = 576, m: int = 4608, k: int = 32, B: int = 1024,
            archs: tuple[str, ...] = ("batchtopk", "topk")) -> dict:  # fmt: skip
    import sae_lens

    steps = -(-steps // HELD_BATCHES) * HELD_BATCHES  # whole chunks of HELD_BATCHES batches
    if cache is not None:
        d = open_cache(cache).d_model
    train_RD, held_RD = rows(cache, steps * B, HELD_BATCHES * B, d, k)
    result = {"device": "cpu", "data": str(cache) if cache else "planted", "d": d, "m": m, "k": k, "batch": B}
    result.update(steps=steps, tokens=steps * B, heldout_rows=len(held_RD), sae_lens=sae_lens.__version__)
    result.update(threads=torch.get_num_threads(), load_average=os.getloadavg()[0], archs={})
    dead_tokens = TrainConfig().dead_tokens
    for arch in archs:
        with tempfile.TemporaryDirectory() as tmp:
            a = ours(arch, train_RD, held_RD, m, k, B, Path(tmp))
        b = theirs(arch, train_RD, held_RD, m, k, B, dead_tokens)
        result["archs"][arch] = {"ours": a, "sae_lens": b, "tok_s_ratio": a["tok_s"] / b["tok_s"]}
    return result


def report(r: dict) -> None:
    print(f"ours vs SAELens {r['sae_lens']} on {r['device']}, threads {r['threads']}, data {r['data']}")
    print(f"  d {r['d']}, m {r['m']}, k {r['k']}, B {r['batch']}, {r['tokens']:,} training tokens each")
    print(f"  load average before the run {r['load_average']:.2f} (other processes skew CPU timings)")
    for arch, s in r["archs"].items():
        a, b = s["ours"], s["sae_lens"]
        print(
            f"  {arch:9s} ours {a['tok_s']:8,.0f} tok/s, SAELens {b['tok_s']:8,.0f} tok/s: {s['tok_s_ratio']:5.2f}x"
            f"   held-out FVU ours {a['fvu']:.4f}, SAELens {b['fvu']:.4f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help=f"the defaults below become {TINY}")
    parser.add_argument("--cache", type=Path, default=None, help="a cache of ours (default: planted rows)")
    parser.add_argument("--steps", type=int, default=48, help="training steps of each SAE")
    parser.add_argument("--d", type=int, default=576, help="planted rows' width (a cache has its own)")
    parser.add_argument("--m", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024, dest="B")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parse_with_tiny(parser, argv, TINY)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.cache, args.steps, args.d, args.m, args.k, args.B)
    report(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
