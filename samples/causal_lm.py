"""Train a small causal LM, export it to a verified ONNX bundle, generate from the bundle: one script.

1. write a generated story corpus (kerasllm.datasets) to samples/out/causal_lm/corpus.txt
2. train a GPT-like causal LM on it with `model.fit` (kerasllm.recipes.causal_lm)
3. export it to a bundle (kerasllm.export.exporter): ONNX graph with a KV cache, fused by
   ONNX Runtime, checked against Keras (logits within 1e-4, greedy generations identical)
4. generate from the bundle on ONNX Runtime (no TensorFlow needed there): greedy, seeded
   sampling, beam search with n-best scores; and greedy from the Keras model for comparison

Run from the repository root: `python samples/causal_lm.py [--steps 400] [--preset small]`
(about 3-5 minutes on a 2-core laptop CPU with the defaults).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

OUT = Path("samples/out/causal_lm")
PROMPTS = ["Anna had a", "The fox lived near the", "Once upon a time", "Milo and the bear"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "base"])
    args = parser.parse_args()

    # As the CLI does: TensorFlow's start-up lines (absl's, oneDNN's notice, "failed call to cuInit"
    # on a machine without a GPU) silenced, XLA's compiled programs kept between runs.
    from kerasllm.cli import configure_tensorflow, import_tensorflow_quietly

    configure_tensorflow()
    import_tensorflow_quietly()
    from kerasllm import datasets
    from kerasllm.export.exporter import ExportOptions, export_model_dir
    from kerasllm.export.predict import load_predictor
    from kerasllm.recipes.causal_lm import CausalLMTrainArgs, train_causal_lm

    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    corpus = OUT / "corpus.txt"
    corpus.write_text(datasets.sample_corpus(1500, seed=0), encoding="utf-8")

    print(f"1/3 training a {args.preset} causal LM for {args.steps} steps on {corpus}", flush=True)
    start = time.perf_counter()
    train_causal_lm(CausalLMTrainArgs(data=[str(corpus)], preset=args.preset, steps=args.steps, batch_size=16,
                                      seq_len=64, lr=2e-3, eval_interval=max(args.steps // 2, 1)),
                    OUT / "lm", quiet=True)
    print(f"    done in {time.perf_counter() - start:.0f} s\n", flush=True)

    print("2/3 exporting to an ONNX bundle (checked against Keras)", flush=True)
    bundle = export_model_dir(OUT / "lm", OUT / "bundle", ExportOptions(), log=lambda m: print(f"    {m}"))
    validation = bundle.manifest["validation"]
    print(f"    {OUT / 'bundle'}: files {', '.join(bundle.manifest['files'])}; "
          f"max |logits diff| {max(v for k, v in validation['max_abs_diff'].items() if k.endswith('logits')):.1e}\n",
          flush=True)

    print("3/3 generating from the bundle on ONNX Runtime", flush=True)
    onnx_side = load_predictor("generate", OUT / "bundle", device="cpu")
    keras_side = load_predictor("generate", OUT / "lm")
    batch = [onnx_side.check(p) for p in PROMPTS]
    start = time.perf_counter()
    greedy = onnx_side.predict(batch, max_new_tokens=48)
    elapsed = time.perf_counter() - start
    same = greedy == keras_side.predict(batch, max_new_tokens=48)
    print(f"    greedy, {len(batch)} prompts x 48 tokens in {elapsed:.2f} s; identical to Keras: {same}")
    for prompt, result in zip(PROMPTS, greedy):
        print(f"      {prompt}|{result['output']!r}")
    sampled = onnx_side.predict(batch[:2], max_new_tokens=48, temperature=0.8, top_p=0.9, seed=1)
    print("    sampled (temperature 0.8, top-p 0.9, seed 1):")
    for prompt, result in zip(PROMPTS, sampled):
        print(f"      {prompt}|{result['output']!r}")
    beams = onnx_side.predict(batch[:1], max_new_tokens=32, num_beams=4, n_best=3, stop=["."])[0]
    print("    beam search (4 beams, 3 best, stop at '.'):")
    for text, score in zip(beams["output"], beams["scores"]):
        print(f"      {score:+.3f} {PROMPTS[0]}|{text!r}")


if __name__ == "__main__":
    main()
