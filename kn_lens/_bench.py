"""What the speed benchmarks print about the machine they ran on (``benchmarks/*.py``).

Timings on a shared 2-core sandbox move with its load; a matmul rate measured in the same run
(:func:`matmul_gflops`) lets figures from different runs and machines be compared, and gives the
FLOP floor of a computation (:mod:`benchmarks.locate`'s integrated-gradients table).
"""
from __future__ import annotations

import platform
import time

import torch


def cpu_name() -> tuple[str, str]:
    """The CPU model and its widest vector ISA ("avx512", "avx2" or "other")."""
    name, flags = platform.processor() or "?", ""
    try:
        info = open("/proc/cpuinfo").read()
        name = next((x.split(":", 1)[1].strip() for x in info.splitlines()
                     if x.startswith("model name")), name)
        flags = next((x for x in info.splitlines() if x.startswith("flags")), "")
    except OSError:
        pass
    return name, "avx512" if " avx512f" in flags else "avx2" if " avx2" in flags else "other"


def matmul_rates(m: int, k: int, n: int, *, threads: int | None = None,
                 seconds: float = 0.5) -> tuple[float, float]:
    """Sustained float32 ``[m, k] @ [k, n]`` rates in GFLOP/s (``2 m k n`` FLOPs per product)
    over ~``seconds`` of wall clock after a warm-up, with ``threads`` torch threads (default: the
    current setting, restored after): by the wall clock, and by this process's CPU time (which
    other jobs on the machine disturb less)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        reps, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:  # time batches of products until ~seconds have passed
            for _ in range(max(1, int(2e8 / (2 * m * k * n)))):
                a @ b
                reps += 1
            dt = time.perf_counter() - t0
            if dt >= seconds:
                flop = 2 * m * k * n * reps / 1e9
                return flop / dt, flop / max(time.process_time() - c0, 1e-9)
    finally:
        torch.set_num_threads(before)


def matmul_gflops(m: int, k: int, n: int, *, threads: int | None = None,
                  seconds: float = 0.5) -> float:
    """The wall-clock rate of :func:`matmul_rates`."""
    return matmul_rates(m, k, n, threads=threads, seconds=seconds)[0]


def machine(threads: int) -> str:
    """CPU model, widest vector ISA and the fp32 matmul rate at a ROME-step shape (70 x 576 by
    576 x 1536, SmolLM2's MLP), so figures from different machines can be compared: the same
    2-core sandbox has been an AVX-512 Xeon (~160 GFLOP/s per thread) and an AVX2 EPYC (~60)."""
    name, isa = cpu_name()
    rate = matmul_gflops(70, 576, 1536, threads=threads)
    return f"cpu {name} ({isa}); fp32 matmul {rate:.0f} GFLOP/s at {threads} thread(s)"
