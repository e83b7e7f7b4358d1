"""The encoder family end to end on a generated sentiment task, with the real CLI.

1. write generated product reviews labelled positive/negative (train TSV, test JSONL)
2. (--pretrain) pretrain a BERT-like encoder by masked-token prediction on the texts
3. train a text classifier (from scratch, or from the pretrained encoder with --init-from)
4. evaluate it (accuracy, macro-F1) in Keras
5. export it to a verified ONNX bundle (labels identical, logits within 1e-4 of Keras)
6. evaluate the bundle and batch-classify / embed new reviews on ONNX Runtime, no TensorFlow

Run from the repository root: `python samples/classify.py [--pretrain] [--steps N]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _cli import kerasllm  # samples/ is on sys.path when a sample runs as a script

OUT = Path("samples/out/classify")
REVIEWS = [
    "This backpack is fantastic.",
    "I bought the printer last week and it is useless.",
    "What a lovely jacket, I would recommend it.",
    "The blender arrived today. Honestly horrible.",
    "My tent turned out comfortable after a month.",
    "This kettle is noisy.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="Classifier training steps.")
    parser.add_argument("--pretrain", action="store_true", help="Pretrain a masked LM first and fine-tune it.")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    train, test = OUT / "train.tsv", OUT / "test.jsonl"
    kerasllm("sample-data", "sentiment", "--out", str(train), "--count", "3000", "--seed", "1")
    kerasllm("sample-data", "sentiment", "--out", str(test), "--count", "500", "--seed", "2")
    common = ["--seq-len", "64", "--batch-size", "32", "--lr", "3e-3", "--eval-interval", "100"]
    init = ["--preset", "tiny"]  # with --init-from, the architecture is the pretrained run's
    if args.pretrain:
        kerasllm("train", "masked-lm", "--data", str(train), "--out", str(OUT / "mlm"),
                 "--steps", str(args.pretrain_steps), "--preset", "tiny", *common)
        kerasllm("evaluate", str(OUT / "mlm"), "--data", str(test))
        init = ["--init-from", str(OUT / "mlm")]
    kerasllm("train", "classifier", "--data", str(train), "--out", str(OUT / "clf"), "--steps", str(args.steps),
             *init, *common)
    kerasllm("evaluate", str(OUT / "clf"), "--data", str(test), "--output", str(OUT / "metrics-keras.json"))
    kerasllm("export", str(OUT / "clf"), "--out", str(OUT / "bundle"))
    kerasllm("evaluate", str(OUT / "bundle"), "--data", str(test), "--output", str(OUT / "metrics-bundle.json"))
    (OUT / "reviews.txt").write_text("\n".join(REVIEWS) + "\n", encoding="utf-8")
    kerasllm("classify", str(OUT / "bundle"), "--input", str(OUT / "reviews.txt"),
             "--output", str(OUT / "labels.jsonl"), "--top-k", "1")
    kerasllm("embed", str(OUT / "bundle"), "--input", str(OUT / "reviews.txt"),
             "--output", str(OUT / "embeddings.jsonl"), "--normalize")
    print("Labels (ONNX Runtime bundle):")
    for line in (OUT / "labels.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        text = REVIEWS[int(record["id"]) - 1]
        print(f"  {record.get('label', record.get('error')):>9}  {record.get('scores')}  {text}")
    keras_metrics = json.loads((OUT / "metrics-keras.json").read_text())
    bundle_metrics = json.loads((OUT / "metrics-bundle.json").read_text())
    print(f"Test accuracy: Keras {keras_metrics['accuracy']:.3f}, bundle {bundle_metrics['accuracy']:.3f}; "
          f"macro-F1 {bundle_metrics['macro_f1']:.3f}")


if __name__ == "__main__":
    main()
