"""The machine a benchmark ran on: CPU, cores, memory, accelerator, library versions, load."""

from __future__ import annotations

import os
import platform

import psutil
import torch

from prunekit.core.versions import package_versions


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else platform's processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """JSON-ready machine description, including the load average (other work on the box skews timings)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "torch_threads": torch.get_num_threads(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": gpu, "platform": platform.platform(), "loadavg_1m": round(os.getloadavg()[0], 2),
            "versions": package_versions()}
