"""Benchmark: `hf_sad.distillation.losses.adaptive_distillation_loss` vs a straightforward autograd formula, forward
+ backward.

    python bench/bench_losses.py [--quick] [--device cpu|cuda] [--json PATH]

What is measured, per size:
- time: median over repeats (after warm-up) of `loss = f(student, teacher); loss.backward()`, as wall time and as
  process CPU time (all threads). Both implementations are timed in one subprocess, alternating call by call, so that
  load from other processes on a shared machine hits both alike; CPU time is the steadier figure under such load.
- peak memory: extra peak memory of one cold forward + backward over what the inputs already hold, gradient included,
  each implementation in its own fresh subprocess. On CPU: the process's peak resident set (VmHWM, reset just before
  the call through /proc/self/clear_refs) minus its resident set before the call; on CUDA:
  `torch.cuda.max_memory_allocated` minus the memory allocated before the call.
- held: memory the autograd graph keeps between forward and backward (resident / allocated after the forward minus
  before it), measured in the same cold call.

`main(argv) -> dict` returns the figures (also written to `--json PATH`), for `bench/run.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from common import peak_rss_bytes, reset_peak_rss, rss_bytes  # bench/ is on sys.path: scripts run from it
from torch import Tensor

from hf_sad.distillation.losses import adaptive_distillation_loss

SIZES = {"cpu": (2, 20_000, 20), "coco": (8, 76_725, 80)}
IMPLS = ("reference", "library")
_TARGET_RATIO = 0.5
_LARGE_NUMEL = 10_000_000  # above this, fewer timing repeats (seconds per call on CPU)


def _reference_adl(
    student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 1.0, gamma: float = 2.0, power: float = 1.8
) -> Tensor:
    """Paper ADL written as one plain autograd formula (fp32, from logits with logsigmoid so it is finite too)."""
    s = student_logits.float()
    t = teacher_logits.detach().float()
    log_p, log_1mp = F.logsigmoid(s), F.logsigmoid(-s)
    log_q, log_1mq = F.logsigmoid(t), F.logsigmoid(-t)
    q = torch.sigmoid(t)
    kl = q * (log_q - log_p) + (1 - q) * (log_1mq - log_1mp)
    entropy = -(q * log_q + (1 - q) * log_1mq)
    weight = (1 - torch.exp(-(kl + beta * entropy))) ** gamma
    normalizer = (q**power).sum().clamp_min(1.0)
    return (weight * kl).sum() / normalizer


_FNS = {"reference": _reference_adl, "library": adaptive_distillation_loss}


def _make_inputs(shape: tuple[int, ...], device: str) -> tuple[Tensor, Tensor]:
    """RetinaNet-like logits (mostly confident background, prior -4.6) built in place, with no transient copies."""
    gen = torch.Generator(device=device).manual_seed(0)
    teacher = torch.randn(shape, generator=gen, device=device).mul_(2.0).sub_(4.6)
    student = torch.randn(shape, generator=gen, device=device).add_(teacher)
    return student.requires_grad_(), teacher


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step(fn, student: Tensor, teacher: Tensor) -> None:
    student.grad = None
    fn(student, teacher).backward()


def _memory_worker(impl: str, shape: tuple[int, ...], device: str) -> dict:
    """Held and peak memory of one cold forward + backward, in a fresh process; also returns the loss."""
    fn = _FNS[impl]
    student, teacher = _make_inputs(shape, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = fn(student, teacher)
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        exact = reset_peak_rss()
        before = rss_bytes()
        loss = fn(student, teacher)
        held = rss_bytes() - before
        loss.backward()
        peak = peak_rss_bytes() - before if exact else -1  # a lifetime peak would include imports and inputs
    return {"loss": float(loss), "peak_bytes": peak, "held_bytes": held}


def _time_worker(shape: tuple[int, ...], device: str, repeats: int, warmup: int) -> dict:
    """Wall and CPU times of both implementations, alternating call by call."""
    student, teacher = _make_inputs(shape, device)
    for _ in range(warmup):
        for fn in _FNS.values():
            _step(fn, student, teacher)
    wall: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    cpu: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for _ in range(repeats):
        for impl, fn in _FNS.items():
            _sync(device)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            _step(fn, student, teacher)
            _sync(device)
            wall[impl].append(time.perf_counter() - start_wall)
            cpu[impl].append(time.process_time() - start_cpu)
    return {
        impl: {
            "time_s": statistics.median(wall[impl]),
            "cpu_time_s": statistics.median(cpu[impl]),
            "min_time_s": min(wall[impl]),
            "times_s": wall[impl],
        }
        for impl in IMPLS
    }


def _subprocess(args: list[str], passive_omp: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE") if passive_omp else None
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _available_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _skip_reason(name: str, shape: tuple[int, ...], args: argparse.Namespace) -> str | None:
    if args.quick and name != "cpu":
        return "--quick runs the CPU-sized case only"
    # The reference keeps ~15 fp32 full-size tensors; ask for 24 to leave the machine some room.
    need = 24 * 4 * math.prod(shape)
    available = _available_bytes(args.device)
    if available < need:
        return f"needs ~{need / 2**30:.1f} GiB free, {available / 2**30:.1f} GiB available"
    return None


def _bench_size(name: str, shape: tuple[int, ...], args: argparse.Namespace) -> dict:
    row: dict = {"shape": list(shape)}
    reason = _skip_reason(name, shape, args)
    if reason is not None:
        row["skipped"] = reason
        return row
    common = ["--shape", *map(str, shape), "--device", args.device]
    if args.threads:
        common += ["--threads", str(args.threads)]
    for impl in IMPLS:
        row[impl] = _subprocess(["--worker", "memory", "--impl", impl, *common], args.passive_omp)
    repeats = args.repeats if math.prod(shape) <= _LARGE_NUMEL else max(3, args.repeats // 2)
    timing = ["--worker", "time", "--repeats", str(repeats), "--warmup", str(args.warmup), *common]
    times = _subprocess(timing, args.passive_omp)
    for impl in IMPLS:
        row[impl].update(times[impl])
    row["repeats"] = repeats
    ref, lib = row["reference"], row["library"]
    row["time_ratio"] = lib["time_s"] / ref["time_s"]
    row["cpu_time_ratio"] = lib["cpu_time_s"] / ref["cpu_time_s"]
    measured = min(lib["peak_bytes"], ref["peak_bytes"]) > 0
    row["memory_ratio"] = lib["peak_bytes"] / ref["peak_bytes"] if measured else None
    row["loss_rel_diff"] = abs(lib["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
    row["meets_target"] = row["time_ratio"] <= _TARGET_RATIO and (row["memory_ratio"] or 1.0) <= _TARGET_RATIO
    return row


def _mib(n: int) -> str:
    return "n/a" if n < 0 else f"{n / 2**20:,.0f}"


def _print_table(results: dict) -> None:
    print(f"\nADL (paper, gamma 2, beta 1) forward+backward, device={results['device']}, torch {torch.__version__}, "
          f"{results['threads']} threads, OMP_WAIT_POLICY={results['omp_wait_policy']}, load average before "
          f"{results['load_average'][0]:.2f}; library = hf_sad.distillation.losses, reference = plain autograd formula "
          "(fp32).")
    print("time: median wall / CPU time (all threads) after warm-up, both timed alternately in one process.")
    print("peak: extra peak memory of one cold fwd+bwd in a fresh process (CPU: VmHWM reset via /proc/self/clear_refs "
          "minus RSS before; CUDA: max_memory_allocated delta), gradient included.")
    print("held: extra memory kept by the graph between forward and backward.")
    head = (f"{'size (B, N, C)':<22}{'impl':<11}{'wall ms':>10}{'cpu ms':>10}{'peak MiB':>10}{'held MiB':>10}"
            f"{'wall x':>8}{'cpu x':>8}{'mem x':>8}")
    print(head)
    print("-" * len(head))
    for name, row in results["sizes"].items():
        label = f"{name} {tuple(row['shape'])}"
        if "skipped" in row:
            print(f"{label:<22}skipped: {row['skipped']}")
            continue
        for impl in IMPLS:
            r = row[impl]
            ratios = ""
            if impl == "library":
                mem = f"{row['memory_ratio']:.2f}" if row["memory_ratio"] is not None else "n/a"
                ratios = f"{row['time_ratio']:>8.2f}{row['cpu_time_ratio']:>8.2f}{mem:>8}"
            print(f"{label:<22}{impl:<11}{r['time_s'] * 1e3:>10.1f}{r['cpu_time_s'] * 1e3:>10.1f}"
                  f"{_mib(r['peak_bytes']):>10}{_mib(r['held_bytes']):>10}{ratios}")
        verdict = "met" if row["meets_target"] else "NOT met"
        print(f"{'':<22}{row['repeats']} repeats; loss rel. diff library/reference {row['loss_rel_diff']:.1e}; "
              f"target <= {_TARGET_RATIO}x wall time and peak memory: {verdict}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CPU-sized case only")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per implementation (halved above 10M)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--passive-omp",
        action="store_true",
        help="run the workers with OMP_WAIT_POLICY=PASSIVE: on a machine shared with other CPU-bound processes, "
        "spinning OpenMP threads make every parallel op pay for preemption, which hits the chunked loss (many small "
        "ops) far harder than the reference (few big ones)",
    )
    parser.add_argument("--worker", choices=("memory", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=int, nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns {"device", "threads", "sizes": {name: row}} (a worker returns its own figures)."""
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "memory":
        result = _memory_worker(args.impl, tuple(args.shape), args.device)
    elif args.worker == "time":
        result = _time_worker(tuple(args.shape), args.device, args.repeats, args.warmup)
    else:
        result = {
            "device": args.device,
            "threads": args.threads or torch.get_num_threads(),
            "omp_wait_policy": "PASSIVE" if args.passive_omp else os.environ.get("OMP_WAIT_POLICY", "default"),
            "load_average": os.getloadavg(),
            "sizes": {name: _bench_size(name, shape, args) for name, shape in SIZES.items()},
        }
        _print_table(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return result
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
