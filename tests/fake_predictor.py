"""A deterministic, TensorFlow-free stand-in Predictor for testing the batch machinery.

A "fake bundle" is a directory with a manifest.json: {"task": ..., "fake": {"max_len": ...,
"delay": seconds per batch, "seq_len": training --seq-len (optional)}}. Tokens are the text's UTF-8 bytes. Results depend only on
the record, never on its batch, so any batching must give the same output:
    generate/translate: the text reversed, upper-cased, cut at max_new_tokens characters
    classify: "long" or "short" (by token count) with two probabilities
    embed: [tokens, sum of ids mod 97] (unit length under normalize)
    tag: each word (a text split on whitespace, or a list of words) tagged "LONG" or "SHORT"
A text equal to "boom" passes `check` but makes `predict` raise RecordError, as a model
failing on one input would. Every batch seen is appended to `FakePredictor.batches`.
With `workers` > 0 the predictor also offers `predict_batches`, predicting that many batches
at a time on threads (as the seq2seq bundle does); each call's batch count is appended to
`FakePredictor.handovers`.

Run as a script, it registers itself and runs the CLI: `python tests/fake_predictor.py generate ...`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kerasllm.export.predict import RecordError

TASKS = ("generate", "translate", "classify", "embed", "tag")


def make_bundle(directory: Path, task: str = "generate", max_len: int = 40, delay: float = 0.0,
                workers: int = 0, seq_len: int | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fake = {"max_len": max_len, "delay": delay, "workers": workers}
    if seq_len is not None:  # the training --seq-len, as a real predictor reports it
        fake["seq_len"] = seq_len
    (directory / "manifest.json").write_text(json.dumps({"task": task, "fake": fake}))
    return directory


class FakePredictor:
    batches: list[list[int]] = []  # token counts of each batch predicted (all instances)
    devices: list[str] = []  # the device each instance was loaded for
    handovers: list[int] = []  # batches handed over by each predict_batches call

    def __init__(self, source: Path, device: str = "cpu"):
        manifest = json.loads((Path(source) / "manifest.json").read_text())
        self.task = manifest["task"]
        self.max_len = manifest["fake"]["max_len"]
        self.delay = manifest["fake"]["delay"]
        self.device = device
        self.trained_seq_len = manifest["fake"].get("seq_len")
        FakePredictor.devices.append(device)
        if manifest["fake"].get("workers"):
            self._pool = ThreadPoolExecutor(manifest["fake"]["workers"])
            self.predict_batches = self._predict_batches  # only then, as a predictor without it

    def _predict_batches(self, batches, **options):
        FakePredictor.handovers.append(len(batches))
        futures = [self._pool.submit(self.predict, batch, **options) for batch in batches]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()

    def check(self, text: str | list[str], truncate: str = "error") -> list[int]:
        if not isinstance(text, str):  # tag: a list of words, as the real tagger takes it
            text = " ".join(text)
        if not text.strip():
            raise RecordError("empty text")
        ids = list(text.encode("utf-8"))
        if len(ids) > self.max_len:
            if truncate == "error":
                raise RecordError(f"text of {len(ids)} tokens is longer than the {self.max_len} the model allows "
                                  "(see --truncate)")
            ids = ids[-self.max_len:] if truncate == "left" else ids[:self.max_len]
        return ids

    def predict(self, batch, **options) -> list[dict]:
        FakePredictor.batches.append([len(ids) for ids in batch])
        if any(bytes(ids) == b"boom" for ids in batch):
            raise RecordError("the model failed on this text")
        if self.delay:
            time.sleep(self.delay)
        return [self._one(bytes(ids).decode("utf-8", "replace"), ids, options) for ids in batch]

    def _one(self, text: str, ids: list[int], options: dict) -> dict:
        if self.task in ("generate", "translate"):
            output = text[::-1].upper()[: options["max_new_tokens"]]
            if options.get("n_best", 1) > 1:
                return {"output": [output + "!" * i for i in range(options["n_best"])],
                        "scores": [-float(i) for i in range(options["n_best"])]}
            return {"output": output}
        if self.task == "classify":
            p = 0.9 if len(ids) > 10 else 0.2
            scores = {"long": p, "short": round(1 - p, 6)}
            if options.get("top_k"):
                scores = dict(sorted(scores.items(), key=lambda kv: -kv[1])[: options["top_k"]])
            return {"label": max(scores, key=scores.get), "scores": scores}
        if self.task == "tag":
            words = text.split()
            return {"tokens": words, "tags": ["LONG" if len(w) > 3 else "SHORT" for w in words],
                    "scores": [1.0] * len(words)}
        vector = [float(len(ids)), float(sum(ids) % 97)]
        if options.get("normalize"):
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            vector = [v / norm for v in vector]
        return {"embedding": vector}


def load(source: Path, device: str = "cpu", **kwargs) -> FakePredictor:
    return FakePredictor(source, device=device)


def register(predictors: dict) -> None:
    for task in TASKS:
        predictors[(task, "bundle")] = "fake_predictor:load"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from kerasllm.cli import main
    from kerasllm.export.predict import PREDICTORS

    register(PREDICTORS)
    main(sys.argv[1:])
