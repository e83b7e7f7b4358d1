"""Seq2seq translation throughput on CPU: the bundle (ONNX Runtime) vs Keras generation, in one run.

Run: `.venv/bin/python tests/benchmarks/bench_seq2seq.py [--preset small] [--sentences 64] [--batch-size 16]`

A `Seq2SeqLM` of the given preset (random weights, shared 64-symbol vocabulary) is saved
as a model directory and exported to a verified bundle (the export's own validation
checks greedy token identity). Then the same source sentences (16-32 tokens) are
translated with `--new-tokens` new tokens each (random weights rarely emit EOS, so
every sentence decodes the full length on both sides; the tokens are compared):

* greedy: `Seq2SeqLM.generate` (XLA while loop, keras-hub GreedySampler) vs the bundle's
  greedy loop (generate.py over encoder.onnx + decoder.onnx with cross K/V bound);
* beam 4: `Seq2SeqLM.generate_n_best` (XLA, kerasllm.models.beam_search: the bundle's rules; keras-hub's
  BeamSampler before 2026-12-06, ninth session) vs the bundle's beam search.

What is compared: the same batches (`--batch-size`, in input order, no bucketing) on both
sides. Keras is called batch by batch (its `generate` takes one batch). The bundle is timed
two ways, both translate_predictor.BundleTranslator:
* "bundle" (the figure against the goal): every batch handed over at once
  (`_generate_batches`, under `predict_batches`, which is what `kerasllm translate` calls with
  each window of batches through export/batch.py), so one worker thread per core decodes a
  whole batch at a time and takes the next as it finishes (only a batch left without
  another for the other core is cut into shards);
* "bundle per batch" (the call before 2026-12-05): one batch per call, each cut into one
  shard per core, the shards joined before the next batch starts.
Outputs are compared token for token with Keras (the two bundle ways must agree exactly).

Keras is timed after a warm-up call per batch shape (XLA compile time is reported
separately); ONNX Runtime after one warm-up pass. Each way is timed `--repeats` times,
interleaved, and the best pass counts. Goal (issue 4): bundle >= 3x Keras.

2026-12-06, ninth session (2-core AMD EPYC), `--keep /tmp/s2s_v4 --repeats 3`, after Keras's beam search
took the bundle's rules (kerasllm.models.beam_search: finished hypotheses leave their slot for a pool,
early stopping at num_beams finished) in place of keras-hub's BeamSampler, and the bundle's beam search
kept the cross keys/values of the rows that stay in place when inputs finish (no fresh gather) and
copied only the filled slots when it expands the self-attention buffer per beam:
    greedy: Keras 368.6 | bundle 959.5 2.60x | per batch 864.2 2.34x, 64/64 identical
    beam 4: Keras 120.1 | bundle 275.6 2.30x | per batch 274.2 2.28x, 64/64 identical (was 50/64)
    greedy: Keras 442.9 | bundle 984.8 2.22x | per batch 901.7 2.04x, 64/64 identical
    beam 4: Keras 117.3 | bundle 276.5 2.36x | per batch 256.9 2.19x, 64/64 identical
The beam ratio fell from 4.3-4.8x because the Keras side is now 2.2-2.7x faster (43-55 -> 117-120
sentences/s: it stops early where keras-hub's loop ran every beam to the last step). The bundle's beam
job gained 5-7% here (one batch of 16, one thread, old and new export/ alternated in 4 process pairs:
medians of 12, 111-129 -> 100-117 ms, faster in 4/4). Then the process (as `kerasllm translate`'s)
let its heap keep freed memory (runtime.retain_freed_memory: a beam batch's new buffers had come as
fresh mmaps whose first writes page-fault), two runs:
    greedy: Keras 432.8 | bundle 1070.9 2.47x | per batch 889.7 2.06x, 64/64 identical
    beam 4: Keras 115.5 | bundle  308.4 2.67x | per batch 278.6 2.41x, 64/64 identical
    greedy: Keras 395.6 | bundle  985.5 2.49x | per batch 862.9 2.18x, 64/64 identical
    beam 4: Keras 114.6 | bundle  295.2 2.58x | per batch 265.9 2.32x, 64/64 identical
Then new beams took their parent's row where no higher-ranked beam had (generate._parents_in_place:
one batch's moved rows 6,952 -> 5,208, its reorders 10.3 -> 8.0 ms), two runs:
    greedy: Keras 408.1 | bundle 1011.8 2.48x | per batch 901.2 2.21x, 64/64 identical
    beam 4: Keras 116.4 | bundle  289.7 2.49x | per batch 270.7 2.33x, 64/64 identical
    greedy: Keras 451.4 | bundle 1054.4 2.34x | per batch 922.4 2.04x, 64/64 identical
    beam 4: Keras 120.6 | bundle  298.5 2.48x | per batch 282.8 2.35x, 64/64 identical
(within these runs' noise of the runs before). Beam 4 still misses 3x, as greedy does. What a beam
batch of 16 costs now on one thread (~90-95 ms): ONNX Runtime ~76 ms, the self-attention buffer's
per-step reorders ~8 ms (memory-bound copies of the forked beams' filled slots), the search's
Python ~6 ms.

2026-12-06, tenth session (same machine, slower that hour: Keras greedy 280-390 sentences/s), after
the decoder's cross-attention grouped its queries per input (optimize.fuse_cached_attention,
metadata `kerasllm.cross_attention_rows`): beam search binds one row of cross keys/values per
input, not a copy per beam. Cross-attention of the 4 layers at 64 rows (16 inputs x 4 beams, 32
source tokens, one thread): 539 -> 241 us a step (the kernel runs 64 [4 x 32] products instead of
256 [1 x 32] ones, over a quarter of the memory). The 4-batch beam job in alternated processes
(3 pairs, medians over 8 s each): 290 / 265 / 269 ms -> 239 / 240 / 246 ms. This command with the
bundle exported before (/tmp/s2s_v4) and after (/tmp/s2s_v5), alternated, `--repeats 5`:
    before: greedy 2.47x, beam 4: Keras  91.9 | bundle 193.8 2.11x, 64/64 identical
    after:  greedy 2.34x, beam 4: Keras  84.3 | bundle 231.1 2.74x, 64/64 identical
    before: greedy 2.54x, beam 4: Keras  97.3 | bundle 213.6 2.19x, 64/64 identical
    after:  greedy 2.43x, beam 4: Keras 102.8 | bundle 245.8 2.39x, 64/64 identical
and the new bundle twice more:
    greedy: Keras 311.5 | bundle 818.1 2.63x | per batch 775.0 2.49x, 64/64 identical
    beam 4: Keras  89.3 | bundle 262.9 2.94x | per batch 264.8 2.97x, 64/64 identical
    greedy: Keras 388.8 | bundle 829.7 2.13x | per batch 759.6 1.95x, 64/64 identical
    beam 4: Keras  92.6 | bundle 245.7 2.65x | per batch 228.8 2.47x, 64/64 identical
(Keras's beam search, like keras-hub's and Hugging Face's seq2seq generation, repeats the cross
keys/values per beam.) Greedy is unchanged (one row per input already). Tried that session and not
kept: the decoder's residual stream as `[B, C]` instead of `[B, 1, C]` (so that ONNX Runtime fuses
each MatMul + bias Add into a Gemm: 20 Gemms): one batch of 16 on one thread, 40 alternated pairs,
greedy 38.3 -> 36.8 ms (faster in 21/40), beam 86.2 -> 82.9 ms (10/20): noise; beam search's step
on all inputs at once in NumPy instead of the loop over inputs (outputs bit-identical, but the ~40
small NumPy calls a step cost what the loop did: 4 alternated process pairs, 3 of them slower);
the workers sharing one pair of single-threaded sessions (one copy of the weights in the caches)
instead of a pair each (20 alternated 4-batch jobs: greedy 96.1 -> 91.6 ms, faster in 13/20; beam
277.6 -> 278.9 ms, 6/20: noise). Measured and not changed: two workers decode the 4-batch job
1.66x (greedy) and 1.69x (beam) as fast as one (two separate processes: ~1.8x), and TensorFlow
loaded with a Keras model run in the same process leaves the bundle's job as it is (3 alternated
process pairs, medians within 7% both ways). Where a greedy batch of 16 goes on one thread (~29
ms): the encoder ~8.5 ms (its MatMuls/Gemms at ~108 GFLOP/s, the core's fp32 peak), 32 decoder
steps of ~0.64 ms, of which the MatMuls ~0.3 ms (at peak) and the attention kernels ~0.26 ms
(GroupQueryAttention and MultiHeadAttention at 16 rows: per-head products of one query, fixed cost).
Kept: beam search's loop over candidates reads Python scalars (the step's candidates converted once,
not per input; math.isfinite, the limits as a list): one beam-4 batch of 16 on one thread, the old
and new generate.py alternated in one process, 2 x 60 runs: 107.3 -> 104.1 and 97.5 -> 93.8 ms
(medians; faster in 38/60 and 39/60), outputs (tokens and scores) identical.
Then (the machine faster: Keras greedy 291-432, beam 103-112 sentences/s) four runs of this command at
b338edc, `--keep` the grouped bundle, `--repeats 5`:
    greedy: Keras 290.7 | bundle  954.0 3.28x;  beam 4: Keras 103.2 | bundle 308.8 2.99x, 64/64 identical
    greedy: Keras 378.1 | bundle  818.7 2.17x;  beam 4: Keras 112.1 | bundle 348.6 3.11x, 64/64 identical
    greedy: Keras 398.4 | bundle  960.8 2.41x;  beam 4: Keras 103.3 | bundle 342.8 3.32x, 64/64 identical
    greedy: Keras 432.3 | bundle  998.2 2.31x;  beam 4: Keras 111.6 | bundle 341.3 3.06x, 64/64 identical
Beam 4 reaches 3x in three of the four runs (2.99x in the fourth); greedy in one (2.17-2.41x in the others).
2026-12-06, eleventh session (same machine), no decoding change, four runs of this command, `--keep` the
grouped bundle, `--repeats 5`:
    greedy: Keras 421.2 | bundle 1052.5 2.50x;  beam 4: Keras 117.8 | bundle 383.9 3.26x, 64/64 identical
    greedy: Keras 322.2 | bundle  814.4 2.53x;  beam 4: Keras 107.2 | bundle 321.4 3.00x, 64/64 identical
    greedy: Keras 349.2 | bundle  847.4 2.43x;  beam 4: Keras 110.4 | bundle 346.4 3.14x, 64/64 identical
    greedy: Keras 413.3 | bundle  992.9 2.40x;  beam 4: Keras 110.1 | bundle 351.2 3.19x, 64/64 identical
Beam 4 is at or above 3x in all four; greedy is not (2.40-2.53x). The cross-attention kernel at greedy's
shape (16 rows, 32 source positions, 4 layers, one thread, medians of 30 x 50 runs), against other ways
ONNX Runtime 1.31 offers: MultiHeadAttention with the int32 key padding mask (as exported) 154.0 us,
ONNX's opset-23 Attention (keys/values `[B, S, C]`, a bool mask) 164.7 us, block-diagonal batched
MatMuls (the queries spread over a per-head mask, keys stored `[B, C, S]`: 2 MatMuls, Softmax, Mul,
ReduceSum) 177.7 us; MultiHeadAttention with the mask as key lengths `[B]` 146.0, with no mask at all
137.4: the masking is ~5% of the kernel, the rest its per-(row, head) products. DecoderMaskedMultiHead-
Attention has a CPU kernel, but for cross-attention and beamless self-attention it calls the same
ApplyAttention as MultiHeadAttention (its beam path does a scalar dot per key). What greedy would need
(~25 ms a batch of 16 on one thread against ~29) is therefore a one-query attention kernel of our own
or a GPU, as before. The most such a kernel could give for cross-attention: the grouped bundle with its 4
cross-attention nodes replaced by Identity (outputs wrong, time only), one greedy batch of 16 on the 2
cores, 40 alternated runs: 21.84 -> 18.32 ms (medians), 16% of the batch; self-attention (GroupQuery-
Attention) costs about half as much again, so even free attention kernels would lift greedy by ~25%.

2026-12-06, twelfth session (same machine), no decoding change, `--keep` the grouped bundle, `--repeats 5`,
four runs (the first's greedy line was lost to a truncated log):
    greedy: Keras 439.6 | bundle 1047.6 2.38x;  beam 4: Keras 121.8 | bundle 378.3 3.11x, 64/64 identical
    greedy: Keras 350.4 | bundle  823.6 2.35x;  beam 4: Keras 110.8 | bundle 335.8 3.03x, 64/64 identical
    greedy: Keras 425.8 | bundle  997.3 2.34x;  beam 4: Keras 103.2 | bundle 339.7 3.29x, 64/64 identical
    beam 4 (first run): Keras 120.4 | bundle 377.2 3.13x
Beam 4 stays above 3x; greedy at 2.34-2.38x does not.

2026-12-07, thirteenth session (same machine, a slow phase: Keras greedy 288-320 sentences/s against
350-440 the session before), no decoding change, `--keep` the grouped bundle, `--repeats 5`, two runs:
    greedy: Keras 288.5 | bundle 692.4 2.40x;  beam 4: Keras  97.8 | bundle 299.1 3.06x, 64/64 identical
    greedy: Keras 320.4 | bundle 759.6 2.37x;  beam 4: Keras  91.5 | bundle 254.4 2.78x, 64/64 identical

2026-12-07, fourteenth session (same machine), after the bundle's load-time checks (manifest against
graphs, tokenizers against vocabularies) and the predictors' per-batch token id checks, `--keep` the
grouped bundle, `--repeats 5`, two runs back to back, nothing else running:
    greedy: Keras 263.1 | bundle 816.5 3.10x;  beam 4: Keras 104.3 | bundle 305.7 2.93x, 64/64 identical
    greedy: Keras 341.9 | bundle 814.6 2.38x;  beam 4: Keras 105.1 | bundle 308.8 2.94x, 64/64 identical
The bundle's own figures are steady (815-817 and 306-309 sentences/s); Keras's greedy moved 30% between
the runs, and with it the ratio: one run reaches 3x, the other does not.

2026-12-07, fifteenth session (same machine), no decoding change, `--keep` the grouped bundle, `--repeats 5`,
nothing else running:
    greedy: Keras 426.4 | bundle 985.8 2.31x;  beam 4: Keras  95.8 | bundle 303.6 3.17x, 64/64 identical

2026-12-07, sixteenth session (same machine), nothing else running, `--keep` the grouped bundle, `--repeats 5`,
before and after the day's changes (the translate workers' sessions opened from the graph bytes checked at
load; seeded sampling's per-batch seeds, which greedy and beam search do not take):
    before: greedy: Keras 438.1 | bundle 1003.4 2.29x;  beam 4: Keras  96.9 | bundle 303.2 3.13x, 64/64 identical
    after:  greedy: Keras 447.9 | bundle 1011.2 2.26x;  beam 4: Keras 109.2 | bundle 335.4 3.07x, 64/64 identical

2026-12-07, seventeenth session (same machine), nothing else running, no decoding change, `--keep` the grouped
bundle, `--repeats 5`:
    greedy: Keras 405.7 | bundle 1014.9 2.50x;  beam 4: Keras 110.0 | bundle 321.5 2.92x, 64/64 identical

2026-12-07, eighteenth session (same machine, a fast phase: Keras greedy 599 against 406 the session before),
nothing else running, no decoding change, `--keep` a bundle exported fresh at 1c1766d, `--repeats 5`:
    greedy: Keras 598.5 | bundle 1300.0 2.17x;  beam 4: Keras 126.8 | bundle 389.9 3.07x, 64/64 identical

2026-12-07, nineteenth session (same machine), nothing else running, `--keep` the same bundle, `--repeats 5`: at
883bd03 (the session's start), then twice at 5dd0eab (after the day's serving fixes: options checked per call,
the translator's pool keyed by its pid, forked children keeping their sessions; nothing in the decoding loops):
    883bd03: greedy: Keras 368.7 | bundle  940.5 2.55x;  beam 4: Keras 132.9 | bundle 398.9 3.00x, 64/64 identical
    5dd0eab: greedy: Keras 384.0 | bundle  935.4 2.44x;  beam 4: Keras 113.3 | bundle 290.5 2.56x, 64/64 identical
    5dd0eab: greedy: Keras 619.8 | bundle 1486.3 2.40x;  beam 4: Keras 129.2 | bundle 416.7 3.23x, 64/64 identical
(the second 5dd0eab run straight after the first: the bundle's beam figure moved 43% with the machine's phase.)

2026-12-07, twentieth session (same machine), nothing else running, `--keep` the same bundle, `--repeats 5`, at 3ce1e34
(the session's start) and at e89adac (after the day's changes: the byte-level tail check once per output text, the
job record and output checks once per job; nothing in the decoding loops; a fast phase of the machine):
    3ce1e34: greedy: Keras 442.2 | bundle  935.7 2.12x;  beam 4: Keras 114.9 | bundle 331.7 2.89x, 64/64 identical
    e89adac: greedy: Keras 720.1 | bundle 1658.6 2.30x;  beam 4: Keras 166.4 | bundle 557.1 3.35x, 64/64 identical

2026-12-08, twenty-first session (same machine), nothing else running, `--keep` the same bundle, at 7e01e83:
    greedy: Keras 296.7 | bundle  894.0 3.01x;  beam 4: Keras 117.9 | bundle 349.6 2.97x, 64/64 identical
and `--batch-size 64 --sentences 256 --repeats 3` (whether larger batches change the picture: they do not):
    greedy: Keras 429.3 | bundle 1021.3 2.38x;  beam 4: Keras 121.9 | bundle 438.1 3.59x, 256/256 identical
Where a greedy job goes (4 batches of 16, 32 tokens, one process, ONNX Runtime's runs timed by wrapping
`run_with_iobinding`): on one worker 93-100 ms, of which ONNX Runtime 80-85 ms and Python 13-15 ms; on two
workers 63-69 ms, ONNX Runtime's runs summed over both threads 103-111 ms (~29% more kernel time than on one
core) and Python the same 12-14 ms a thread. The loss is the hardware's, not the GIL's: the 2-batch job alone
in one process took a median 52.1 ms and two such processes at once 62.3 / 65.8 ms, and XLA's dots at the
training shapes (one thread each) fell from 152-203 to 127-164 GFLOP/s with a second process beside them.
The encoder's kernels are ~8.2 ms of a batch (profiled: its MatMuls/Gemms and the fused Attention at ~170
GFLOP/s, MLAS's AVX-512 kernels; OpenBLAS's single-thread SGEMM here: 106 GFLOP/s), a decoder step's MatMuls
at the core's rate: the fp32 floor of a batch on one core is ~18 ms against the ~21-24 ms measured.
At the session's end (fce6414; the day's changes are in the readers and job records, not the decoding loops):
    greedy: Keras 468.5 | bundle  904.1 1.93x;  beam 4: Keras 124.0 | bundle 352.2 2.84x, 64/64 identical
The bundle's figures held (894 -> 904 and 350 -> 352 sentences/s); Keras's greedy moved 58% (297 -> 469).

Measured 2026-12-05, night session, after denormals were flushed on the worker threads too
(runtime.flush_denormals: ORT's session option had reached only its pool threads and the
process's first session's thread, not the translation workers; in one process, alternating,
the 4-batch job 55.6 -> 53.1 ms median, faster in 40/40 pairs, outputs identical), --keep:
    greedy: Keras 365.3 | bundle 1039.4 2.85x | per batch 830.1 2.27x; beam 4 6.48x
    greedy: Keras 443.1 | bundle 1236.3 2.79x | per batch 990.9 2.24x; beam 4 6.84x  (fast phase)
    greedy: Keras 419.2 | bundle 1196.3 2.85x | per batch 924.2 2.20x; beam 4 6.55x
The 4% moved less than these runs' noise: greedy stays short of 3x. Also measured that night
and not kept: MultiHeadAttention with no mask and the padding as a -BIG score term through an
extra head dimension (the unmasked kernel is the flash one only at head size 32; 33: 440 vs
213 us), cross-attention as one head over a block-diagonal bias (4 queries x 128 keys per row:
34-37 vs 32-35 us), the encoder's Attention as plain ops (611 vs 604 us with denormals flushed),
ORT's SkipLayerNormalization at decode shapes (19 vs 10 us for bias + residual + LayerNorm),
session options (no memory pattern, no arena, extended-only optimizations: within 1%). What a
decoder step (16 rows, ~500 us) is made of, from single-op timings with hot caches: MatMuls
~180 us at ~180 GFLOP/s, cross-attention ~135 us and GroupQueryAttention ~80 us (kernel
overhead: their arithmetic is < 1 us), ~100 Adds/LayerNorms/BiasGelus/others at 1-4 us each.

2026-12-06 (later session), after the fp16 decoders' in-graph greedy choice (fp32 bundles, as here, are
unchanged: their steps still return logits), `--keep --repeats 3`, two runs back to back:
    greedy: Keras 358.4 | bundle 1041.2 2.91x | per batch 831.6 2.32x; beam 4 6.19x
    greedy: Keras 364.4 | bundle  994.2 2.73x | per batch 794.3 2.18x; beam 4 4.88x
(an earlier run the same hour, machine in a slow phase: greedy 2.25x, beam 7.38x). What changed on
the fp32 path: the logits copy goes through a method (StepOutputs.logits, 0.46 vs 0.39 us for the
bare copy, against a ~500 us step) and a flag is passed along; the whole greedy job run by the old
and the new tree in alternating processes (6 pairs) moved with the machine's drift either way.
Tried that session and not kept: each layer's three `Add(residual, Add(MatMul, bias))` pairs as one
ONNX `Sum` of three (88 -> 76 decoder nodes, logits identical): 545.6 vs 546.3 us a 16-row step
(medians of 40 alternated blocks of 100 runs, faster in 18/40): a node's dispatch is not what an
Add costs here. Where the greedy job's time went (instrumented, 4 batches of 16): one worker
102.6 ms (encoder 7.8 ms a batch, decoder runs 0.517 ms), two workers 55.4 ms (1.85x; encoder
7.7-8.2 ms, runs 0.54-0.57 ms, ~1.3 ms of Python a batch).

Measured 2026-12-06 with `--repeats 10` (best of 10 interleaved, so both sides more likely get a
pass in the machine's fast phase; its speed was bimodal that night, the same Python work taking
6.8 or 10.2 ms): greedy Keras 346.2 | bundle 969.5 2.80x | per batch 758.8 2.19x; beam 4 5.83-6.85x.
2026-12-06, `--keep --repeats 3`: greedy 2.92x (Keras 352.2, bundle 1028.1 sentences/s), beam 4 6.54x.
Per worker in the 4-batch job (instrumented): encoder 9.0-9.5 ms a batch (~30%), 64 decoder runs
~0.62 ms each (~65%), ~1.5 ms of Python a batch. Tried that day and not kept: each worker thread
pinned to its own core (60 alternated jobs: faster in 32/60, medians 92.4 vs 93.0 ms), the two
workers sharing one pair of single-threaded sessions (1.033x slower, 29/100), BiasGelu vs Add + ONNX
Gelu at the encoder's shape (191 vs 232 us a layer: <1% of the job). A decoder step costs ~4% more
with the other core busy (706 vs 736 us, slow phase): the workers hardly slow each other.
Tried that night and not kept: the encoder's fused Attention split into the QKV MatMul on the packed
tokens + ONNX's opset-23 Attention (8.40 -> 7.67 ms per encoder batch alone, outputs identical, but
the 4-batch job in one process over 3 x 300 alternations: 1.000, 1.024, 1.000).

2026-12-06 (fifth session), no decoding change, `--keep --repeats 3`: greedy Keras 314.1 | bundle
930.0 sentences/s 2.96x | per batch 580.7 1.85x, greedy outputs 64/64 identical; beam 4 5.65x. (An
earlier run while another job's `pip install` shared the cores is not counted: greedy 2.06x.)
2026-12-06 (sixth session), no decoding change, `--keep --repeats 3`, the machine in a fast phase: greedy
Keras 433.7 | bundle 1207.9 sentences/s 2.79x | per batch 921.2 2.12x, 64/64 identical; beam 4 6.31x.
A second run 45 minutes later, in a fast phase (Keras fastest so far): greedy Keras 465.3 | bundle
1287.2 2.77x | per batch 2.23x, 64/64 identical; beam 4 6.46x.
2026-12-06 (seventh session), no decoding change, `--keep --repeats 3`: greedy Keras 405.9 | bundle 1142.5
sentences/s 2.81x | per batch 942.5 2.32x, 64/64 identical; beam 4 6.65x.
The encoder on one thread (ORT profile, 16 rows of 16-32 tokens, a slow phase, 11.0 ms a
batch): Attention 3.1 ms (QKV projection over the padded positions ~0.37 ms and ~0.38 ms of
per-(row, head) work a layer), MatMul/Gemm 4.2 ms at ~135 GFLOP/s, BiasGelu 1.1 ms, the
cross-attention K/V projections 0.74 ms, ~1.2 ms of Gather/Transpose/Slice/Reshape.

Measured 2026-12-05, later session, after the padding-free encoder (export/token_packing.py: the
encoder's token-wise layers on the real tokens only; a quarter of these batches' positions are
padding) and CPU sessions without ORT's SkipLayerNormFusion (runtime.py), --keep, one line per run:
    greedy: Keras 410.4 | bundle 1166.7 2.84x | per batch 920.0 2.24x; beam 4 5.14x
    greedy: Keras 336.4 | bundle  752.2 2.24x | per batch 581.5 1.73x; beam 4 6.19x  (slow phase)
    greedy: Keras 407.8 | bundle 1178.8 2.89x | per batch 935.3 2.29x; beam 4 6.57x
    greedy: Keras 407.7 | bundle 1167.7 2.86x | per batch 933.4 2.29x; beam 4 6.51x
  then the decoder taking GroupQueryAttention's seqlens_k / total_sequence_length as inputs
  (seq2seq_export.share_self_attention_buffer: 98 -> 88 nodes; the 4-batch job 60.0 -> 59.1 ms
  median in one process), a fresh export and then --keep:
    greedy: Keras 414.0 | bundle 1169.9 2.83x | per batch 951.2 2.30x; beam 4 6.60x
    greedy: Keras 371.5 | bundle 1085.5 2.92x | per batch 738.1 1.99x; beam 4 7.02x
    greedy: Keras 357.1 | bundle  702.4 1.97x | per batch 790.8 2.21x; beam 4 6.88x
  (in the last run the whole-batch job came out below the per-batch call, with nothing else
  running on the machine: with 4 batches on 2 workers, a core the host takes away for a while
  leaves one worker's batch last, and the job waits for it.)
Greedy 64/64 identical to Keras in every run. In one process, alternating (the 4-batch job,
medians of 20): before 101.4 ms, after 96.5 ms; one encoder batch 13.96 -> 12.13 ms (a slow
phase of the machine; the job took 54-60 ms in quieter minutes). Greedy still short of 3x
(2.84-2.89x in the quieter runs). Tried and dropped in the same session: the decoder's residual
stream as 2-D rows so ORT fuses MatMul + bias into Gemm (0.96x), cross-attention as
FusedMatMul/Softmax/MatMul (same time as MultiHeadAttention), GroupQueryAttention over each row's
real source positions (66 vs 37 us per call in isolation), 3 workers on 2 cores (0.87x), worker
processes instead of threads (the same time: the GIL is not what is left). Where a decoder step
goes now (16 rows, in place, ablation): the 4 cross-attention nodes ~27% (~45 us each: 64
(row, head) pairs of tiny GEMMs whose keys/values, 128 KB per row per step, come from L3),
GroupQueryAttention ~16%, the rest mostly MatMul. A 32-row step costs 1.8x a 16-row one, so
the cost is per row, not per weight read.

Measured 2026-12-05 on the 2-core machine (under the CPU lock; another session's unlocked jobs ran
at times, and Keras ran faster than on 2026-12-02: greedy 343-419 sentences/s against 259-302), one
bundle kept (--keep) for every run, defaults (best of 3 interleaved), one line per run:
"bundle" = whole batches on one worker per core (BundleTranslator._generate_batches, as `kerasllm
translate` hands a window over), "per batch" = the same code called one batch at a time (what this
benchmark timed before: each batch in two 8-row shards, joined before the next batch):
    greedy: Keras 353.2 | bundle  891.0 2.52x | per batch (not printed by that run's filter)
    greedy: Keras 352.6 | bundle  929.7 2.64x | per batch 733.8 2.08x   (--repeats 5)
    greedy: Keras 408.6 | bundle 1033.7 2.53x | per batch 725.9 1.78x
    greedy: Keras 343.1 | bundle  967.9 2.82x | per batch 802.5 2.34x
    greedy: Keras 419.3 | bundle 1178.0 2.81x | per batch 971.5 2.32x
    greedy: Keras 387.6 | bundle 1051.4 2.71x | per batch 835.5 2.16x
    greedy: Keras 353.5 | bundle  996.4 2.82x | per batch 814.8 2.31x
    greedy: Keras 381.8 | bundle 1028.7 2.69x | per batch 839.4 2.20x
    greedy: Keras 394.2 | bundle 1075.1 2.73x | per batch 849.4 2.15x
    greedy: Keras 373.0 | bundle  968.9 2.60x | per batch 710.8 1.91x
    greedy: Keras 363.1 | bundle  877.3 2.42x | per batch 740.7 2.04x
    beam 4 (same runs): bundle 6.30x 6.46x 6.72x 6.83x 6.39x 6.16x 6.29x 6.34x 6.33x 6.57x 5.97x,
                        per batch -, 5.75x 6.01x 6.20x 5.75x 5.49x 5.40x 5.37x 4.58x 6.02x 5.09x
                        (Keras 43.2-55.0, bundle 273.5-351.2, per batch 197.8-316.2 sentences/s)
  then the command exactly as the goal states it (a fresh export per run), after the test suite:
    greedy: Keras 425.4 | bundle 1126.5 2.65x | per batch 940.7 2.21x; beam 4 5.79x, per batch 5.24x
    greedy: Keras 238.4 | bundle  472.0 1.98x | per batch 382.0 1.60x; beam 4 4.02x, per batch 3.70x
            (the machine at half speed in that run: export 21 s instead of 16, Keras 238 instead of ~400)
  then with --keep again, while the other session ran its unit tests and scripts beside the lock:
    greedy: Keras 242.3 | bundle  482.5 1.99x | per batch 388.8 1.60x; beam 4 5.57x, per batch 4.35x
    greedy: Keras 320.1 | bundle  635.3 1.98x | per batch 527.1 1.65x; beam 4 8.15x, per batch 7.37x
Greedy outputs 64/64 identical to Keras in every run, both bundle ways identical to each other (the
benchmark stops otherwise); beam 50/64 as before. Whole batches per worker: +12-29% over the per-batch
call in the same run (+20% in the median run); greedy still misses 3x (2.42-2.82x; ~2x loaded). Where the time goes now (16 rows, one
thread, the bench's batches, quiet machine): ~25 ms a batch = encoder ~8.6 ms (16 x <=32 tokens,
~95 GFLOP/s, as good as dense compute gets here: encoding each row alone costs 12.3 ms, sorting
rows into length groups of 4 saves ~1.3 ms) + 32 decoder runs of ~0.50 ms (a 16-row step costs 1.5x
an 8-row one, not "little more": 0.67 vs 0.44 ms in one loop) + ~18 us of Python between runs (0.6
ms a batch). Two workers in one process ~24.6-25.8 ms a batch each, two processes 23.4-23.9 ms (the
GIL, ~5%). The 4-batch job alone in a process (no TensorFlow) took 52-56 ms at the quietest
(~1,150-1,230 sentences/s, ~3x these Keras figures) and 58-68 ms at other times of the session, with
or without TensorFlow loaded and a Keras model run in the process (TF's threads do not spin after
generate; freezing its 350k Python objects out of the GC changed nothing): the machine's speed
varied by ~20% within minutes, which is the spread of the ratios above.
ORT session knobs for the workers' sessions (memory pattern off, arena off, extended instead of all
optimizations) change a batch by < 3%; prepacking off costs 18%. Per decoder step (ORT profile,
16 rows): MatMul 31%, cross-attention MultiHeadAttention 18%, Add 15%, GroupQueryAttention 14%,
LayerNorm 8%, BiasGelu 5%, small shape ops (Shape, Gather, Sub, ReduceSum, Cast, Squeeze, Range:
positions and the attention lengths from the mask) ~6%. What is left to cut is inside ORT's kernels
or in the exported graph (e.g. the lengths as an input), not in the runtime's Python.

Measured 2026-12-02 on the 2-core machine (under the CPU lock; other sessions' unlocked jobs made it
noisy), batch 16, best of 3 interleaved, one line per run. Before (f4fb7c3, its own export), runs
interleaved with the first three after-runs:
    greedy: Keras 275.4 / 291.7 / 279.0 vs bundle 350.7 / 335.6 / 323.2 sentences/s -> 1.27x 1.15x 1.16x
    beam 4: Keras  47.8 /  49.1 /  48.0 vs bundle 151.2 / 157.6 / 150.7 sentences/s -> 3.16x 3.21x 3.14x
After (57e73d3 bundle, 2 shards):
    greedy: Keras 296.1 / 285.1 / 288.8 vs bundle 588.3 / 518.2 / 530.0 sentences/s -> 1.99x 1.82x 1.84x
    beam 4: Keras  49.5 /  47.8 /  49.1 vs bundle 195.8 / 198.5 / 202.6 sentences/s -> 3.95x 4.15x 4.13x
After (eccd007, a fresh export per run):
    greedy: Keras 297.1 / 286.9 / 293.6 vs bundle 523.9 / 485.1 / 515.1 sentences/s -> 1.76x 1.69x 1.75x
    beam 4: Keras  48.8 /  50.2 /  49.9 vs bundle 187.9 / 211.4 / 195.0 sentences/s -> 3.85x 4.21x 3.91x
Later on 2026-12-02, host-side work of the greedy loop (d943798, 9173887, 7c44e18), one bundle kept
(--keep) for every run, before = be09859's code from a worktree, runs alternated before/after:
    before greedy: 2.03x 1.78x 2.03x 1.89x 1.80x 1.88x (bundle 614.6 / 507.5 / 583.0 / 489.7 / 475.7 / 521.5)
    after  greedy: 2.21x 1.98x 1.92x (first three: d943798 + 9173887 only) 2.18x 1.90x 2.25x
                   (bundle 630.2 / 566.5 / 543.0 / 564.9 / 513.4 / 656.4 sentences/s); 64/64 identical in every run
    before beam 4: 4.13x 4.03x 4.06x 3.63x 3.93x 3.99x; after 4.48x 4.44x 4.33x 4.31x 4.46x 4.51x (50/64 as before)
The machine was loaded (Keras 259-302 sentences/s between runs), so the run-to-run spread hides most of
the gain; the greedy bundle side alone, old/new generate.py alternated 30 times in one process: median
104.3 -> 96.6 ms (7%). Greedy still misses 3x (~1.9-2.25x). What it was: seq2seq greedy decoding passes
EOS as a stop id, so it ran generate.py's general loop (a dozen array ops and reductions per step),
not the no-stop fast path; between two decoder runs every NumPy call costs ~5-9 us (caches cold after
the run), so the Python between runs was 55-57 us against ~400-500 us of ONNX Runtime. Now: a lean
greedy loop with stop ids (argmax into the next input's shape, stop test on a list, rows booked only
when one stops, tokens written out after the loop) -> 40 us, against 33 us for a bare argmax + run
loop; finished rows leave the shared self-attention buffer in place (~190 -> ~30 us each, ~7 per
pass). Left, per 8-row shard alone on a core: ~4.6-5.6 ms of encoder and 32 x ~0.37-0.42 ms of decoder
runs (ORT), ~2.5-2.9 ms outside ORT as timed by wrappers that add some of it themselves (~1.3 ms of it
the 40 us between runs); further host-side cuts are worth a few percent at most, not the ~40% 3x needs.
What changed the bundle side: the decoder's self-attention is GroupQueryAttention over an in-place
KV buffer with one IO binding per batch (seq2seq_export.share_self_attention_buffer; 109 -> 99
nodes; a step in a 32-step loop 1.05 -> 0.86 ms at batch 16 on 2 threads, 0.74 -> 0.61 ms at batch 8
on 1 thread), and BundleTranslator decodes a batch in shards, one per core, each on its own
single-threaded sessions (a step's cost is nearly all fixed: 8 rows on 1 thread cost 0.61 ms, 16 on
2 threads 0.86 ms). 2026-12-01's changes: encoder attention fused (Attention), cross-attention
MultiHeadAttention over the encoder's K/V, finished rows and beams leave the batch.
Greedy still misses the 3x goal (1.7-2.0x): 3x is ~75 ms for the 64 sentences; the bundle takes
~110-130 ms: per shard and batch, the encoder ~5 ms (8 x <=32 tokens on one core, ~80-100 GFLOP/s)
and 32 steps of ~0.65 ms (ORT kernels at batch 8: 25 MatMuls ~200 us, 4 GroupQueryAttention +
4 MultiHeadAttention ~140 us, LayerNorm/Add/BiasGelu ~85 us, the rest per-node overhead; ~5 MB of
weights and K/V stream from L3 each step). Measured and not kept: cross-attention as plain ops
(block-diagonal batched MatMuls: 18 us a layer against MultiHeadAttention's 15, batch 8, one
thread), more shards than cores (3 shards: 611 -> 424 sentences/s), MatMul + bias Add as one Gemm
(5.7 us against 4.4 + 0.8, single-op chains). Greedy outputs identical 64/64 in every run.
Beam outputs differ on some random-weight inputs (50/64 identical):
Keras runs keras-hub's BeamSampler (finished beams continue with pad at probability 1), the bundle
generate.py's beam search (a pool of finished hypotheses). On the trained numbers model, the two inputs
compared by hand gave the same 2-best outputs and scores (to 1e-5); no test asserts Keras/bundle beam equality.

2026-12-06, eighth session, on another machine (2 cores of an AMD EPYC, Zen 4), after generation
began suppressing special tokens but EOS (both sides; ~1% of the bundle's job in one process,
72.7 vs 72.1 ms, 23/60 faster: not measurable apart), `--keep --repeats 3`, four runs:
    greedy: Keras 396.3 | bundle  780.1 1.97x | per batch 868.9 2.19x; beam 4 4.57x  (export in the same process)
    greedy: Keras 415.4 | bundle  992.1 2.39x | per batch 903.3 2.17x; beam 4 4.69x
    greedy: Keras 422.8 | bundle  980.7 2.32x | per batch 869.8 2.06x; beam 4 4.33x
    greedy: Keras 352.7 | bundle  831.2 2.36x | per batch 810.6 2.30x; beam 4 4.83x
Keras runs as fast as on the Xeon; ONNX Runtime's kernels do not. One worker's batch of 16 (one
thread, instrumented): 31.0 ms = encoder 10.0 ms, 32 decoder runs of 578 us (18.5 ms), Python 2.5
ms. In an ORT profile of the decoder (profiling on, a run 1.37 ms) the two attention kernels
(cross MultiHeadAttention and GroupQueryAttention, 64 (row, head) pairs each per call) take ~350 us
a step, nearly as much as its MatMuls (~400 us for ~30 MFLOP); 3x Keras would need the batch at
~24.5 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def timed(function, batches):
    """Seconds of `function(batches)` and its outputs (one token list per sentence)."""
    start = time.perf_counter()
    outputs = function(batches)
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Timed passes per side, interleaved Keras/bundle; the best pass counts (noisy shared CPU).")
    parser.add_argument("--keep", type=Path, help="Keep the model dir and bundle here (and reuse them if present).")
    args = parser.parse_args()

    import keras
    import numpy as np

    from kerasllm import Seq2SeqConfig, Seq2SeqLM
    from kerasllm.export import runtime
    from kerasllm.export.exporter import export_model_dir
    from kerasllm.export.translate_predictor import BundleTranslator
    from kerasllm.tokenizers import TextTokenizer
    from kerasllm.training import save_model_atomic, write_json_atomic

    keras.utils.set_random_seed(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,-'"
    tokenizer = TextTokenizer.train([alphabet], kind="char")
    config = Seq2SeqConfig.preset(args.preset, vocab_size=tokenizer.vocab_size, dropout=0.0)
    model = Seq2SeqLM(config)
    rng = np.random.default_rng(0)
    sources = [rng.integers(6, config.vocab_size, int(rng.integers(16, 33))).tolist() for _ in range(args.sentences)]
    batches = [sources[i:i + args.batch_size] for i in range(0, len(sources), args.batch_size)]
    new = args.new_tokens
    print(f"seq2seq '{args.preset}': {model.count_params():,} parameters, {len(sources)} sentences of 16-32 tokens, "
          f"batch {args.batch_size}, {new} new tokens, {os.cpu_count()} CPUs", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        run, bundle = root / "run", root / "bundle"
        if (bundle / "manifest.json").is_file():
            model = keras.models.load_model(run / "model.keras")
        else:
            run.mkdir(parents=True)
            tokenizer.save(run)
            write_json_atomic(run / "config.json", {"task": "seq2seq", "model": config.to_dict(), "train": {}})
            save_model_atomic(model, run)
            start = time.perf_counter()
            export_model_dir(run, bundle, log=lambda message: None)
            print(f"export (convert, optimize, validate): {time.perf_counter() - start:.1f} s", flush=True)
        # As `kerasllm translate`'s process does (export/runtime.py; TensorFlow's tensors have their own
        # allocator, so the Keras side keeps its memory behaviour).
        runtime.retain_freed_memory()
        translator = BundleTranslator(bundle, device="cpu", threads=args.threads)
        results = {}
        for name, beams in (("greedy", 1), ("beam 4", 4)):
            options = translator.options(max_new_tokens=new, num_beams=beams)  # EOS stops, specials suppressed
            if beams == 1:
                def keras_call(batches):
                    return [o for batch in batches for o in model.generate(batch, max_new_tokens=new)]
            else:
                def keras_call(batches, beams=beams):
                    return [best[0][0] for batch in batches
                            for best in model.generate_n_best(batch, max_new_tokens=new, num_beams=beams)]

            def bundle_job(batches, options=options):  # all at once, as `kerasllm translate` hands a window over
                return [hyps[0].tokens for hyps_batch in translator._generate_batches(batches, options)
                        for hyps in hyps_batch]

            def bundle_per_batch(batches, options=options):  # one call per batch, each split in shards
                return [o for batch in batches for o in bundle_job([batch], options)]

            sides = {"keras": keras_call, "bundle": bundle_job, "bundle per batch": bundle_per_batch}
            start = time.perf_counter()
            for shape_batch in {(len(b), max(len(s) for s in b)): b for b in batches}.values():
                keras_call([shape_batch])  # XLA compile per shape
            compile_s = time.perf_counter() - start
            bundle_job(batches)
            seconds = dict.fromkeys(sides, float("inf"))
            outputs = {}
            for _ in range(args.repeats):  # interleaved, so load spikes hit every side alike
                for side, call in sides.items():
                    elapsed, outputs[side] = timed(call, batches)
                    seconds[side] = min(seconds[side], elapsed)
            if outputs["bundle"] != outputs["bundle per batch"]:
                raise SystemExit(f"{name}: the bundle's outputs depend on how the batches were handed over")
            identical = sum(a == b for a, b in zip(outputs["keras"], outputs["bundle"]))
            tokens = sum(len(o) for o in outputs["bundle"])
            rate = {side: len(sources) / s for side, s in seconds.items()}
            results[name] = {"keras_sentences_per_s": rate["keras"], "bundle_sentences_per_s": rate["bundle"],
                             "speedup": seconds["keras"] / seconds["bundle"],
                             "bundle_per_batch_sentences_per_s": rate["bundle per batch"],
                             "speedup_per_batch": seconds["keras"] / seconds["bundle per batch"],
                             "keras_compile_s": compile_s, "bundle_tokens_per_s": tokens / seconds["bundle"],
                             "identical_outputs": f"{identical}/{len(sources)}"}
            print(f"{name:7s} Keras generate {rate['keras']:7.1f} sentences/s (XLA compile {compile_s:.1f} s) | "
                  f"bundle {rate['bundle']:7.1f} sentences/s ({tokens / seconds['bundle']:,.0f} tokens/s) | "
                  f"bundle/Keras {results[name]['speedup']:.2f}x | identical outputs "
                  f"{identical}/{len(sources)}\n        (bundle per batch, the call before 2026-12-05: "
                  f"{rate['bundle per batch']:7.1f} sentences/s, {results[name]['speedup_per_batch']:.2f}x)",
                  flush=True)
        json.dump(results, sys.stdout, indent=2)
        print()


if __name__ == "__main__":
    main()
