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
with `pip install torch==2.13.0 numpy`). Without them the nanoGPT column is skipped.

    python tests/benchmarks/bench_train_causal_lm.py --nanogpt /tmp/nanogpt \
        --torch-python /tmp/torchvenv/bin/python [--full]
"""

from __future__ import annotations

import argparse
import json
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


def timed(command: list[str], cwd: Path | None = None) -> tuple[float, str, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return elapsed, done.stdout, done.stderr


def run_kerasllm(steps: int, workdir: Path, eval_interval: int) -> dict:
    out = workdir / f"kerasllm-{time.monotonic_ns()}"
    config = workdir / "config.json"
    config.write_text(json.dumps(CONFIG))
    wall, _, _ = timed([sys.executable, "-m", "kerasllm", "train", "causal-lm", "--data", str(CORPUS), "--out", str(out),
                     "--config", str(config), "--seq-len", str(SEQ), "--batch-size", str(BATCH), "--steps", str(steps),
                     "--lr", "1e-3", "--warmup-steps", "100", "--eval-interval", str(eval_interval),
                     "--eval-steps", "20", "--quiet"])
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
    args = parser.parse_args()
    if not CORPUS.exists():
        raise SystemExit(f"{CORPUS} not found (the shared tinyshakespeare corpus)")
    use_nanogpt = bool(args.nanogpt and args.torch_python)
    if use_nanogpt:
        prepare_nanogpt(args.nanogpt, args.torch_python)
    workdir = Path(tempfile.mkdtemp())
    runs: dict[str, list[dict]] = {"kerasllm": [], "keras-hub GPT2Backbone": [], "nanoGPT (PyTorch)": []}
    for repeat in range(args.repeats):
        runs["kerasllm"].append(run_kerasllm(args.steps, workdir, eval_interval=args.steps))
        if not args.skip_kerashub:
            runs["keras-hub GPT2Backbone"].append(run_kerashub(args.steps, eval_interval=args.steps))
        if use_nanogpt:
            runs["nanoGPT (PyTorch)"].append(run_nanogpt(args.nanogpt, args.torch_python, args.steps, args.steps))
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    full = {}
    if args.full:
        full["kerasllm"] = run_kerasllm(2000, workdir, eval_interval=250)["val_loss"]
        if not args.skip_kerashub:
            full["keras-hub GPT2Backbone"] = run_kerashub(2000, eval_interval=250)["val_loss"]
        if use_nanogpt:
            full["nanoGPT (PyTorch)"] = run_nanogpt(args.nanogpt, args.torch_python, 2000, 250)["val_loss"]

    summary = {name: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                      "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs)}
               for name, rs in runs.items() if rs}
    base = summary.get("nanoGPT (PyTorch)")
    hub = summary.get("keras-hub GPT2Backbone")
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
