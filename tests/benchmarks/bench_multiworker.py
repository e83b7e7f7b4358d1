"""Multi-worker training throughput: two workers on loopback vs one process, same global batch.

Trains the 'small' CausalLM preset (4 layers, 128 hidden) on one fixed global batch and prints:
  1. examples/s of one process with one core (one worker's share of this machine), one
     process with both cores, and two MultiWorkerMirroredStrategy workers on 127.0.0.1
     (one core each);
  2. the scaling efficiency, 2-worker throughput / (2 x one-core throughput), with the
     caveat that matters here: both workers share one 2-core machine (and whatever else
     runs on it), so the figure measures the overhead of the collective all-reduce and
     the synchronisation, not what two machines would give;
  3. the per-step all-reduce volume: trainable parameters x 4 bytes (float32 gradients,
     one all-reduce of every gradient per step), with the paper estimate for a network.

    python tests/benchmarks/bench_multiworker.py [--steps 10] [--batch 16] [--seq-len 64] [--repeats 2]   (~3 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distributed_worker as dw  # noqa: E402


def run(kind: str, opts, work: Path) -> dict:
    common = ["bench", "--preset", "small", "--steps", opts.steps, "--batch", opts.batch, "--seq-len", opts.seq_len,
              "--warmup", opts.warmup, "--vocab", opts.vocab]
    out = work / f"{kind}.json"
    if kind == "two-workers":  # one thread each: one core per worker
        procs = dw.launch_workers([*common, "--strategy", "multi-worker", "--threads", 1, "--out", out], 2, work,
                                  log_prefix=kind)
    else:
        threads = 1 if kind == "one-core" else 2
        procs = [dw.launch([*common, "--strategy", "one-device", "--threads", threads, "--out", out],
                           dw.worker_env(), work / f"{kind}.log")]
    dw.wait_all(procs, 1800, work)
    result = json.loads(out.read_text())
    result["examples_per_s"] = result["steps"] * result["batch"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="Timed steps (after --warmup steps).")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="Global batch (split over the workers).")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=4000, help="Vocabulary (the CLI's default for bpe).")
    parser.add_argument("--repeats", type=int, default=2, help="Alternating rounds; the best of each kind counts.")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mw-") as tmp:
        work = Path(tmp)
        load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
        start = time.perf_counter()
        # The kinds alternate, `--repeats` rounds, and the best run of each counts: load from
        # other processes on this shared machine then hits all three alike.
        results: dict[str, dict] = {}
        for _ in range(opts.repeats):
            for kind in ("one-core", "two-cores", "two-workers"):
                result = run(kind, opts, work)
                if kind not in results or result["examples_per_s"] > results[kind]["examples_per_s"]:
                    results[kind] = result
        load_after = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    one, both, two = results["one-core"], results["two-cores"], results["two-workers"]
    params = one["trainable_params"]
    volume = params * 4
    efficiency = two["examples_per_s"] / (2 * one["examples_per_s"])
    step_s = two["seconds"] / two["steps"]
    print(f"\nsmall preset (vocab {opts.vocab}), global batch {opts.batch} x {opts.seq_len} tokens, "
          f"{opts.steps} timed steps, best of {opts.repeats}; load average {load} before, {load_after} after "
          f"({time.perf_counter() - start:.0f} s in all)")
    print(f"  1 process, 1 core   : {one['examples_per_s']:8.1f} examples/s")
    print(f"  1 process, 2 cores  : {both['examples_per_s']:8.1f} examples/s")
    print(f"  2 workers, loopback : {two['examples_per_s']:8.1f} examples/s  ({step_s * 1000:.0f} ms/step)")
    print(f"  scaling efficiency  : {efficiency:.2f} = 2-worker / (2 x 1-core)   CAVEAT: both workers share one "
          "2-core machine; this measures all-reduce + sync overhead, not two machines")
    print(f"  2 workers vs 1 process on both cores: x{two['examples_per_s'] / both['examples_per_s']:.2f}")
    print(f"  all-reduce per step : {params:,} trainable params x 4 B = {volume:,} B ({volume / 2**20:.2f} MiB)")
    for gbit in (1, 10, 100):
        # Ring all-reduce: each worker sends and receives 2 (N - 1) / N of the volume.
        seconds = 2 * (2 - 1) / 2 * volume * 8 / (gbit * 1e9)
        print(f"    ring all-reduce over {gbit:>3} Gbit/s, 2 workers: >= {seconds * 1000:7.2f} ms/step")


if __name__ == "__main__":
    main()
