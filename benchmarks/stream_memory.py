"""Peak memory of `sae train --stream` against its window (docs/training.md).

    python -m benchmarks.stream_memory                  # the embedded SmolLM2, layer 6, 20 chunks of 16,384 tokens
    python -m benchmarks.stream_memory --tiny           # a tiny GPT-2, in seconds

Each window size is one `sae train --stream` in a child process (the same sweep, tokens and seed), whose
peak resident set size the kernel reports when it ends (wait4's ru_maxrss). The last window holds the
whole stream: what the bound saves.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.models import tiny_gpt2

FULL = {"model": "smollm2-135m", "layer": 6, "ctx_len": 128, "chunk_contexts": 128, "chunks": 20, "dict_size": 2304,
        "windows": (5, 10, 20)}  # fmt: skip
TINY = {
    "model": None,
    "layer": 1,
    "ctx_len": 32,
    "chunk_contexts": 8,
    "chunks": 16,
    "dict_size": 64,
    "windows": (5, 16),
}
BUFFER_CHUNKS, HOLDOUT = 4, 1


def stream_run(p: dict, out: Path, window_chunks: int) -> dict:
    """One streamed training with a window of window_chunks chunks: its peak RSS and wall time."""
    chunk_rows = p["ctx_len"] * p["chunk_contexts"]
    args = [
        sys.executable, "-m", "sae", "train", "--stream", "--model", p["model"], "--layer", str(p["layer"]),
        "--ctx-len", str(p["ctx_len"]), "--chunk-contexts", str(p["chunk_contexts"]),
        "--tokens", str((p["chunks"] - HOLDOUT) * chunk_rows), "--arch", "batchtopk", "--k", "32" if p["dict_size"] > 64 else "4",
        "--dict-size", str(p["dict_size"]), "--batch-size", str(chunk_rows // 2), "--buffer-chunks", str(BUFFER_CHUNKS),
        "--device", "cpu", "--out", str(out / f"runs-{window_chunks}"),
    ]  # fmt: skip
    args += ["--stream-window", str(window_chunks * chunk_rows)]
    start = time.perf_counter()
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {status}")
    return {
        "window_chunks": window_chunks, "window_rows": window_chunks * chunk_rows,
        "peak_rss_mib": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - start,
    }  # fmt: skip


def measure(p: dict, out: Path) -> list[dict]:
    return [stream_run(p, out, w) for w in p["windows"]]


def report(rows: list[dict], p: dict) -> None:
    print(
        f"sae train --stream, {p['chunks']} chunks of {p['ctx_len'] * p['chunk_contexts']:,} tokens, buffer {BUFFER_CHUNKS} chunks"
    )
    print(f"{'window (chunks)':>16} {'window (rows)':>14} {'peak RSS (MiB)':>15} {'wall (s)':>9}")
    for r in rows:
        print(f"{r['window_chunks']:>16} {r['window_rows']:>14,} {r['peak_rss_mib']:>15,.0f} {r['seconds']:>9.1f}")
    print(json.dumps(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--model", help="--tiny: a tiny model directory (default: one built here)")
    args = parser.parse_args(argv)
    p = dict(TINY if args.tiny else FULL)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            p["model"] = args.model or str(tiny_gpt2(Path(tmp) / "tiny-gpt2"))
        report(measure(p, Path(tmp)), p)


if __name__ == "__main__":
    main()
