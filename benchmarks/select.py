"""BatchTopK selection alone, and the whole training step, against the code before them, in one run.

    python -m benchmarks.select                   # the paper's shape and the demo's, this device
    python -m benchmarks.select --quick           # demo shapes only
    python -m benchmarks.select --profile         # + torch.profiler of whole CPU steps at the demo's m 4608
    python -m benchmarks.select --tiny --profile  # d 64, m 512, k 8, B 256 only (profiled too): seconds (the tests)

"before" is this repo until the threshold path, kept below verbatim: the selection was `flatten().topk(B·k)`
over the whole batch matrix, then a float64 sort of the kept indices to group them by row, the
forward took the encoder's gradient through the dense [B, m] pre-activations, AuxK a top-k over
every column, and the decode embedding_bag's own backward. "now" is train.sae as the trainer runs
it: `select_batchtopk` (on CPU the sampled-threshold path, on CUDA the plain top-k path), the
encoder's gradient at the kept entries (KeptEncoderGrad, with the sparse decode), AuxK over the dead
columns, and the W_dec and W_enc gradients grouped by one int32 sort (column_order). The step is also timed with
the new selection in the old forward ("new selection only"), which splits the gain. Inputs are the
pre-activations of a freshly initialised SAE on planted standardised rows; both selections must
return the same entries. Every step runs AuxK: a tenth of the latents start dead, as in a run under
way.
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor

import sae.train.sparse as sparse_module
from benchmarks.step import top_ops
from benchmarks.train import tokens_per_s
from sae.train.archs import SAEOutput
from sae.train.archs.topk import TopK, fired
from sae.train.config import TrainConfig
from sae.train.sparse import Active, decode_dense, select_batchtopk, select_topk
from sae.train.state import DeadLatents, make_optimizer, make_sae
from sae.train.trainer import configure_backend, train_step
from tests.synthetic import planted_acts

# (name, d, m, k, B): the paper's GPT-2 small layer 8 and the demo's SmolLM2-135M layer 6
PAPER = ("paper", 768, 12288, 32, 4096)
DEMO = (("demo m2304", 576, 2304, 32, 1024), ("demo m4608", 576, 4608, 32, 1024))
DEMO_B4096 = ("demo B4096", 576, 4608, 32, 4096)
TINY = ("tiny", 64, 512, 8, 256)


def select_before(pre_BM: torch.Tensor, k: int) -> Active:
    """The selection before the threshold path, verbatim: a full top-k, then a row sort."""
    B, M = pre_BM.shape
    top = pre_BM.flatten().topk(B * k, sorted=False)
    # Sorted as float64 (exact below 2^53): torch 2.13's CPU int64 sort took 170 ms for 32k indices,
    # the float64 one 3.5 ms.
    flat_f, order_N = top.indices.double().sort()
    flat_N = flat_f.long()
    rows_N = flat_N // M
    counts_B = torch.bincount(rows_N, minlength=B)
    return Active(rows_N, flat_N % M, top.values[order_N], counts_B.cumsum(0) - counts_B)


def decode_sparse_before(active: Active, W_dec_MD: Tensor) -> Tensor:
    """The sparse decode before, verbatim: embedding_bag's own backward (an int64 sort of the columns)."""
    return F.embedding_bag(active.cols_N, W_dec_MD, active.offsets_B, mode="sum", per_sample_weights=active.acts_N)


class BeforeBatchTopK(TopK):
    """The forward before the threshold path, verbatim: autograd through the dense pre-activations,
    AuxK's top-k over every column; `select_fn` is its BatchTopK selection (topk: select_topk)."""

    def __init__(self, spec, cfg, select_fn=select_before):
        super().__init__(spec, cfg)
        self.select_fn = select_topk if spec.arch == "topk" else select_fn

    def forward(self, sae, x_BD: Tensor, aux_k: int) -> SAEOutput:
        pre_BM = F.relu(x_BD @ sae.W_enc - sae.b_dec @ sae.W_enc + sae.b_enc)
        zero = pre_BM.new_zeros(())
        active = self.select_fn(pre_BM, self.spec.k)
        decode = decode_sparse_before if sae.sparse_decode else decode_dense
        recon_BD = decode(active, sae.W_dec) + sae.b_dec
        l0_B, fired_M = fired(active, len(x_BD), sae.m)
        aux = self.aux_coeff * self.auxk_before(sae, x_BD, recon_BD, pre_BM, aux_k) if aux_k else zero
        mse = sae.mse(recon_BD, x_BD)
        return SAEOutput(recon_BD, active, l0_B, fired_M, mse, zero, aux, mse + zero + aux)

    def auxk_before(self, sae, x_BD: Tensor, recon_BD: Tensor, pre_BM: Tensor, aux_k: int) -> Tensor:
        dead_M = sae.dead_M()
        active = select_topk(pre_BM * dead_M, min(aux_k, sae.m))  # live latents score 0 and add nothing
        decode = decode_sparse_before if sae.sparse_decode else decode_dense
        residual_BD = (x_BD - recon_BD).detach()
        return (decode(active, sae.W_dec).float() - residual_BD.float()).square().mean() * dead_M.any()


