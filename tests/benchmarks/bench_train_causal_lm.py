"""Training speed of kerasllm.CausalLM against keras-hub GPT-2 and nanoGPT, in one run.

Shape (nanoGPT's CPU recipe): 4 layers, 4 heads, 128 hidden, 64 positions, batch 12,
character level on tinyshakespeare; lr 1e-3, warmup 100, cosine to 1e-4, AdamW beta2
0.99, weight decay 0.1, clipping 1.0, no dropout.

Measures, alternating the three programs run by run so machine noise hits each alike:
  * whole-process wall time for `--steps` (default 300) iterations (median of `--repeats`),
  * steady-state training tokens/s (median step time after warm-up),
  * with `--full`, validation loss after 2000 iterations.

nanoGPT is PyTorch and is not part of this project: bring karpathy/nanoGPT yourself and
give its directory (`--nanogpt`) and a Python with torch (`--torch-python`, e.g. a venv
with `pip install torch==2.13.0 numpy requests`: its data/shakespeare_char/prepare.py
imports requests). Without them the nanoGPT column is skipped.

    python tests/benchmarks/bench_train_causal_lm.py --nanogpt /tmp/nanogpt \
        --torch-python /tmp/torchvenv/bin/python [--full] [--bf16]

`--repeats 0 --full` runs only the 2000-iteration validation losses (~7 min), so the two
parts fit separate commands. Every kerasllm run gets a fresh XLA compilation cache (cold).

Measured 2026-12-01 on the 2-core development machine (`--steps 300 --repeats 3 --bf16`, then
`--repeats 0 --full --bf16`):

    program                      wall s   tokens/s  wall/nanoGPT  tok/s vs hub  val@2000
    kerasllm                       18.2     23,966         1.51x         1.06x     1.813
    kerasllm mixed_bfloat16        21.5     18,968         1.78x         0.84x     1.813
    keras-hub GPT2Backbone         26.1     22,617         2.17x         1.00x     1.904
    nanoGPT (PyTorch)              12.0     26,297         1.00x         1.16x     1.886

Where kerasllm's 18 s go (a timestamped CLI run): Python + TensorFlow import ~2.5 s, data,
model and compile 0.5 s, first step 4.3-4.8 s (Keras trace ~1.2 s, the rest TF-to-XLA
lowering and XLA compilation; ~3.5 s with a warm cache), 300 steps ~10.5 s, validation 1.2 s
(trace and compile of the eval step ~0.9 s), save 0.1 s, exit 0.1 s. XLA on CPU runs the
step's small matmuls on about one core's worth of time; XLA flags tried without a gain:
oneDNN/XNNPACK/YNNPACK dot fusions, backend optimisation level, 512-bit vectors, fast math,
the old (non-thunk) runtime; steps_per_execution=10 gained <= 3% (within the noise). bf16 is
slower on this CPU: XLA's CPU dots evidently do not use its AMX units.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parents[2] / "shared" / "data" / "tinyshakespeare.txt"
BATCH, SEQ = 12, 64
CONFIG = {"family": "decoder", "num_layers": 4, "num_heads": 4, "hidden_dim": 128, "intermediate_dim": 512,
          "max_length": 64, "dropout": 0.0, "use_bias": False}


def timed(command: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, str, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return elapsed, done.stdout, done.stderr


def run_kerasllm(steps: int, workdir: Path, eval_interval: int, precision: str = "fp32") -> dict:
    out = workdir / f"kerasllm-{time.monotonic_ns()}"
    config = workdir / "config.json"
    config.write_text(json.dumps(CONFIG))
    # A fresh (cold) XLA compilation cache for every run: the CLI keeps compiled programs
    # between runs, and nanoGPT compiles nothing, so a warm cache would flatter kerasllm.
    cache = workdir / f"xla-cache-{time.monotonic_ns()}"
    wall, _, _ = timed([sys.executable, "-m", "kerasllm", "train", "causal-lm", "--data", str(CORPUS), "--out", str(out),
                     "--config", str(config), "--seq-len", str(SEQ), "--batch-size", str(BATCH), "--steps", str(steps),
                     "--lr", "1e-3", "--warmup-steps", "100", "--eval-interval", str(eval_interval),
                     "--eval-steps", "20", "--precision", precision, "--quiet"],
                     env={"KERASLLM_XLA_CACHE": str(cache)})
    shutil.rmtree(cache, ignore_errors=True)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    # ProgressLogger logs tokens/s over each 10 steps (validation excluded); skip the first 20 steps.
    rates = [h["tokens_per_s"] for h in history if h["step"] > 20 and h["step"] % eval_interval]
    val = [h["val_loss"] for h in history if "val_loss" in h]
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "tokens_per_s": statistics.median(rates), "val_loss": val[-1] if val else None}


def run_kerashub(steps: int, eval_interval: int) -> dict:
    wall, stdout, _ = timed([sys.executable, str(HERE / "kerashub_gpt2_train.py"), str(CORPUS), str(steps),
                             str(eval_interval)])
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "tokens_per_s": result["steady_tokens_per_s"], "val_loss": result["val_loss"]}


def prepare_nanogpt(nanogpt: Path, torch_python: str) -> None:
    data = nanogpt / "data" / "shakespeare_char"
    if not (data / "train.bin").exists():
        shutil.copy(CORPUS, data / "input.txt")  # prepare.py downloads only when input.txt is missing
        subprocess.run([torch_python, "prepare.py"], cwd=data, check=True, capture_output=True)


def run_nanogpt(nanogpt: Path, torch_python: str, steps: int, eval_interval: int) -> dict:
    wall, stdout, stderr = timed([
        torch_python, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
        "--eval_iters=20", "--log_interval=1", f"--block_size={SEQ}", f"--batch_size={BATCH}", "--n_layer=4",
        "--n_head=4", "--n_embd=128", f"--max_iters={steps}", "--lr_decay_iters=2000", "--dropout=0.0",
        f"--eval_interval={eval_interval}", f"--out_dir={tempfile.mkdtemp()}",
    ], cwd=nanogpt)
    output = stdout + stderr
    times = [float(ms) for it, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", output) if int(it) > 20]
    # nanoGPT's step time includes its evaluations at eval_interval; the median skips them.
    val = re.findall(r"val loss ([\d.]+)", output)
    return {"wall_s": wall, "tokens_per_s": BATCH * SEQ / (statistics.median(times) / 1000),
            "val_loss": float(val[-1]) if val else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="also train 2000 iterations and compare val loss")
    parser.add_argument("--nanogpt", type=Path)
    parser.add_argument("--torch-python", default=None)
    parser.add_argument("--skip-kerashub", action="store_true")
    parser.add_argument("--bf16", action="store_true",
                        help="also run kerasllm with --precision mixed_bfloat16 (an extra row; the goals compare fp32)")
    args = parser.parse_args()
    if not CORPUS.exists():
        raise SystemExit(f"{CORPUS} not found (the shared tinyshakespeare corpus)")
    use_nanogpt = bool(args.nanogpt and args.torch_python)
    if use_nanogpt:
        prepare_nanogpt(args.nanogpt, args.torch_python)
    workdir = Path(tempfile.mkdtemp())
    bf16 = "kerasllm mixed_bfloat16"
    runs: dict[str, list[dict]] = {"kerasllm": [], bf16: [], "keras-hub GPT2Backbone": [], "nanoGPT (PyTorch)": []}
    for repeat in range(args.repeats):
        runs["kerasllm"].append(run_kerasllm(args.steps, workdir, eval_interval=args.steps))
        if args.bf16:
            runs[bf16].append(run_kerasllm(args.steps, workdir, eval_interval=args.steps, precision="mixed_bfloat16"))
        if not args.skip_kerashub:
            runs["keras-hub GPT2Backbone"].append(run_kerashub(args.steps, eval_interval=args.steps))
        if use_nanogpt:
            runs["nanoGPT (PyTorch)"].append(run_nanogpt(args.nanogpt, args.torch_python, args.steps, args.steps))
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    full = {}
    if args.full:
        full["kerasllm"] = run_kerasllm(2000, workdir, eval_interval=250)["val_loss"]
        if args.bf16:
            full[bf16] = run_kerasllm(2000, workdir, eval_interval=250, precision="mixed_bfloat16")["val_loss"]
        if not args.skip_kerashub:
            full["keras-hub GPT2Backbone"] = run_kerashub(2000, eval_interval=250)["val_loss"]
        if use_nanogpt:
            full["nanoGPT (PyTorch)"] = run_nanogpt(args.nanogpt, args.torch_python, 2000, 250)["val_loss"]

    summary = {name: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                      "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs)}
               for name, rs in runs.items() if rs}
    base = summary.get("nanoGPT (PyTorch)")
    hub = summary.get("keras-hub GPT2Backbone")
    if not summary:  # --repeats 0: only the --full validation losses
        for name, val in full.items():
            print(f"{name:<26} val loss after 2000 iterations {val:.3f}")
        shutil.rmtree(workdir, ignore_errors=True)
        return
    print(f"\nTraining, {args.steps} steps, medians of {args.repeats} alternating runs, {BATCH}x{SEQ} tokens/step")
    print(f"{'program':<26}{'wall s':>9}{'tokens/s':>11}{'wall/nanoGPT':>14}{'tok/s vs hub':>14}{'val@2000':>10}")
    for name, s in summary.items():
        wall_ratio = f"{s['wall_s'] / base['wall_s']:.2f}x" if base else "-"
        tok_ratio = f"{s['tokens_per_s'] / hub['tokens_per_s']:.2f}x" if hub else "-"
        val = f"{full[name]:.3f}" if name in full and full[name] is not None else "-"
        print(f"{name:<26}{s['wall_s']:>9.1f}{s['tokens_per_s']:>11,.0f}{wall_ratio:>14}{tok_ratio:>14}{val:>10}")
    if base:
        k = summary["kerasllm"]
        print(f"\nkerasllm steady tokens/s = {k['tokens_per_s'] / base['tokens_per_s']:.2f}x nanoGPT's; "
              f"whole-process time = {k['wall_s'] / base['wall_s']:.2f}x nanoGPT's")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
