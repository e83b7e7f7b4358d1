"""`make demo`: the main job end to end on a bundled default, with the real CLI.

1. write the generated sample corpus (samples/out/corpus.txt)
2. train a small GPT-like causal LM on it (Keras, model.fit)
3. export it to a verified ONNX bundle (parity checked against Keras at export)
4. batch-generate from a prompts file on ONNX Runtime, no TensorFlow
5. print the results and the throughput

Run from the repository root: `python samples/demo.py [--steps N]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _cli import kerasllm  # samples/ is on sys.path when a sample runs as a script

OUT = Path("samples/out")
# What this job writes in OUT, removed before it runs (the other samples' folders stay).
OWN = ("corpus.txt", "lm", "bundle", "prompts.txt", "generations.jsonl")
PROMPTS = ["Anna had a", "The fox lived near the", "\"Where is my", "In the garden there was",
           "Ben saw a", "Milo and the bear played", "The owl", "Grace picked"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for path in (OUT / name for name in OWN):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    kerasllm("sample-data", "corpus", "--out", str(OUT / "corpus.txt"))
    kerasllm("train", "causal-lm", "--data", str(OUT / "corpus.txt"), "--out", str(OUT / "lm"),
             "--preset", "small", "--seq-len", "64", "--batch-size", "16", "--steps", str(args.steps),
             "--eval-interval", "200")
    kerasllm("export", str(OUT / "lm"), "--out", str(OUT / "bundle"))
    (OUT / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    # Prompt + new tokens stay within the 64 positions trained (longest prompt 23 characters + BOS):
    # past them the text degrades and `generate` says so.
    kerasllm("generate", str(OUT / "bundle"), "--input", str(OUT / "prompts.txt"),
             "--output", str(OUT / "generations.jsonl"), "--max-new-tokens", "40", "--temperature", "0")
    print("Generations (greedy, ONNX Runtime bundle):")
    for line in (OUT / "generations.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        prompt = PROMPTS[int(record["id"]) - 1] if str(record["id"]).isdigit() else ""
        print(f"  [{record['id']}] {prompt}|{record.get('output', record.get('error'))!s}".replace("\n", " "))


if __name__ == "__main__":
    main()
