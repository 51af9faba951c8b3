"""A fixed, seeded pipeline on the embedded SmolLM2 keeps its numbers: the weights, every logged metric
but the timings, and every value of cfg.json, eval.json and latents.json that tests/golden/run.json
recorded (new keys may appear). Restructuring the code must not move them.

    python -m tests.test_golden OUT_DIR          # rewrite tests/golden/run.json (say why in the commit)
    python -m tests.test_golden OUT_DIR --exact  # compare, weights to the byte (same machine as the record)

The test compares floats to a relative 1e-4 (CI's CPU may round differently from the recording one);
weights by their sums and a strided sample. `--exact` also checks each tensor's sha256.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from sae.cli import app

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).parent / "golden" / "run.json"
RTOL, ATOL = 1e-4, 1e-6
LATENTS_RTOL = 2e-3  # latents.json rounds to 4 significant digits: one rounding step apart is the same
SAMPLE = 64  # strided values per tensor
DROP = {"versions", "tokens_per_s", "created", "updated"}  # what differs between machines and runs
COMMON = ["--device", "cpu"]


def sae(*args) -> str:
    """One `sae` command in this process; its stdout's last line (the result path)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        app([str(a) for a in args], standalone_mode=False)
    return out.getvalue().strip().splitlines()[-1]


def pipeline(root: Path) -> list[Path]:
    """Harvest 6,144 SmolLM2 tokens, train a sweep of every architecture and a gated, scaled BatchTopK
    with a snapshot, evaluate them all, inspect one; returns the run directories."""
    cache = sae(
        "harvest", "--model", "smollm2-135m", "--layer", "6", "--ctx-len", "64", "--tokens", "6144",
        "--chunk-contexts", "16", "--cache-dir", root / "caches", *COMMON,
    )  # fmt: skip
    train = ["--cache", cache, "--batch-size", "256", "--log-every", "5", "--checkpoint-every", "10", *COMMON]
    sae(
        "train", "--arch", "batchtopk,topk,jumprelu,relu", "--k", "16", "--dict-size", "1152",
        "--threshold-lr", "0.01", "--out", root / "runs", *train,
    )  # fmt: skip
    sae(
        "train", "--arch", "batchtopk", "--k", "16", "--dict-size", "1152", "--normalize", "scale",
        "--gate-norm", "4", "--b-dec-init", "zeros", "--snapshots", "2560", "--out", root / "gated", *train,
    )  # fmt: skip
    run_dirs = sorted((root / "runs").iterdir()) + sorted((root / "gated").iterdir())
    sae("eval", *run_dirs, "--tokens", "512", "--batch-size", "4", "--batch-mode", *COMMON)
    sae("inspect", run_dirs[0], "--top", "5", "--quantile-samples", "3", *COMMON)
    return run_dirs


def plain(value, root: str):
    """JSON values with machine-dependent keys dropped and the temporary root replaced."""
    if isinstance(value, dict):
        return {k: plain(v, root) for k, v in value.items() if k not in DROP}
    if isinstance(value, list):
        return [plain(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<root>")
    return value


def weights_record(path: Path) -> dict:
    record = {}
    for name, array in sorted(load_file(path).items()):
        flat = array.reshape(-1).astype("float64")
        stride = max(1, len(flat) // SAMPLE)
        record[name] = {
            "shape": list(array.shape),
            "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
            "sum": float(flat.sum()),
            "abs_sum": float(abs(flat).sum()),
            "sample": flat[::stride][:SAMPLE].tolist(),
        }
    return record


def latents_record(path: Path, root: str) -> dict:
    data = json.loads(path.read_text())
    latents = data.pop("latents")
    head = [{k: v for k, v in latent.items() if k not in ("quantiles", "top")} for latent in latents[:16]]
    tops = [[[example["row"], example["activation"]] for example in latent["top"]] for latent in latents[:16]]
    return {**plain(data, root), "head": head, "top": tops, "n_latents": len(latents)}


def record(root: Path, run_dirs: list[Path]) -> dict:
    runs = {}
    for run_dir in run_dirs:
        name = f"{run_dir.parent.name}/{run_dir.name}"
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[name] = {
            "weights": weights_record(run_dir / "sae_weights.safetensors"),
            "metrics": plain(metrics, str(root)),
            "cfg": plain(json.loads((run_dir / "cfg.json").read_text()), str(root)),
            "eval": plain(json.loads((run_dir / "eval.json").read_text()), str(root)),
        }
        for snapshot in sorted((run_dir / "snapshots").glob("*")):
            runs[f"{name}/snapshots/{snapshot.name}"] = {
                "weights": weights_record(snapshot / "sae_weights.safetensors"),
                "cfg": plain(json.loads((snapshot / "cfg.json").read_text()), str(root)),
            }
        if (run_dir / "inspect" / "latents.json").exists():
            runs[name]["latents"] = latents_record(run_dir / "inspect" / "latents.json", str(root))
    return runs


def differences(golden, new, where: str = "", exact: bool = False, rtol: float = RTOL) -> list[str]:
    """Where new departs from golden: a missing key, another value (floats to rtol), another type."""
    if isinstance(golden, dict):
        if not isinstance(new, dict):
            return [f"{where}: {new!r} is not a mapping"]
        found = []
        for key, value in golden.items():
            if key == "sha256" and not exact:
                continue
            if key not in new:
                found.append(f"{where}.{key}: missing")
            else:
                key_rtol = LATENTS_RTOL if key == "latents" else rtol
                found += differences(value, new[key], f"{where}.{key}", exact, key_rtol)
        return found
    if isinstance(golden, list):
        if not isinstance(new, list) or len(new) != len(golden):
            return [f"{where}: {new!r} differs in length from {golden!r}"]
        pairs = enumerate(zip(golden, new, strict=True))
        return [d for i, (a, b) in pairs for d in differences(a, b, f"{where}[{i}]", exact, rtol)]
    if isinstance(golden, float) and isinstance(new, int | float) and not isinstance(new, bool):
        close = new == pytest.approx(golden, rel=0 if exact else rtol, abs=0 if exact else ATOL, nan_ok=True)
        return [] if close else [f"{where}: {new!r}, recorded {golden!r}"]
    return [] if golden == new else [f"{where}: {new!r}, recorded {golden!r}"]


def test_a_fixed_run_keeps_every_recorded_number(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pipeline.toml: the defaults and the flags above
    found = differences(json.loads(GOLDEN.read_text()), record(tmp_path, pipeline(tmp_path)))
    assert not found, f"{len(found)} values moved, first ones: " + "; ".join(found[:10])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)
    new = record(out, pipeline(out))
    if "--exact" in sys.argv:
        found = differences(json.loads(GOLDEN.read_text()), new, exact=True)
        print("\n".join(found[:40]) or "every recorded value, weights to the byte, is the same")
        sys.exit(1 if found else 0)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(new, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
