"""The encoder-decoder family end to end: numbers written in words -> digits, with the real CLI.

1. write generated training and test pairs (samples/out/translate/{train,test}.tsv)
2. train a Transformer encoder-decoder on them (Keras, model.fit; BPE source, character target)
3. evaluate it: BLEU, chrF and exact match of greedy translations (Keras)
4. export it to a verified bundle (encoder.onnx + decoder.onnx, parity checked against Keras)
5. evaluate the bundle (ONNX Runtime, no TensorFlow) and batch-translate a file with beam search

Run from the repository root: `python samples/translate.py [--steps N]`. About two
minutes on a laptop CPU. BLEU is reported but means little here: most references are a
single word (the number), so there are no 2- to 4-gram matches to count; chrF and
exact match are the figures to read.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _cli import kerasllm  # samples/ is on sys.path when a sample runs as a script

OUT = Path("samples/out/translate")
INPUTS = ["forty-two", "three hundred and seven", "nine hundred and ninety-nine", "eleven", "six hundred",
          "one hundred and one", "seventy-three", "five hundred and fifty-five"]


def write_pairs(path: Path, count: int, seed: int) -> None:
    from kerasllm.datasets import number_words_pairs  # noqa: PLC0415 - TF-free

    rows = number_words_pairs(count, max_value=999, seed=seed)
    path.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    write_pairs(OUT / "train.tsv", 5000, seed=0)
    write_pairs(OUT / "test.tsv", 300, seed=1)
    kerasllm("train", "seq2seq", "--data", str(OUT / "train.tsv"), "--out", str(OUT / "model"),
             "--tokenizer", "bpe", "--vocab-size", "300", "--separate-vocab", "--target-tokenizer", "char",
             "--max-length", "32", "--batch-size", "32", "--lr", "5e-3", "--label-smoothing", "0.1",
             "--steps", str(args.steps), "--eval-interval", "200", "--eval-steps", "5")
    kerasllm("evaluate", str(OUT / "model"), "--data", str(OUT / "test.tsv"), "--output", str(OUT / "keras.json"))
    kerasllm("export", str(OUT / "model"), "--out", str(OUT / "bundle"))
    kerasllm("evaluate", str(OUT / "bundle"), "--data", str(OUT / "test.tsv"), "--output", str(OUT / "bundle.json"))
    (OUT / "inputs.txt").write_text("\n".join(INPUTS) + "\n", encoding="utf-8")
    kerasllm("translate", str(OUT / "bundle"), "--input", str(OUT / "inputs.txt"),
             "--output", str(OUT / "translations.jsonl"), "--num-beams", "4", "--n-best", "2")
    keras_scores = json.loads((OUT / "keras.json").read_text())
    bundle_scores = json.loads((OUT / "bundle.json").read_text())
    print("Metrics on 300 test pairs:      BLEU    chrF   exact match")
    for name, scores in (("Keras (model dir)", keras_scores), ("ONNX Runtime (bundle)", bundle_scores)):
        print(f"  {name:24s} {scores['bleu']:7.1f} {scores['chrf']:7.1f} {scores['exact_match']:9.1%}")
    print("\nBeam search (4 beams, 2 best), ONNX Runtime bundle:")
    for line in (OUT / "translations.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        source = INPUTS[int(record["id"]) - 1]
        if "output" in record:
            best = ", ".join(f"{o} ({s:.3f})" for o, s in zip(record["output"], record["scores"]))
            print(f"  {source:30s} -> {best}")
        else:
            print(f"  {source:30s} -> error: {record.get('error')}")


if __name__ == "__main__":
    main()
