"""What the export itself costs for a GPT-2-small-shaped CausalLM (12 layers, 768 wide, vocab 50257).

Run: `.venv/bin/python tests/benchmarks/bench_export_cost.py [--layers 12] [--validate]`

Measures, in a fresh process: seconds to convert (tf2onnx, weights as inputs), seconds of the
transformer fusions, peak RSS of the process (ru_maxrss) against the RSS after building the
model (the "plus the model" of the goal), and the .onnx file size against the weights' bytes.
Goal (issue 3): < 60 s, peak < 3 GB + model, file <= 1.05 x weights. With `--validate`, also the
export's validation (Keras vs ORT, fp32, greedy 32 tokens), which is not part of the goal.
The weights are random: conversion cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def rss_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--validate", action="store_true")
    args = parser.parse_args()

    from kerasllm import CausalLM, DecoderConfig
    from kerasllm.export.convert import causal_lm_graph, trace_to_onnx, weights_nbytes
    from kerasllm.export.optimize import cpu_slower_fusions, optimize_graph

    config = DecoderConfig.preset("base", vocab_size=50257, num_layers=args.layers, dropout=0.0)
    model = CausalLM(config)
    weights = sum(v.numpy().nbytes for v in model.weights)
    model_rss = rss_gb()
    with tempfile.TemporaryDirectory() as tmp:
        final = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        proto = trace_to_onnx(causal_lm_graph(model), model)
        stored = weights_nbytes(proto)
        convert_s = time.perf_counter() - start
        start = time.perf_counter()
        # The options `kerasllm export` uses for an fp32 decoder (export/exporter.py).
        report = optimize_graph(proto, final, model_type="gpt2", num_heads=config.num_heads,
                                hidden_size=config.hidden_dim, shape_inference=False, cached_attention=True,
                                shared_kv_buffer=True, disabled_fusions=cpu_slower_fusions("fp32"))
        optimize_s = time.perf_counter() - start
        size = final.stat().st_size
        peak = peak_gb()
        rows = [
            ("model", f"{args.layers} layers, 768 hidden, vocab 50257, {weights / 4e6:.1f}M parameters"),
            ("convert (tf2onnx)", f"{convert_s:.1f} s"),
            ("transformer fusions + save", f"{optimize_s:.1f} s"),
            ("export total", f"{convert_s + optimize_s:.1f} s (goal < 60 s)"),
            ("RSS after building the model", f"{model_rss:.2f} GB"),
            ("peak RSS", f"{peak:.2f} GB = model + {peak - model_rss:.2f} GB (goal: model + < 3 GB)"),
            ("weights (fp32)", f"{weights / 1e6:.1f} MB"),
            ("initializers in the graph", f"{stored / 1e6:.1f} MB"),
            ("model.onnx", f"{size / 1e6:.1f} MB = {size / weights:.3f} x weights (goal <= 1.05)"),
            ("fusions", ", ".join(f"{k} x{v}" for k, v in report["fusions"].items())),
        ]
        if args.validate:
            from kerasllm.export.runtime import DecoderSession, create_session
            from kerasllm.export.validate import validate_causal_lm

            start = time.perf_counter()
            figures = validate_causal_lm(model, DecoderSession(create_session(final, "cpu")))
            rows.append(("validation", f"{time.perf_counter() - start:.1f} s, max |logits diff| "
                         f"{max(figures['max_abs_diff'].values()):.2g}, greedy identical"))
            rows.append(("peak RSS with validation", f"{peak_gb():.2f} GB"))
    width = max(len(k) for k, _ in rows)
    print("\n| measure | value |\n|---|---|")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
