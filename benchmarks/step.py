"""One training step taken apart: how much of it is the encoder matmul, and where the rest goes.

    python -m benchmarks.step                  # the demo (d 576, m 2304, B 4096) and study (m 4608, B 1024) shapes
    python -m benchmarks.step --paper          # and the paper's d 768, m 12288, B 4096
    python -m benchmarks.step --contend        # also under one single-threaded job on the same cores
    python -m benchmarks.step --tiny           # d 64, m 512, B 256: seconds (the tests)
    python -m benchmarks.step --shape paper --device cuda --precision bf16   # on a GPU (benchmarks/gpu_check.sh)

For each shape and architecture (BatchTopK, TopK) in one run on this device: the step's median time
(train.trainer.train_step, what `sae train` runs for each SAE); the encoder matmul alone at the same
shapes, as torch.addmm [B, d] @ [d, m] (the issue's floor: MKL's sgemm on the CPU) and as the step
computes it (train.sae.encoder_product: oneDNN's on the CPU, 2.2x MKL's on AMD Zen 5), each with its
share of a step; the plain reference step (benchmarks.reference, BatchTopK) and our speed-up over it;
and the profiler's largest items per step. Rows are planted activations (tests.synthetic) unless
--cache names a cache of the shape's d. The addmm floor and the reference run as plain code runs, our
steps and their own matmul as `sae train` runs them: on the CPU after malloc is told to keep freed
memory (sae.device.keep_freed_memory), which gave the reference 17% and the fresh-output floor 18% at
the demo shape: measured the other way, the yardsticks move.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.reference import ReferenceSAE
from sae.cache.store import open_cache
from sae.device import resolve_device
from sae.train.config import TrainConfig
from sae.train.gate import Gate
from sae.train.inputs import InputSetup, geometric_median
from sae.train.sae import encoder_product, normalize_input
from sae.train.state import DeadLatents, make_optimizer, make_sae
from sae.train.trainer import configure_backend, train_step
from tests.synthetic import planted_acts

# name: (d, m, k, B)
SHAPES = {"demo": (576, 2304, 32, 4096), "study": (576, 4608, 32, 1024)}
PAPER = {"paper": (768, 12288, 32, 4096)}
TINY = {"tiny": (64, 512, 8, 256)}
ARCHS = ("batchtopk", "topk")
TOP_OPS = 10
CONTENDER = "import torch; torch.set_num_threads(1); a = torch.randn(512, 512)\nwhile True: a @ a"


def rows(d: int, B: int, n_batches: int, cache: str | None, device: torch.device) -> list[torch.Tensor]:
    """n_batches batches of B raw rows (each step standardises them, as `sae train` and the reference
    do): the cache's where its d is d, else planted."""
    if cache is None or open_cache(cache).d_model != d:
        x_ND = planted_acts(B * n_batches, d, 4 * d, 32, seed=0) * 3
    else:
        c = open_cache(cache)
        x_ND = torch.cat([c.read_acts(c.layers[0], i).float() for i in range(c.n_chunks)])[: B * n_batches]
        if len(x_ND) < B * n_batches:
            raise SystemExit(f"--cache {cache} holds fewer than {B * n_batches} rows")
    return [x_BD.to(device) for x_BD in x_ND.split(B)]


def median_ms(fn, batches: list[torch.Tensor], warmup: int = 3) -> float:
    """Median wall time of fn(x) over the batches after `warmup` untimed calls (on CUDA, to the end of its
    kernels)."""
    sync = torch.cuda.synchronize if batches[0].is_cuda else lambda: None
    for x in batches[:warmup]:
        fn(x)
    times = []
    for x in batches[warmup:]:
        sync()
        start = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def our_step(arch: str, m: int, k: int, first_BD: torch.Tensor, precision: str = "tf32"):
    """train_step of one fresh SAE as the trainer makes and calls it, b_dec at the geometric median of the
    first batch (without it a fifth of the latents are dead within 5 steps, and AuxK's work over them,
    rare in a real run, dominates the step)."""
    B, d = first_BD.shape
    cfg = TrainConfig(arch=(arch,), k=(k,), dict_size=(m,), batch_size=B, precision=precision)
    (spec,) = cfg.specs()
    b_dec_D = geometric_median(normalize_input(first_BD, cfg.normalize)[0])
    sae = make_sae(cfg, spec, d, first_BD.device, InputSetup(Gate(), 1.0, 0.0, b_dec_D))
    opt, dead = make_optimizer(cfg, sae), DeadLatents(sae)
    return lambda x: train_step(sae, sae, opt, x, cfg, 1, dead)


def matmul(d: int, m: int, B: int, device: torch.device, precision: str = "tf32", kernel: str = "addmm"):
    """The encoder's forward matmul alone at the step's precision (bf16: autocast's). kernel "addmm":
    torch.addmm into a fresh output, the issue's floor (MKL's sgemm on the CPU); "step": the product as
    the sparse step computes it (train.sae.encoder_product without autograd: oneDNN's on the CPU)."""
    W_MD, bias_M = torch.randn(m, d, device=device) / d**0.5, torch.zeros(m, device=device)

    def encode(x_BD):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"), torch.no_grad():
            if kernel == "step":
                return encoder_product(bias_M, x_BD, W_MD)
            return torch.addmm(bias_M, x_BD, W_MD.t())

    return encode


