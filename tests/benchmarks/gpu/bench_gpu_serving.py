"""GPU serving speed (issue 7): kerasllm's fp16 bundles on ONNX Runtime GPU against Hugging Face
transformers on torch, on the same shapes, in one run.

Two steps, because TensorFlow does not run on the device (../shared/gpu/README.md):

1. Here, with TensorFlow: `.venv/bin/python tests/benchmarks/gpu/bench_gpu_serving.py prepare`
   builds random-weight GPT-2-small- and BERT-base-shaped kerasllm models, exports them with
   `kerasllm export --dtype fp16`'s own code (fused attention, GroupQueryAttention over an fp16
   KV buffer written in place, checked against Keras on this CPU), and strips their large
   weights with the device tools' onnx_weights.py into `.dev/gpu/` (~1 MB, ignored by git).
2. On the device, after the README's five ORT-GPU install calls, one call carrying `.dev/gpu` and
   `.dev/tools`: `PYTHONPATH=$HOME/ortgpu/site python3 tests/benchmarks/gpu/bench_gpu_serving.py run`
   refills the weights (random normal * 0.02; speed does not depend on the values) and times,
   in one process, median of `--reps` after warm-up:
   * greedy decoding, 32-token prompts + 128 new tokens (no early stop), batch 1, 8 and 32:
     kerasllm's DecoderSession (IO binding, the KV buffer on the device, greedy's argmax in the
     graph: only token ids come back) driven by generate.py, against HF `generate` with its KV
     cache (SDPA); plus the same decoding with the logits brought to the host every step and
     searched there (`ChoiceOnHost`), for what the in-graph choice saves;
   * prefill, 32 x 128: kerasllm's prompt step (last-position logits) against one HF forward
     (`logits_to_keep=1` where the transformers version has it);
   * encoder forward, 64 x 128: the classifier bundle's graph against HF `BertModel`;
   and prints one table with the ratios, the nodes the decode step ran on the CPU provider (from
   ORT's profile), the fusions, and whether ORT captures the decode step in a CUDA graph (its
   refusal, in its own words, where it does not; where it does, a "decode, CUDA graph" row per
   batch, timed only after its tokens matched the plain steps'); JSON goes to
   `$OUT/gpu_serving.json` when `$OUT` is set.

`--tiny` runs both steps at a tiny shape and `run --device cpu` on the CPU, so the plumbing can
be checked without a GPU (the figures then mean nothing; HF runs in fp32 on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PROMPT, NEW, PREFILL_BATCH, PREFILL_LEN, ENCODER_BATCH, ENCODER_LEN = 32, 128, 32, 128, 64, 128
# GPT-2 small and BERT-base, as transformers' GPT2Config() and BertConfig(); `--tiny` shrinks both.
SHAPES = {
    "full": {"decoder": dict(num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=3072, vocab_size=50257,
                             max_length=1024),
             "encoder": dict(num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=3072, vocab_size=30522,
                             max_length=512)},
    "tiny": {"decoder": dict(num_layers=2, num_heads=4, hidden_dim=64, intermediate_dim=256, vocab_size=1000,
                             max_length=256),
             "encoder": dict(num_layers=2, num_heads=4, hidden_dim=64, intermediate_dim=256, vocab_size=1000,
                             max_length=256)},
}


def weights_tool() -> Path:
    """onnx_weights.py: in .dev/tools on the device (fetch_ortgpu.sh copies it), else ../shared/gpu."""
    for path in (ROOT / ".dev" / "tools" / "onnx_weights.py", ROOT.parent / "shared" / "gpu" / "onnx_weights.py"):
        if path.is_file():
            return path
    raise SystemExit("onnx_weights.py not found: run ../shared/gpu/fetch_ortgpu.sh here first")


# -- step 1: here, with TensorFlow -------------------------------------------------------------------
def prepare(out: Path, size: str) -> None:
    import shutil
    import tempfile

    import keras

    from kerasllm import CausalLM, DecoderConfig, EncoderConfig, TextClassifier
    from kerasllm.export.exporter import ExportOptions, export_model_dir
    from kerasllm.tokenizers import TextTokenizer
    from kerasllm.training import write_json_atomic

    keras.utils.set_random_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    models = {
        "decoder": ("causal-lm", CausalLM(DecoderConfig(**SHAPES[size]["decoder"], dropout=0.0))),
        "encoder": ("classifier", TextClassifier(EncoderConfig(**SHAPES[size]["encoder"], num_labels=2,
                                                               dropout=0.0))),
    }
    # The export reads a tokenizer from the model dir; these benchmarks feed token ids directly.
    tokenizer = TextTokenizer.train(["kerasllm GPU serving benchmark"], kind="byte")
    with tempfile.TemporaryDirectory(prefix="kerasllm-gpu-bench-") as scratch:
        for name, (task, model) in models.items():
            model_dir, bundle = Path(scratch) / name, Path(scratch) / f"{name}-bundle"
            model_dir.mkdir()
            model.save(model_dir / "model.keras")
            tokenizer.save(model_dir)
            write_json_atomic(model_dir / "config.json", {"task": task, "model": model.config.to_dict(),
                                                          **({"labels": ["a", "b"]} if task == "classifier" else {})})
            start = time.perf_counter()
            export_model_dir(model_dir, bundle, ExportOptions(dtype="fp16"), log=lambda m: print(f"  {name}: {m}"))
            print(f"{name}: exported in {time.perf_counter() - start:.0f} s")
            subprocess.run([sys.executable, str(weights_tool()), "strip", str(bundle / "model.onnx"),
                            str(out / f"{name}.onnx")], check=True)
            shutil.copyfile(bundle / "manifest.json", out / f"{name}.manifest.json")
    sizes = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({sizes / 1e6:.1f} MB): carry it with .dev/tools to the device")


# -- step 2: on the device, no TensorFlow ----------------------------------------------------------------
def median_s(function, reps: int, sync=lambda: None) -> float:
    for _ in range(2):
        function()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        function()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def filled(bundles: Path, name: str) -> Path:
    """The graph with its weights recreated (random normal * 0.02), once per machine."""
    full = bundles / f"{name}.full.onnx"
    if not full.exists():
        subprocess.run([sys.executable, str(weights_tool()), "fill", str(bundles / f"{name}.onnx"),
                        str(bundles / f"{name}.onnx.weights.json"), str(full)], check=True)
    return full


def cpu_nodes(path: Path, device: str, drive) -> dict:
    """Nodes per execution provider in one profiled run of `drive(session)`."""
    import onnxruntime as ort

    from kerasllm.export.runtime import Session, parse_device

    kind, device_id = parse_device(device)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / f"profile-{path.stem}")
    providers = ([("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"] if kind == "cuda"
                 else ["CPUExecutionProvider"])
    session = ort.InferenceSession(str(path), options, providers=providers)
    drive(Session(session, "cuda" if kind == "cuda" else "cpu", device_id, "profiled"))
    events = json.loads(Path(session.end_profiling()).read_text())
    placed: dict[str, set] = {}
    for event in events:
        if event.get("cat") == "Node" and "provider" in event.get("args", {}):
            placed.setdefault(event["args"]["provider"], set()).add(event["args"].get("node_index", event["name"]))
    return {provider: len(nodes) for provider, nodes in placed.items()}


def cuda_graph_step(path: Path, device: str):
    """A DecoderSession over `create_session(..., cuda_graph=True)`: greedy decode steps replay one
    captured graph per (batch, capacity), binding fixed tensors (runtime._StepSlot). Returns
    `(step or None, what happened)`, with ORT's refusal in its own words where it refuses (the one
    warning create_session logs, e.g. a node on the CPU provider that needs a copy)."""
    import logging

    from kerasllm.export.runtime import DecoderSession, create_session, parse_device

    kind, _ = parse_device(device)
    if kind != "cuda":  # the same fixed tensors, nothing captured: the dry run's check of the plumbing
        step = DecoderSession(create_session(path, "cpu"), static_steps=True)
        return step, "static steps on the CPU (nothing captured: a dry run)"
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("kerasllm").addHandler(handler)
    try:
        step = DecoderSession(create_session(path, device, cuda_graph=True))
    finally:
        logging.getLogger("kerasllm").removeHandler(handler)
    if not step.session.cuda_graph or not step.static_steps:
        return None, "not used: " + ("; ".join(warnings) or "no reason given")
    return step, "captured, one graph per (batch, capacity)"


def run_kerasllm(bundles: Path, device: str, batches: list[int], reps: int) -> tuple[list[dict], dict]:
    import numpy as np
    import onnxruntime as ort

    from kerasllm.export.generate import ChoiceOnHost, DecodingOptions, generate
    from kerasllm.export.runtime import DecoderSession, create_session

    manifests = {name: json.loads((bundles / f"{name}.manifest.json").read_text()) for name in ("decoder", "encoder")}
    decoder = filled(bundles, "decoder")
    vocab = manifests["decoder"]["config"]["vocab_size"]
    step = DecoderSession(create_session(decoder, device))
    rng = np.random.default_rng(0)
    rows = []
    options = DecodingOptions(max_new_tokens=NEW)
    graph_step, cuda_graph = cuda_graph_step(decoder, device)
    for batch in batches:
        prompts = rng.integers(0, vocab, (batch, PROMPT)).tolist()
        # The graph's greedy choice (`next_token`: only ids leave the device), then, for what that
        # saves, the same decoding with the logits taken to the host each step and searched there,
        # and the decode steps replayed as CUDA graphs (where ORT captures them), checked to give
        # the same tokens first.
        variants = [("decode", step), ("decode, argmax on host", ChoiceOnHost(step))]
        if graph_step is not None:
            try:  # a failure here is reported in the table's notes; the other rows still run
                tokens = [generate(s, prompts, options, pad_id=0) for s in (step, graph_step)]
            except Exception as err:  # ORT's own exception types
                graph_step, cuda_graph = None, f"failed at batch {batch}: " + str(err).splitlines()[0][:300]
            else:
                if [h[0].tokens for h in tokens[0]] == [h[0].tokens for h in tokens[1]]:
                    variants.append(("decode, CUDA graph", graph_step))
                else:
                    cuda_graph = f"replayed steps gave other tokens than plain steps (batch {batch}): not timed"
        for what, stepper in variants:
            seconds = median_s(lambda: generate(stepper, prompts, options, pad_id=0), reps)
            rows.append({"what": what, "batch": batch, "ms": seconds * 1e3, "tokens_per_s": batch * NEW / seconds,
                         "ms_per_step": seconds * 1e3 / NEW})
    ids = rng.integers(0, vocab, (PREFILL_BATCH, PREFILL_LEN))
    mask = np.ones_like(ids)
    seconds = median_s(lambda: step.last_logits(ids, mask), reps)
    rows.append({"what": "prefill", "batch": PREFILL_BATCH, "ms": seconds * 1e3,
                 "tokens_per_s": PREFILL_BATCH * PREFILL_LEN / seconds})
    encoder = create_session(filled(bundles, "encoder"), device).session
    ids = rng.integers(5, manifests["encoder"]["config"]["vocab_size"], (ENCODER_BATCH, ENCODER_LEN))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    names = [o.name for o in encoder.get_outputs()]
    run_options = ort.RunOptions()
    seconds = median_s(lambda: encoder.run(names, feeds, run_options), reps * 2)
    rows.append({"what": "encoder", "batch": ENCODER_BATCH, "ms": seconds * 1e3, "sequences_per_s": ENCODER_BATCH / seconds})
    placement = cpu_nodes(decoder, device, lambda session: generate(DecoderSession(session), prompts[:1],
                                                                     DecodingOptions(max_new_tokens=2), pad_id=0))
    info = {"placement": placement, "fusions": {n: m["optimization"]["fusions"] for n, m in manifests.items()},
            "kv_cache": manifests["decoder"]["optimization"]["kv_cache"], "session": step.session.description,
            "greedy_on_device": step.greedy_on_device, "cuda_graph": cuda_graph}
    return rows, info


def run_hf(device: str, size: str, batches: list[int], reps: int) -> list[dict]:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, GPT2Config

    cuda = device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32  # fp16 matmuls on a CPU measure nothing useful
    target = torch.device(device if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = False
    tiny = size == "tiny"
    gpt2_config = GPT2Config(**(dict(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, n_positions=256) if tiny else {}))
    bert_config = BertConfig(**(dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=256,
                                     vocab_size=1000) if tiny else {}))
    rows = []
    with torch.inference_mode():
        gpt2 = AutoModelForCausalLM.from_config(gpt2_config, attn_implementation="sdpa").to(target, dtype).eval()
        for batch in batches:
            ids = torch.randint(0, gpt2_config.vocab_size, (batch, PROMPT), device=target)
            mask = torch.ones_like(ids)

            def generate():
                gpt2.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              use_cache=True, pad_token_id=0)

            seconds = median_s(generate, reps, sync)
            rows.append({"what": "decode", "batch": batch, "ms": seconds * 1e3, "tokens_per_s": batch * NEW / seconds,
                         "ms_per_step": seconds * 1e3 / NEW})
        ids = torch.randint(0, gpt2_config.vocab_size, (PREFILL_BATCH, PREFILL_LEN), device=target)
        try:
            gpt2(input_ids=ids, logits_to_keep=1)
            keep = {"logits_to_keep": 1}
        except TypeError:  # older transformers: every position's logits
            keep = {}
        seconds = median_s(lambda: gpt2(input_ids=ids, use_cache=True, **keep), reps, sync)
        rows.append({"what": "prefill", "batch": PREFILL_BATCH, "ms": seconds * 1e3,
                     "tokens_per_s": PREFILL_BATCH * PREFILL_LEN / seconds})
        gpt2 = None  # its memory freed before BERT loads
        bert = AutoModel.from_config(bert_config, attn_implementation="sdpa").to(target, dtype).eval()
        ids = torch.randint(5, bert_config.vocab_size, (ENCODER_BATCH, ENCODER_LEN), device=target)
        seconds = median_s(lambda: bert(input_ids=ids, attention_mask=torch.ones_like(ids)), reps * 2, sync)
        rows.append({"what": "encoder", "batch": ENCODER_BATCH, "ms": seconds * 1e3,
                     "sequences_per_s": ENCODER_BATCH / seconds})
    return rows


def run(bundles: Path, device: str, size: str, batches: list[int], reps: int) -> None:
    import onnxruntime as ort

    ours, info = run_kerasllm(bundles, device, batches, reps)
    try:
        theirs = run_hf(device, size, batches, reps)
    except ImportError as err:  # torch / transformers missing: kerasllm's rows alone
        print(f"Hugging Face baseline skipped: {err}")
        theirs = []
    print(f"\n{info['session']}; ORT {ort.__version__}; kerasllm fp16 bundles, random weights, {size} shapes")
    print(f"decode: greedy, {PROMPT}-token prompts + {NEW} new tokens; prefill {PREFILL_BATCH} x {PREFILL_LEN}; "
          f"encoder forward {ENCODER_BATCH} x {ENCODER_LEN}; medians of {reps}")
    print("| what | batch | kerasllm ms | HF ms | kerasllm rate | HF rate | kerasllm / HF | kerasllm ms/step |")
    print("|---|---|---|---|---|---|---|---|")
    for mine in ours:
        what = mine["what"].split(",")[0]  # "decode, argmax on host" is compared with HF's decode too
        other = next((r for r in theirs if r["what"] == what and r["batch"] == mine["batch"]), None)
        unit = "sequences_per_s" if mine["what"] == "encoder" else "tokens_per_s"
        ratio = f"{other['ms'] / mine['ms']:.2f}x" if other else "-"
        print(f"| {mine['what']} | {mine['batch']} | {mine['ms']:.1f} | {other['ms'] if other else float('nan'):.1f} | "
              f"{mine[unit]:,.0f} | {other[unit] if other else float('nan'):,.0f} | {ratio} | "
              f"{mine.get('ms_per_step', float('nan')):.2f} |")
    print(f"decode step nodes by provider: {info['placement']}; KV cache: {info['kv_cache']}; greedy choice in "
          f"the graph: {info['greedy_on_device']}")
    print(f"fusions: {info['fusions']}")
    print(f"CUDA graph of the decode step: {info['cuda_graph']}")
    if os.environ.get("OUT"):
        result = {"kerasllm": ours, "hf": theirs, **info, "device": device, "size": size}
        (Path(os.environ["OUT"]) / "gpu_serving.json").write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("--bundles", type=Path, default=ROOT / ".dev" / "gpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: check the plumbing anywhere")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    size = "tiny" if args.tiny else "full"
    if args.step == "prepare":
        prepare(args.bundles, size)
    else:
        run(args.bundles, args.device, size, [int(b) for b in args.batches.split(",")], args.reps)


def import_kerasllm() -> None:
    """kerasllm from this checkout where it is not installed (the device has no pip access to it):
    `export/` is the package `kerasllm.export` (pyproject's package-dir), found through
    `kerasllm.__path__`."""
    try:
        import kerasllm.export  # noqa: F401 - installed (here)
    except ModuleNotFoundError:
        sys.path.insert(0, str(ROOT))
        import kerasllm

        kerasllm.__path__.append(str(ROOT))


if __name__ == "__main__":
    import_kerasllm()
    main()
