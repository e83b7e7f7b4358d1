"""Token classification end to end on a generated NER task, with the real CLI.

1. write generated sentences with people, cities and dates tagged in BIO (train JSONL, test CoNLL)
2. train a token classifier (each word's tag on its first token)
3. evaluate it in Keras: word accuracy, macro-F1 and entity-level F1 (conlleval rules)
4. export it to a verified ONNX bundle (tags identical, logits within 1e-4 of Keras)
5. evaluate the bundle and batch-tag new sentences on ONNX Runtime, no TensorFlow

Run from the repository root: `python samples/tag.py [--steps N] [--tokenizer bpe]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _cli import kerasllm  # samples/ is on sys.path when a sample runs as a script

OUT = Path("samples/out/tag")
SENTENCES = [
    "Anna Smith flew to New York on 3 May 2020 .",
    "Yesterday Oscar called Iris Nguyen from Buenos Aires .",
    "The train from Oslo to Vienna leaves on Friday .",
    '{"tokens": ["Lena", "was", "born", "in", "Cape", "Town", "in", "1987", "."]}',
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="Training steps.")
    parser.add_argument("--tokenizer", default="char", choices=["char", "byte", "bpe", "unigram"])
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    train, test = OUT / "train.jsonl", OUT / "test.conll"
    kerasllm("sample-data", "ner", "--out", str(train), "--count", "3000", "--seed", "1")
    kerasllm("sample-data", "ner", "--out", str(test), "--count", "500", "--seed", "2")
    kerasllm("train", "token-classifier", "--data", str(train), "--out", str(OUT / "ner"), "--steps", str(args.steps),
             "--tokenizer", args.tokenizer, "--vocab-size", "500", "--preset", "tiny", "--seq-len", "96",
             "--batch-size", "32", "--lr", "3e-3", "--eval-interval", "100")
    kerasllm("evaluate", str(OUT / "ner"), "--data", str(test), "--output", str(OUT / "metrics-keras.json"))
    kerasllm("export", str(OUT / "ner"), "--out", str(OUT / "bundle"))
    kerasllm("evaluate", str(OUT / "bundle"), "--data", str(test), "--output", str(OUT / "metrics-bundle.json"))
    # JSONL input: a text (split on whitespace) or a list of words under "tokens"
    (OUT / "sentences.jsonl").write_text("".join(s + "\n" if s.startswith("{") else json.dumps({"text": s}) + "\n"
                                                 for s in SENTENCES), encoding="utf-8")
    kerasllm("tag", str(OUT / "bundle"), "--input", str(OUT / "sentences.jsonl"), "--output", str(OUT / "tags.jsonl"))
    print("Tags (ONNX Runtime bundle):")
    for line in (OUT / "tags.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "error" in record:
            print(f"  error: {record['error']}")
            continue
        print("  " + " ".join(word if tag == "O" else f"[{word}]{tag}"
                              for word, tag in zip(record["tokens"], record["tags"])))
    keras_metrics = json.loads((OUT / "metrics-keras.json").read_text())
    bundle_metrics = json.loads((OUT / "metrics-bundle.json").read_text())
    print(f"Test word accuracy: Keras {keras_metrics['accuracy']:.3f}, bundle {bundle_metrics['accuracy']:.3f}; "
          f"entity F1 {bundle_metrics['entity_f1']:.3f}, macro-F1 {bundle_metrics['macro_f1']:.3f}")


if __name__ == "__main__":
    main()