def top_ops(step, batches: list[torch.Tensor], top: int = TOP_OPS) -> list[dict]:
    """The profiler's largest items over steps on the batches, by self time (on CUDA: kernel time): each
    op's calls and ms per step and its share of all the profiled time."""
    cuda = batches[0].is_cuda
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for x in batches:
            step(x)
        if cuda:
            torch.cuda.synchronize()
    n = len(batches)
    us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    averages = sorted(prof.key_averages(), key=us, reverse=True)
    total = sum(us(e) for e in averages)
    return [
        {"op": e.key, "calls": e.count // n, "self_ms_per_step": us(e) / 1e3 / n, "share": us(e) / total}
        for e in averages[:top]
    ]


def measure(shapes: dict, steps: int, cache: str | None, contend: bool, device: torch.device = torch.device("cpu"),
            precision: str = "tf32") -> list[dict]:  # fmt: skip
    """The floors and the reference run first, as plain code runs (glibc's malloc as it comes); then our
    steps as `sae train` runs them, after configure_backend (which on the CPU makes malloc keep freed
    memory: for the whole process, hence second). On CUDA configure_backend sets TF32 for all of them."""
    if device.type == "cuda":
        configure_backend(device, precision)
    baselines = {}
    for shape, (d, m, k, B) in shapes.items():
        batches = rows(d, B, steps + 3, cache, device)
        base = {"batches": batches, "matmul_ms": median_ms(matmul(d, m, B, device, precision), batches)}
        base["reference_ms"] = median_ms(ReferenceSAE("batchtopk", d, m, k, device=device).step, batches)
        baselines[shape] = base
    configure_backend(device, precision)
    results = []
    for shape, (d, m, k, B) in shapes.items():
        batches = baselines[shape].pop("batches")
        kernel = matmul(d, m, B, device, precision, kernel="step")
        baselines[shape]["kernel_ms"] = median_ms(kernel, batches)
        if contend:  # the step's own matmul, beside the same job
            with contender():
                baselines[shape]["contended_matmul_ms"] = median_ms(kernel, batches)
        for arch in ARCHS:
            step = our_step(arch, m, k, batches[0], precision)
            step_ms = median_ms(step, batches)
            result = {"shape": shape, "d": d, "m": m, "k": k, "B": B, "arch": arch, "step_ms": step_ms}
            result.update(device=str(device), precision=precision, **baselines[shape])
            result["tok_s"] = B / step_ms * 1e3
            result["ops"] = top_ops(step, batches[-3:])
            if contend:
                with contender():
                    result["contended_step_ms"] = median_ms(our_step(arch, m, k, batches[0], precision), batches)
            results.append(result)
    return results


class contender:
    """One single-threaded job busy on the same cores while the block runs."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", CONTENDER])
        time.sleep(1.0)  # past its import

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def report(results: list[dict]) -> None:
    where = f"{results[0]['device']}, {results[0]['precision']}" if results else ""
    print(f"# {where}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    print("| shape | arch | step ms | tok/s | addmm ms | its share | step's matmul ms | its share "
          "| reference ms | vs reference |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        name = f"d {r['d']}, m {r['m']}, B {r['B']}"
        share, kernel_share = r["matmul_ms"] / r["step_ms"], r["kernel_ms"] / r["step_ms"]
        print(f"| {name} | {r['arch']} | {r['step_ms']:.1f} | {r['tok_s']:,.0f} | {r['matmul_ms']:.1f} | {share:.0%} "
              f"| {r['kernel_ms']:.1f} | {kernel_share:.0%} | {r['reference_ms']:.1f} "
              f"| {r['reference_ms'] / r['step_ms']:.2f}× |")  # fmt: skip
    for r in results:
        print(f"\n## {r['arch']}, d {r['d']}, m {r['m']}, B {r['B']}: largest items per step (self time)")
        print("| op | calls | ms | of step |\n|---|---:|---:|---:|")
        for e in r["ops"]:
            ms = e["self_ms_per_step"]
            print(f"| {e['op']} | {e['calls']} | {ms:.1f} | {ms / r['step_ms']:.0%} |")
        if "contended_step_ms" in r:
            step_x, matmul_x = r["contended_step_ms"] / r["step_ms"], r["contended_matmul_ms"] / r["kernel_ms"]
            print(f"beside one single-threaded job: step {r['contended_step_ms']:.1f} ms ({step_x:.2f}×), "
                  f"matmul {r['contended_matmul_ms']:.1f} ms ({matmul_x:.2f}×)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="also the paper's d 768, m 12288, B 4096")
    parser.add_argument("--tiny", action="store_true", help="d 64, m 512, k 8, B 256: seconds")
    parser.add_argument("--contend", action="store_true", help="also beside one single-threaded job")
    parser.add_argument("--shape", action="append", help="only this shape (demo, study, paper); repeatable")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per figure (default 10; tiny 3)")
    parser.add_argument("--cache", default=None, help="rows from this cache instead of planted ones")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--precision", default="tf32", choices=("fp32", "tf32", "bf16"), help="as sae train's")
    args = parser.parse_args(argv)
    shapes = TINY if args.tiny else {**SHAPES, **(PAPER if args.paper else {})}
    if args.shape:
        shapes = {name: shape for name, shape in {**SHAPES, **PAPER}.items() if name in args.shape}
    device = resolve_device(args.device)
    results = measure(shapes, args.steps or (3 if args.tiny else 10), args.cache, args.contend, device, args.precision)
    report(results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
