"""Batch inference CLI: its overhead over the runtime, length bucketing, cold start. One run.

Measures, on a real bundle (a tiny causal LM trained and exported here unless `--bundle`):
  1. `kerasllm generate` end to end (start-up, model load, reading, tokenizing, batching,
     JSONL writing, progress bar) against a script calling the runtime in-process (load the
     predictor, tokenize, `predict` on the very same batches, keep the results), both fresh
     processes timed from launch to exit, on the same 10k prompts. Goal: overhead <= 10%.
     Runs alternate so load from other processes hits both alike; the best run of each counts.
  2. Length bucketing on vs off (`--no-bucket`) on a mixed-length file: the speed-up.
  3. Cold start: from launching `kerasllm generate` to its first output line on stdout, and
     whether TensorFlow was imported (`python -X importtime`). Goal: < 1.5 s.

    python tests/benchmarks/bench_batch_cli.py [--bundle DIR] [--records 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
CLI = [PYTHON, "-m", "kerasllm"]


def build_bundle(work: Path) -> Path:
    """Train a tiny causal LM on the sample corpus (200 steps) and export it."""
    bundle = work / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    corpus, run = work / "corpus.txt", work / "lm"
    for args in (["sample-data", "corpus", "--out", corpus, "--overwrite"],
                 ["train", "causal-lm", "--data", corpus, "--out", run, "--steps", "200", "--quiet"],
                 ["export", run, "--out", bundle]):
        subprocess.run([*CLI, *map(str, args)], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return bundle


def prompts(corpus: str, count: int, low: int, high: int, seed: int) -> list[str]:
    """`count` prompts cut from the corpus at random places, `low..high` characters long."""
    rng = random.Random(seed)
    text = " ".join(corpus.split())
    out = []
    for _ in range(count):
        length = rng.randint(low, high)
        start = rng.randrange(0, len(text) - length)
        out.append(text[start:start + length].strip() or "The")
    return out


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def baseline_worker(bundle: Path, path: Path, new: int, batch_size: int = 32, max_batch_tokens: int = 8192,
                    window: int = 1024) -> None:
    """The in-process baseline (its own process): load, tokenize, predict in the CLI's batches."""
    from kerasllm.export import batch
    from kerasllm.export.predict import load_predictor

    options = {**batch.TASK_DEFAULTS["generate"], "max_new_tokens": new}
    predictor = load_predictor("generate", bundle, device="cpu")
    texts = path.read_text(encoding="utf-8").splitlines()
    results = []
    for first in range(0, len(texts), window):
        ids = [predictor.check(t) for t in texts[first:first + window]]
        for planned in batch.plan_batches([len(i) for i in ids], batch_size, max_batch_tokens, True, new):
            results += predictor.predict([ids[i] for i in planned], **options)
    assert len(results) == len(texts)