def step_fn(cfg: TrainConfig, d: int, device: torch.device, select=None):
    """One training step of the trainer (train_step) on standardised rows; `select`: the forward before, with it."""
    sae = make_sae(cfg, cfg.specs()[0], d, device)
    if select is not None:  # the same initial weights, the old forward
        sae.arch = BeforeBatchTopK(sae.spec, cfg, select)
    sae.tokens_since_fired_M[: sae.m // 10] = cfg.dead_tokens  # a tenth dead: AuxK runs
    opt = make_optimizer(cfg, sae)
    dead = DeadLatents(sae)
    return lambda x_BD: train_step(sae, sae, opt, x_BD, cfg, world=1, dead=dead).mse.detach()


def rows(n: int, d: int, k: int, seed: int = 0) -> torch.Tensor:
    """Planted rows, standardised as the benchmark step does; in pieces (planted_acts holds [n, 4d] int64)."""
    x_ND = torch.cat([planted_acts(min(8192, n - r), d, 4 * d, k, seed=seed + r) for r in range(0, n, 8192)]) * 3
    return (x_ND - x_ND.mean(-1, keepdim=True)) / (x_ND.std(-1, keepdim=True) + 1e-5)


def timed_ms(fn, device: torch.device, repeats: int) -> float:
    """Best of `repeats` calls after one untimed: the least disturbed by other processes."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def same_entries(a: Active, b: Active) -> bool:
    """The same kept entries, in the same order (the column order, made for gradients, is not compared)."""
    fields = ("rows_N", "cols_N", "acts_N", "offsets_B")
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields)


def measure_shape(name: str, d: int, m: int, k: int, B: int, device: torch.device, steps: int, repeats: int) -> dict:
    """Selection alone (ms) and the training step (tok/s), before vs now, at one shape."""
    cfg = TrainConfig(arch=("batchtopk",), k=(k,), dict_size=(m,), batch_size=B)
    sae = make_sae(cfg, cfg.specs()[0], d, device)
    x_ND = rows(B * (steps + 1), d, k).to(device)
    with torch.no_grad():
        pre_BM = sae.pre_acts(x_ND[:B])
    # Both must keep the same entries; "before" in its own order, so compare after the row sort
    # it already did (no ties on this real-valued batch, so topk's set is unique).
    assert same_entries(select_before(pre_BM, k), select_batchtopk(pre_BM, k)), f"{name}: selections differ"
    out = {"name": name, "d": d, "m": m, "k": k, "batch": B}
    # interleaved, best of each: a busy machine then penalises neither side
    ms = {"before": float("inf"), "now": float("inf")}
    for _ in range(2):
        for key, select in (("before", select_before), ("now", select_batchtopk)):
            ms[key] = min(ms[key], timed_ms(lambda s=select: s(pre_BM, k), device, repeats))
    out["select_ms"] = ms
    out["select_vs_before"] = ms["before"] / ms["now"]
    batches = list(x_ND.split(B))
    steps = {"before": select_before, "new selection only": select_batchtopk, "now": None}
    tok_s = dict.fromkeys(steps, 0.0)
    for _ in range(2):
        for key, select in steps.items():
            step = step_fn(cfg, d, device, select)
            tok_s[key] = max(tok_s[key], tokens_per_s(step, batches, device, warmup=1)[0])
    out["step_tok_s"] = tok_s
    out["step_vs_before"] = tok_s["now"] / tok_s["before"]
    out["selection_only_vs_before"] = tok_s["new selection only"] / tok_s["before"]
    return out


def profile_step(d: int, m: int, k: int, B: int, steps: int = 4, top: int = 15) -> list[dict]:
    """torch.profiler over whole CPU training steps (selection as now): ops by self CPU time."""
    cfg = TrainConfig(arch=("batchtopk",), k=(k,), dict_size=(m,), batch_size=B)
    step = step_fn(cfg, d, torch.device("cpu"))
    batches = list(rows(B * (steps + 1), d, k).split(B))
    step(batches[0])
    return top_ops(step, batches[1:], top)


def measure(quick: bool = False, steps: int = 2, repeats: int = 3, tiny: bool = False) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_backend(device, "tf32")
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    result.update(
        threads=torch.get_num_threads(), load_average=os.getloadavg()[0], select_env=sparse_module.SELECT_PATH
    )
    shapes = (TINY,) if tiny else DEMO if quick else (PAPER, *DEMO, DEMO_B4096)
    result["shapes"] = [measure_shape(*shape, device, steps, repeats) for shape in shapes]
    result["paper"] = next((s for s in result["shapes"] if s["name"] == "paper"), None)
    return result


def report(r: dict) -> None:
    print(f"BatchTopK selection on {r['device']}, threads {r['threads']}, SAE_SELECT={r['select_env']}")
    print(f"load average before the run {r['load_average']:.2f} (other processes skew CPU timings)")
    for s in r["shapes"]:
        ms, tok = s["select_ms"], s["step_tok_s"]
        print(
            f"  {s['name']:11s} d {s['d']:4d} m {s['m']:6d} k {s['k']} B {s['batch']:5d}: "
            f"select {ms['before']:8.1f} -> {ms['now']:7.1f} ms {s['select_vs_before']:5.2f}x   "
            f"step {tok['before']:7,.0f} -> {tok['now']:7,.0f} tok/s {s['step_vs_before']:5.2f}x "
            f"(new selection only {s['selection_only_vs_before']:4.2f}x)"
        )


def print_profile(events: list[dict], shape: tuple) -> None:
    print(f"profile of whole CPU training steps at d {shape[1]}, m {shape[2]}, k {shape[3]}, B {shape[4]}:")
    for e in events:
        print(f"  {e['op']:40s} {e['self_ms_per_step']:9.1f} ms/step  {e['share']:6.1%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the demo's shapes only")
    parser.add_argument("--tiny", action="store_true", help=f"the shape {TINY[1:]} only (profiled there too)")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per candidate and round")
    parser.add_argument("--profile", action="store_true", help="also profile whole CPU steps at the demo's m 4608")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.quick, args.steps, tiny=args.tiny)
    report(result)
    if args.profile:
        shape = TINY if args.tiny else DEMO[1]
        result["profile"] = {"shape": shape, "ops": profile_step(*shape[1:])}
        print_profile(result["profile"]["ops"], shape)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
