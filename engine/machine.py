"""What a timing depends on: the processor it ran on. Used by the search's latency tables (``search.latency``) and the
benchmarks (``benchmarks/harness.py``); ``platform.processor()`` is empty on Linux, so it reads ``/proc/cpuinfo``."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """The processor's model name (``Intel(R) Xeon(R) Processor``, ``AMD EPYC 7B13``) from ``/proc/cpuinfo``, else
    ``lscpu``, else what ``platform`` knows: CPU timings depend on it (MKL, oneDNN and PyTorch take other code paths
    per vendor and instruction set)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if shutil.which("lscpu"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
