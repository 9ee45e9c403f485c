"""What machine a benchmark ran on, read from the machine itself rather than written into each script."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe_machine() -> str:
    """CPU model, cores, vector extensions that change the numbers, memory, torch build: one line.

    >>> "torch" in describe_machine()
    True
    """
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    # bfloat16 matmuls run natively only with AVX-512 BF16 (or AMX); the bfloat16 phase of the target
    # optimisation is on by default only there, so the extension is part of what a number means.
    vector = "AVX-512 BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else \
        "AVX2" if "avx2" in flags else "no AVX2"
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        memory = f", {kib / 2**20:.0f} GB"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{cores}-core {model} ({vector}){memory}, torch {torch.__version__} {device}"
