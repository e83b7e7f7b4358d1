"""What the sample scripts share: running the real `kerasllm` command line, timed."""

from __future__ import annotations

import subprocess
import sys
import time


def kerasllm(*args: str) -> None:
    """Run `kerasllm ARGS...` in this Python, echoing the command and its wall time; fail on error."""
    print("$ kerasllm " + " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kerasllm", *args], check=True)
    print(f"  ({time.perf_counter() - start:.1f} s)\n", flush=True)