def in_process(bundle: Path, path: Path, new: int) -> tuple[float, float]:
    """Wall and CPU seconds of a fresh process running `baseline_worker`."""
    start, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
    subprocess.run([PYTHON, __file__, "--baseline-worker", str(bundle), str(path), str(new)], cwd=REPO, check=True,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu


def cli(bundle: Path, path: Path, out: Path, *extra: str) -> tuple[float, float, str]:
    """Wall and CPU seconds of one `kerasllm generate` process, and its summary line."""
    start, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([*CLI, "generate", str(bundle), "-i", str(path), "-o", str(out), "--overwrite", *extra],
                          cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"kerasllm generate failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu, proc.stderr.strip().splitlines()[-1]


def first_line_seconds(bundle: Path, path: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen([*CLI, "generate", str(bundle), "-i", str(path), "-o", "-", "-q",
                             "--max-new-tokens", "8"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = proc.stdout.readline()
    seconds = time.perf_counter() - start
    proc.kill()
    proc.wait()
    assert line.startswith(b"{"), line
    return seconds


def main() -> None:
    if sys.argv[1:2] == ["--baseline-worker"]:
        return baseline_worker(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="A generate bundle (default: train and export a tiny one).")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kerasllm-bench-batch")
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-records", type=int, default=2000, help="Prompts in the mixed-length file.")
    parser.add_argument("--only", action="append", choices=["overhead", "bucketing", "cold"],
                        help="Run only these parts (repeatable; default: all).")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    bundle = args.bundle or build_bundle(args.work)
    manifest = json.loads((bundle / "manifest.json").read_text())
    max_length = int(manifest["config"]["max_length"])
    from kerasllm import datasets

    corpus = datasets.sample_corpus(300, seed=1)
    new = args.max_new_tokens
    print(f"bundle {bundle} (max_length {max_length}), {args.records} records, {new} new tokens, "
          f"{os.cpu_count()} CPUs, {args.repeats} alternating runs each (best = least disturbed by other load)")

    parts = set(args.only or ["overhead", "bucketing", "cold"])
    if "overhead" in parts:
        overhead(args, bundle, corpus, new)
    if "bucketing" in parts:
        bucketing(args, bundle, corpus, new, max_length)
    if "cold" in parts:
        cold_start(args, bundle)


def overhead(args, bundle: Path, corpus: str, new: int) -> None:
    """1. CLI end to end vs in-process runtime, same records, same batches."""
    uniform = args.work / "prompts.txt"
    uniform.write_text("\n".join(prompts(corpus, args.records, 8, 48, seed=1)) + "\n", encoding="utf-8")
    out = args.work / "out.jsonl"
    runs: dict[str, list[tuple[float, float]]] = {"in-process": [], "cli": []}
    summary = ""
    for _ in range(args.repeats):  # alternate, so load from other processes hits both alike
        runs["in-process"].append(in_process(bundle, uniform, new))
        *seconds, summary = cli(bundle, uniform, out, "--max-new-tokens", str(new))
        runs["cli"].append(tuple(seconds))
    lines = out.read_text().splitlines()
    assert len(lines) == args.records and all('"output"' in line for line in lines)
    print("\n1. CLI end to end vs runtime in-process (same prompts, same batches); wall and CPU seconds")
    for name, label in (("in-process", "script calling the runtime in-process"),
                        ("cli", "kerasllm generate                    ")):
        wall = [w for w, _ in runs[name]]
        cpu = [c for _, c in runs[name]]
        print(f"   {label}: wall min {min(wall):6.2f} median {statistics.median(wall):6.2f} s "
              f"({args.records / min(wall):6.1f} records/s), CPU min {min(cpu):6.2f} s  "
              f"walls {[round(w, 2) for w in wall]}")
    print(f"   CLI summary: {summary}")
    best = {name: min(w for w, _ in r) for name, r in runs.items()}
    cpu = {name: min(c for _, c in r) for name, r in runs.items()}
    median = {name: statistics.median(w for w, _ in r) for name, r in runs.items()}
    print(f"   overhead (best wall vs best wall): {100 * (best['cli'] / best['in-process'] - 1):+.1f}%, "
          f"(CPU): {100 * (cpu['cli'] / cpu['in-process'] - 1):+.1f}%, (median wall vs median wall): "
          f"{100 * (median['cli'] / median['in-process'] - 1):+.1f}%"
          "  (goal <= +10%)")


def bucketing(args, bundle: Path, corpus: str, new: int, max_length: int) -> None:
    """2. bucketing on vs off, mixed lengths: wall and CPU seconds (CPU is steadier on a shared machine)."""
    out = args.work / "out.jsonl"
    mixed = args.work / "mixed.txt"
    count = args.bucket_records
    mixed.write_text("\n".join(prompts(corpus, count, 4, max_length - new - 8, seed=2)) + "\n", encoding="utf-8")
    on, off = [], []
    for _ in range(args.repeats):
        on.append(cli(bundle, mixed, out, "--max-new-tokens", str(new))[:2])
        on_rows = out.read_text()
        off.append(cli(bundle, mixed, out, "--max-new-tokens", str(new), "--no-bucket")[:2])
        assert out.read_text() == on_rows, "bucketing changed the outputs"
    print(f"\n2. length bucketing, {count} prompts of 4..{max_length - new - 8} characters (outputs identical)")
    for label, runs in (("--bucket   ", on), ("--no-bucket", off)):
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        print(f"   {label}: wall best {min(walls):7.2f} s median {statistics.median(walls):7.2f} s, CPU best "
              f"{min(cpus):7.2f} s median {statistics.median(cpus):7.2f} s  walls {[round(w, 1) for w in walls]}")
    wall_on, wall_off = (statistics.median(w for w, _ in runs) for runs in (on, off))
    cpu_on, cpu_off = (statistics.median(c for _, c in runs) for runs in (on, off))
    print(f"   speed-up (median vs median): wall {wall_off / wall_on:.2f}x, CPU {cpu_off / cpu_on:.2f}x")


def cold_start(args, bundle: Path) -> None:
    """3. cold start to the first output line."""
    few = args.work / "few.txt"
    few.write_text("Anna had a\nThe fox lived near the\n", encoding="utf-8")
    starts = [first_line_seconds(bundle, few) for _ in range(max(args.repeats, 5))]
    imports = subprocess.run([PYTHON, "-X", "importtime", "-m", "kerasllm", "generate", str(bundle), "-i", str(few),
                              "-o", "-", "-q", "--max-new-tokens", "4"], cwd=REPO, capture_output=True, text=True)
    modules = [line.split("|")[-1].strip() for line in imports.stderr.splitlines() if line.startswith("import time")]
    slowest = sorted((line for line in imports.stderr.splitlines() if line.startswith("import time:")
                      and line.split("|")[1].strip().isdigit()), key=lambda l: -int(l.split("|")[1]))[:4]
    print("\n3. cold start: launch to first output line of `kerasllm generate` (2 prompts, 8 new tokens)")
    print(f"   median {statistics.median(starts):.2f} s, min {min(starts):.2f} s  {[round(s, 2) for s in starts]}  "
          "(goal < 1.5 s)")
    print(f"   tensorflow imported: {any(m == 'tensorflow' or m.startswith('tensorflow.') for m in modules)}; "
          f"{len(modules)} modules; slowest cumulative imports (us):")
    for line in slowest:
        print("     " + " ".join(line.split()))


if __name__ == "__main__":
    main()
