"""Small helpers shared by the benchmark scripts in this folder.

- ``machine_info``: what the numbers were measured on (CPU model, threads, library versions).
- ``matmul_peak_flops``: an empirical peak, the best FLOP/s of a large square ``torch.mm``.
- ``interleaved_timing``: per-call wall-clock times of several workloads, run in alternating rounds so
  that background load on the machine affects all of them alike.
- ``markdown_table`` / ``write_results``: output to ``benchmarks/results/`` as JSON and Markdown.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags(wanted: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> list[str]:
    """Those of ``wanted`` that the CPU advertises: they decide whether bf16 matmuls run natively."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def machine_info() -> dict:
    """Where and with what a benchmark ran; goes verbatim into every results file."""
    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def command_line() -> str:
    """The exact command that produced the results, as it could be pasted into a shell."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def matmul_peak_flops(dtype: torch.dtype, max_n: int = 2048, repeats: int = 5, target_s: float = 1.0) -> dict:
    """Empirical matmul peak: best-of-``repeats`` FLOP/s of one ``n x n @ n x n`` ``torch.mm`` (2 n^3 FLOPs).

    ``n`` starts at 256 and doubles up to ``max_n`` while one product is expected to stay under ``target_s``,
    so a dtype without a fast kernel (bf16 on a CPU without AVX512-BF16/AMX can run ~500x slower than
    fp32) is measured at a smaller size instead of taking minutes; fp32 reaches ``max_n`` on any machine
    doing over ~20 GFLOP/s. Returns ``{"flops": ..., "n": ..., "dtype": ...}``.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def one_mm(n: int) -> float:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)                                   # warm-up: thread pool, kernel selection
        best = float("inf")
        for _ in range(repeats):
            synchronize()
            t0 = time.perf_counter()
            torch.mm(a, b)
            synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    n = 256
    seconds = one_mm(n)
    while 2 * n <= max_n and 8 * seconds < target_s:  # doubling n multiplies the time by about 8
        n *= 2
        seconds = one_mm(n)
    return {"flops": 2 * n**3 / seconds, "n": n, "dtype": str(dtype).removeprefix("torch.")}


def synchronize() -> None:
    """Wait for queued GPU work (no-op on CPU) so that wall-clock times are honest."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_timing(workloads: dict[str, Callable[[], None]], steps: int, rounds: int = 5,
                       warmup: int = 3) -> dict[str, list[float]]:
    """Wall-clock seconds of each call of each workload, ``steps`` timed calls per workload.

    Every workload is first called ``warmup`` times (untimed). The timed calls are then split into
    ``rounds`` rounds; in each round every workload runs its share back to back, and the order of the
    workloads is reversed every other round (A B, B A, A B, ...), so slow drifts and bursts of background
    load fall on all workloads alike.
    """
    for fn in workloads.values():
        for _ in range(warmup):
            fn()
    synchronize()
    rounds = max(1, min(rounds, steps))
    shares = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
    times: dict[str, list[float]] = {name: [] for name in workloads}
    order = list(workloads)
    for r, share in enumerate(shares):
        for name in (order if r % 2 == 0 else order[::-1]):
            for _ in range(share):
                t0 = time.perf_counter()
                workloads[name]()
                synchronize()
                times[name].append(time.perf_counter() - t0)
    return times


def throughput(step_times: list[float], batch: int) -> dict:
    """Images/s from per-step times: the median step (headline, robust to outliers) and the mean step."""
    median, mean = statistics.median(step_times), statistics.fmean(step_times)
    return {"images_per_s": batch / median, "images_per_s_mean": batch / mean,
            "median_step_s": median, "mean_step_s": mean, "step_times_s": step_times}


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table; cells are formatted with ``str``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, data: dict, markdown: str, out_dir: Path | str = RESULTS_DIR) -> list[Path]:
    """Write ``<out_dir>/<name>.json`` (``data``) and ``<out_dir>/<name>.md`` (``markdown``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return [json_path, md_path]
