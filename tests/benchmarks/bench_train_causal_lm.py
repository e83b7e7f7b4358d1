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
with `pip install torch==2.13.0 numpy requests`: its data/shakespeare_char/prepare.py
imports requests). Without them the nanoGPT column is skipped.

    python tests/benchmarks/bench_train_causal_lm.py --nanogpt /tmp/nanogpt \
        --torch-python /tmp/torchvenv/bin/python [--full] [--bf16]

`--repeats 0 --full` runs only the 2000-iteration validation losses (~7 min), so the two
parts fit separate commands. Every kerasllm run gets a fresh XLA compilation cache (cold).

Measured 2026-12-05 (`--steps 300 --repeats 3 --no-split-row`, quiet machine; its speed still
swings ~20% within minutes), after the split step (kerasllm/models/split_batch.py: the batch's
gradients in two XLA programs at once, one per core):

    program                      wall s   tokens/s  wall/nanoGPT  tok/s vs hub
    kerasllm                       17.6     24,536         1.54x         1.06x
    kerasllm batch_split=1         17.5     23,179         1.54x         1.00x
    keras-hub GPT2Backbone         26.0     23,218         2.28x         1.00x
    nanoGPT (PyTorch)              11.4     27,821         1.00x         1.20x

and 15 minutes later, the machine in a faster phase (every program faster):

    kerasllm                       16.7     27,499         1.57x         1.19x
    kerasllm batch_split=1         16.9     24,126         1.59x         1.05x
    keras-hub GPT2Backbone         25.4     23,087         2.38x         1.00x
    nanoGPT (PyTorch)              10.7     30,856         1.00x         1.34x

`--repeats 0 --full --skip-kerashub` (split step): kerasllm val loss after 2000 iterations 1.823.
Then fit_run's 10 steps per call of the train function (training.execution_steps; in one process
30.5 -> 28.4 ms/step), same command:

    kerasllm                       16.8     27,715         1.47x         1.22x
    kerasllm batch_split=1         17.5     24,476         1.53x         1.08x
    keras-hub GPT2Backbone         26.9     22,712         2.35x         1.00x
    nanoGPT (PyTorch)              11.4     27,751         1.00x         1.22x

tokens/s 1.00x nanoGPT (goal >= 1x: at the line), 1.22x keras-hub (goal 1.3x), wall 1.47x (goal 1.2x).
A fourth run 20 minutes later, the machine in a slow phase:

    kerasllm                       21.5     22,248         1.67x         1.01x
    kerasllm batch_split=1         20.1     22,916         1.56x         1.04x
    keras-hub GPT2Backbone         27.0     22,118         2.10x         1.00x
    nanoGPT (PyTorch)              12.8     24,663         1.00x         1.12x

(split below unsplit in that run; right after it, in one process alternating 60-step fits, split
28.9 / 30.4 vs unsplit 31.1 / 34.0 ms/step: separate processes differ by more than the effect.)
The same command in the next session (2026-12-05 evening, after the evaluation warm-up below),
TensorFlow programs in a slow phase against nanoGPT:

    kerasllm                       21.4     21,902         1.69x         1.16x
    kerasllm batch_split=1         20.3     21,793         1.59x         1.16x
    keras-hub GPT2Backbone         32.8     18,868         2.58x         1.00x
    nanoGPT (PyTorch)              12.7     26,221         1.00x         1.39x

In one process the fit step now equals a bare loop over the same compiled programs (30.98 vs
32.65 ms, machine in a slow phase): what is left per step is the compiled arithmetic itself.
The split step is +6% / +14% steady tokens/s in these runs (in one process, alternating 50-step fits of the
same model split and whole: 24.2 vs 27.9 ms/step, +13%; the CLI's runs pay more per step outside
the compiled programs); its second compiled program costs ~0.5 s at the first step, so the
300-step wall time is unchanged. Goals still not met: tokens/s 0.88-0.89x nanoGPT (goal >= 1x) and
1.06-1.19x keras-hub (goal >= 1.3x), wall 1.54-1.57x nanoGPT (goal <= 1.2x); val loss 1.823 (goal <= 1.88) met.

2026-12-06, same command (`--steps 300 --repeats 3 --no-split-row`), no code change to training:

    kerasllm                       18.7     25,227         1.38x         1.11x
    kerasllm batch_split=1         18.4     23,844         1.37x         1.05x
    keras-hub GPT2Backbone         26.6     22,793         1.97x         1.00x
    nanoGPT (PyTorch)              13.5     25,468         1.00x         1.12x

tokens/s 0.99x nanoGPT, 1.11x keras-hub, wall 1.38x. Also measured that day: XLA's
`--xla_cpu_multi_thread_eigen=false` (8 alternated process pairs: no gain; the thunk runtime
still runs the dots on TensorFlow's Eigen pool, as the profile showed). The profile of a step
(slow phase, 32.8 ms): the two Eigen threads ~18 ms each (dots), the parts' two inter-op threads
~6-7 ms each (fusions), ~75% of two cores busy.

Measured 2026-12-02 on the 2-core development machine (`--steps 300 --repeats 3`, then
`--repeats 0 --full --skip-kerashub` for kerasllm's val loss; other jobs waited on a CPU lock):

    program                      wall s   tokens/s  wall/nanoGPT  tok/s vs hub  val@2000
    kerasllm                       17.7     21,714         1.45x         1.03x     1.823
    keras-hub GPT2Backbone         26.4     21,169         2.16x         1.00x         -
    nanoGPT (PyTorch)              12.2     25,711         1.00x         1.21x         -

(an earlier run the same day, before the global-norm clip: kerasllm 19.1 s, 21,563 tok/s;
keras-hub 31.1 s, 19,276; nanoGPT 13.9 s, 22,469: 1.37x and 1.12x. nanoGPT's own figures move
by 15% between runs on this machine, so only same-run ratios mean anything.)
The 2026-12-01 table (stock Keras optimizer, per-variable clipping): kerasllm 18.2 s / 23,966,
keras-hub 26.1 s / 22,617, nanoGPT 12.0 s / 26,297; val@2000 kerasllm 1.813, keras-hub 1.904,
nanoGPT 1.886.

Where kerasllm's ~17.5 s go (a timestamped CLI run): Python + TensorFlow import ~2.3 s, data,
model and compile 0.5 s, first step ~2.9 s (Keras trace ~1.2 s, TF-to-HLO and HLO passes
~0.6 s, LLVM code generation ~1.1 s), 300 steps ~10.5 s (~35 ms each), validation ~1.0 s (trace
and compile of the eval step ~0.8 s), save + exit 0.2 s. Since 2026-12-05 the split step's
evaluation warm-up (kerasllm/models/split_batch.py) traces the eval parts before the first step
(~0.5 s, moved, not added) and XLA-compiles them (~0.7 s) in a thread beside the first step's
trace, on the idle core: the first validation 1.6 -> 0.7 s in one process. Alternating fresh
20-step fits with a 20-step validation in one process: 5.78 -> 5.42 s and 7.80 -> 7.24 s (medians
of 6 and 8 pairs in a fast and a slow phase; 12 of 14 pairs faster), i.e. ~0.4 s per run. Whole
300-step CLI runs alternated (18 pairs, cold cache, 15-26 s as the machine swung): median pair
ratio 0.98, a gain too small for their noise to show (`KERASLLM_WARM_UP=0` turns the warm-up
off). What changed on 2026-12-02: the
optimizer (`kerasllm.optimizers`: Keras's AdamW arithmetic without the schedule traced once per
decayed variable, fused ResourceApplyAdam, global-norm clipping as nanoGPT does) took the first
step from 6.2-6.6 s to ~2.9 s in A/B runs (plain SGD, the floor: ~2.0 s). Per step, XLA's dots
reach ~181 GFLOP/s on both cores against torch's 229 (2 threads) in a matmul micro-benchmark;
the step is ~60% dots, the rest ~120 small fusions. XLA flags tried without a gain: oneDNN/
XNNPACK/YNNPACK dot fusions, backend optimisation level (faster compile, slower steps), 512-bit
vectors, fast math, the old (non-thunk) runtime, the concurrency-optimised scheduler, parallel
codegen split; two independent half-batch chains in one step (no concurrency gained); a flat
(one-buffer) AdamW (-0.2 s first step, -1% step: not worth a second update path);
steps_per_execution=10 <= 3%. bf16 is slower on this CPU with and without XLA (XLA's CPU dots
do not use the AMX units; oneDNN's non-XLA path reaches 53 ms/step).
2026-12-06 (next session), the same command twice, no training change, the machine in a slow phase
(keras-hub at 16.9k tokens/s against 22.8k the night before):

    kerasllm                       20.5     22,404         1.41x         1.32x
    kerasllm batch_split=1         21.3     19,715         1.46x         1.16x
    keras-hub GPT2Backbone         32.7     16,936         2.24x         1.00x
    nanoGPT (PyTorch)              14.6     20,743         1.00x         1.22x

    kerasllm                       21.5     20,914         1.63x         1.24x   (without --no-split-row)
    keras-hub GPT2Backbone         34.0     16,865         2.59x         1.00x
    nanoGPT (PyTorch)              13.2     24,887         1.00x         1.48x

tokens/s 1.08x then 0.84x nanoGPT, 1.32x then 1.24x keras-hub, wall 1.41x then 1.63x: the runs
straddle the tokens/s goals and miss the wall-time goal.
2026-12-06 (later session), same command without --no-split-row, no training change:

    kerasllm                       20.6     22,883         1.57x         1.22x
    keras-hub GPT2Backbone         31.4     18,815         2.39x         1.00x
    nanoGPT (PyTorch)              13.1     26,396         1.00x         1.40x

tokens/s 0.87x nanoGPT and 1.22x keras-hub, wall 1.57x: the goals stay unmet. Tried the same day and
not kept: XLA's old (non-thunk) CPU runtime with single-threaded Eigen dots
(`XLA_FLAGS="--xla_cpu_use_thunk_runtime=false --xla_cpu_multi_thread_eigen=false"`), so that each
part of the split step would run whole on its own core: 200-step CLI runs alternated with the
default, 3 pairs, 24.5k/26.8k/27.3k against 30.9k/31.2k/27.9k tokens/s (slower in all 3).
Measured 2026-12-06 and not kept (one process, alternating): the first step's two XLA compiles
(part_gradients ~1.05 s, apply_mean ~0.84 s, traces 0.61 + 0.43 s) run one after the other, and
compiling them in two threads at once took as long (2.31 vs 2.17 s: they do not overlap);
apply_mean without XLA compiles in 0.2-0.36 s instead of ~1 s but adds ~3 ms to every step (full
step 39.9 vs 35.3 ms parts alone, against +1.8 ms compiled): a loss past ~250 steps. An xprof
profile of one part (6 rows, one thread): dots 71% of the thunk time, at ~140 GFLOP/s for the
forward and input-gradient products but ~94 for the weight gradients (`x^T dy`, both operands
contracted on the token axis); computing them as `(dy^T x)^T` or from an explicit transpose
(custom gradient on Dense, with XLA's transpose folding off) measured 0.96-1.03x the step, noise.

2026-12-06 (third session), start-up work, same command (`--steps 300 --repeats 3`), before and after
in the same hour (the machine in a fast phase both times):

    before:  kerasllm 16.5 s, 27,372 tok/s | keras-hub 24.8 s, 23,323 | nanoGPT 11.6 s, 27,973
             (1.42x wall, 0.98x and 1.17x tokens/s)
    after:   kerasllm 13.3 s, 32,106 tok/s | keras-hub 21.9 s, 26,900 | nanoGPT 10.1 s, 32,625
             (1.31x wall, 0.98x and 1.19x tokens/s)

What changed (steady-state steps are untouched; the machine sped up between the runs, so the
ratios are what to compare):
  * ml_dtypes pinned below 0.7 (pyproject): 0.7.0 takes ~0.67 s to import against 0.06 s for 0.6.0
    (3 alternated imports each), and TensorFlow imports it in every process (keras-hub's runs gain
    it too);
  * AutoGraph off for the input pipeline, the split step's programs and generation
    (kerasllm.data.as_written): its source rewriting took ~350 ms before the first step;
  * the split step's warm-up compiles the train step's parts (part_gradients) in its thread as soon
    as they are traced (split_batch module docs): the first 10 steps done at 5.5 s after start
    instead of 6.0 (6 alternated 300-step CLI runs, medians, 6/6 faster).
A timestamped 30-step run after them (fast phase): TensorFlow imported at 1.37 s, fit starts at
2.38, part_gradients compiled 3.39 (1.02 s, beside the step's trace), apply_mean compiled 4.78
(0.65 s, after part_gradients), first 10 steps done 5.00. Where two compiles did overlap (another
run: an evaluation part's beside apply_mean's), each took longer (part_loss 1.17 s instead of
0.37-0.63): XLA's compile uses both cores, so only Python work hides behind it. What is left before
the steps is TensorFlow's import (1.4 s, most of it its shared libraries and generated op modules),
the parts' trace (~0.5 s, ~1,700 graph ops at TensorFlow's per-op cost) and the two compiles (~2 s);
apply_mean writes the weights, so it cannot be compiled ahead on zeros as the parts are. Tried and
not kept, 6 alternated 300-step runs each: compiling the evaluation's parts before the train
step's (first 10 steps 5.28 vs 5.27 s, medians); compiling them only after the first train call
(first 10 steps 0.6 s sooner after fit starts, but the whole run 18.3 vs 18.1 s: the compile then
slows the steps beside it; the machine in a slow phase); `--xla_llvm_disable_expensive_passes` (5
alternated 200-step runs: XLA compile sums 3.21-3.81 s against 3.23-3.71 s); 3 batch parts instead
of 2 (4 alternated 200-step runs: 27.0-30.6k tokens/s against 28.7-32.4k); Grappler's meta-optimizer
off (the outer, uncompiled step function is all it touches here; 5 alternated 200-step runs: first
10 steps no sooner, whole runs 0.2 s shorter in median, losses bit-identical; a process-wide
TensorFlow setting that would also reach a user's own non-XLA graphs and the replicated step,
where Grappler's rewrites matter, for ~1.5%). apply_mean's optimized HLO holds 255 fusions for 36
variables, and XLA's CPU compile time grows with the fusion count.
The same day, `--warm-cache-row` (the machine in its fastest phase of the day):

    kerasllm                       12.6     33,679         1.39x         1.17x
    kerasllm, warm XLA cache       11.4     34,098         1.25x         1.18x
    keras-hub GPT2Backbone         20.2     28,798         2.22x         1.00x
    nanoGPT (PyTorch)               9.1     34,917         1.00x         1.21x

A rerun of the same shape (the CLI keeps XLA's programs in ~/.cache/kerasllm/xla) loads them
instead of compiling (XLA's log: 0.71 s of compile requests against 3.41 s cold) and is ~1.2 s
shorter; it still misses 1.2x. The goal compares the cold row.

2026-12-06 (fourth session), after the CLI turned off XLA's tree-reduction rewrite
(`kerasllm.cli.XLA_CPU_TRAINING_FLAGS`: every reduction over > 32 values had become a reduce-window
plus a reduce, two kernels XLA cannot fuse; part_gradients 246 -> 160 fusions, apply_mean 254 -> 182,
each program compiling 0.1-0.2 s sooner, losses identical), same command with `--warm-cache-row`,
twice, the machine in a middling phase (a slow-phase run just before: 1.32x wall, 0.99x tokens/s):

    kerasllm                       14.2     29,857         1.27x         1.27x
    kerasllm, warm XLA cache       12.8     30,293         1.14x         1.29x
    keras-hub GPT2Backbone         23.8     23,498         2.12x         1.00x
    nanoGPT (PyTorch)              11.2     28,194         1.00x         1.20x

    kerasllm                       14.5     27,860         1.27x         1.28x
    kerasllm, warm XLA cache       13.5     28,769         1.17x         1.32x
    keras-hub GPT2Backbone         26.2     21,764         2.28x         1.00x
    nanoGPT (PyTorch)              11.5     27,761         1.00x         1.28x

tokens/s 1.06x and 1.00x nanoGPT (goal >= 1x), 1.27x and 1.28x keras-hub (goal 1.3x), wall 1.27x
both times (goal 1.2x). Then AdamW's per-step scalars built once per apply (apply_mean's trace
1,209 -> 717 ops) and Grappler off during the split step's fit (kerasllm/models/split_batch.py), once:

    kerasllm                       14.6     28,051         1.23x         1.27x
    kerasllm, warm XLA cache       13.1     28,580         1.10x         1.29x
    keras-hub GPT2Backbone         25.9     22,162         2.17x         1.00x
    nanoGPT (PyTorch)              11.9     26,881         1.00x         1.21x
 Whole 300-step CLI runs with the rewrite (`XLA_FLAGS=--xla_disable_hlo_passes=`,
which the CLI leaves as given) and without, 6 alternated pairs: 15.85 -> 15.16 s (medians, 6/6).
Measured the same session and not kept: a flat AdamW (one buffer each for the moments, the weights
updated from slices; a prototype of apply_mean's arithmetic): 79 fusions instead of 182, but its
first call 0.64 s against 0.80 and its steps 1.65 vs 1.5-1.9 ms: XLA's CPU compile time follows
the work in the kernels more than their number, and the optimizer's slots would change layout
under every distribution strategy. The MLIR bridge on or off (3 runs each), XLA's fusion emitters
off, codegen split 1 or 64, AVX2 only (1 run each), YNNPACK fusion types (2 runs each): compile and
step times within noise (the emitters off compiled slower: 1.17 vs 0.82 s). XLA's compile
uses ~1.4-1.5 of the 2 cores (process CPU time over wall), so work moved beside it is not free.

2026-12-06 (fifth session), no change to training, same command with `--warm-cache-row`, the
machine in a slow phase (an earlier run while another job's `pip install` shared the cores is not
counted: kerasllm 0.77x nanoGPT's tokens/s there):

    kerasllm                       17.9     26,671         1.33x         1.23x
    kerasllm, warm XLA cache       16.3     25,307         1.21x         1.17x
    keras-hub GPT2Backbone         28.2     21,646         2.10x         1.00x
    nanoGPT (PyTorch)              13.4     23,966         1.00x         1.11x

Two timestamped CLI runs right after it took 14.3 and 14.0 s (TensorFlow imported at 2.2-2.4 s,
first 10 steps done at 5.8-6.2 s, the first validation 0.38-0.42 s against 0.19-0.21 s for the
second). Where a split step's thread time goes (XLA's profiler, 100 steps, 26.9 ms a step): dots
24.3 ms at ~150 GFLOP/s a thread, ~15 ms of fused element-wise kernels at ~1 ns an element
(GELU's erf and its gradient's exp, layer norms, softmax), the two cores ~75% busy.
After the causal-LM token cache (kerasllm/token_cache.py), the same command in a fast phase (every
program faster; nanoGPT most):

    kerasllm                       12.6     33,628         1.34x         1.20x
    kerasllm, warm XLA cache       11.5     35,060         1.22x         1.25x
    keras-hub GPT2Backbone         21.6     28,011         2.29x         1.00x
    nanoGPT (PyTorch)               9.4     35,013         1.00x         1.25x

and the 300-step CLI run of the tree before the cache (d00be85) and after, 4 alternated pairs:
12.66/12.33, 16.33/15.49, 13.27/13.83, 14.29/13.85 s (after shorter in 3 of 4; val loss identical).

2026-12-06 (sixth session), after kerasllm stopped requiring seqeval (and with it scikit-learn,
which Keras imports with TensorFlow when installed: `import tensorflow, keras` 2.1 -> 1.65 s, five
alternated pairs), `--warm-cache-row`, three runs (`--repeats 3`, 3, then 5):

    kerasllm                       11.7     35,134         1.26x         1.28x
    kerasllm, warm XLA cache       11.2     34,127         1.20x         1.24x
    keras-hub GPT2Backbone         21.1     27,535         2.28x         1.00x
    nanoGPT (PyTorch)               9.3     34,783         1.00x         1.26x

    kerasllm                       12.4     32,853         1.31x         1.21x
    kerasllm, warm XLA cache       11.1     34,096         1.17x         1.25x
    keras-hub GPT2Backbone         21.9     27,186         2.30x         1.00x
    nanoGPT (PyTorch)               9.5     33,268         1.00x         1.22x

    kerasllm                       12.4     33,478         1.17x         1.27x
    kerasllm, warm XLA cache       11.3     33,046         1.06x         1.26x
    keras-hub GPT2Backbone         22.5     26,314         2.11x         1.00x
    nanoGPT (PyTorch)              10.6     30,035         1.00x         1.14x

Measured that session and not kept: LLVM at `--xla_backend_optimization_level=1` (part_gradients'
compile 1.15-1.28 vs 1.22-1.60 CPU-s, apply_mean's unchanged, steps alike: within noise),
`--xla_cpu_enable_fast_math=true` (part_gradients 16.2-17.9 vs 15.7-18.5 ms a call), apply_mean
without XLA (its first call 0.31-0.33 vs 0.95-1.15 s, but each call slower), apply_mean as two
XLA programs over halves of the weights (no faster: they hardly overlap), a trivial XLA compile
ahead to take XLA's one-time set-up off the first step (it is ~20 ms). Where a cold run's CPU goes
(`/proc/self/stat` sampled every 0.1 s): one core until ~3 s (TensorFlow's import, data, model,
the parts' traces), both from ~3.8 s (the compiles, then the steps).

2026-12-06 (seventh session), after two changes to training: `kerasllm train` on a 2-core machine
gives TensorFlow one intra-op thread, so each part of the split step runs whole on a core of its
own (split_batch.give_parts_a_core_each; with the default pool, XLA ran both parts' kernels on the
same two threads and the parts ended 2-6 ms apart, one core idle meanwhile; 24 alternated 300-step
CLI pairs: tokens/s higher in 17, median +6.7%; wall shorter in 18, median -5.2%; losses identical), and FeedForward's
training GELU with its gradient written out (one backward kernel from x: element-wise kernel time
-0.3 to -1.0 ms a step of ~34). Val loss after 2000 iterations unchanged: 1.823. Four runs
(`--warm-cache-row`; R = 3, 5, 5, 3), the last two with the per-run lines:

    kerasllm                       10.6     41,063         1.21x         1.35x     (fast phase)
    kerasllm, warm XLA cache        9.8     39,851         1.11x         1.31x
    keras-hub GPT2Backbone         19.6     30,422         2.23x         1.00x
    nanoGPT (PyTorch)               8.8     36,031         1.00x         1.18x

    kerasllm                       13.2     31,948         1.38x         1.16x
    kerasllm, warm XLA cache       10.4     37,633         1.10x         1.37x
    keras-hub GPT2Backbone         21.7     27,485         2.28x         1.00x
    nanoGPT (PyTorch)               9.5     33,139         1.00x         1.21x

    kerasllm                       16.3     21,972         1.29x         1.14x     (slow phase from the third repeat:
    kerasllm, warm XLA cache       16.2     23,852         1.29x         1.24x      keras-hub 26.7 -> 30.0-37.8 s)
    keras-hub GPT2Backbone         30.0     19,293         2.38x         1.00x
    nanoGPT (PyTorch)              12.6     25,301         1.00x         1.31x
      per repeat: wall / nanoGPT 1.12x 1.24x 1.29x 1.10x 1.54x; tok/s vs hub 1.46x 1.51x 1.03x 1.24x 1.06x;
      tok/s vs nanoGPT 1.18x 1.05x 0.87x 1.00x 0.82x

    kerasllm                       12.7     33,434         1.08x         1.32x
    kerasllm, warm XLA cache       11.0     35,440         0.94x         1.40x
    keras-hub GPT2Backbone         23.3     25,293         1.99x         1.00x
    nanoGPT (PyTorch)              11.7     28,710         1.00x         1.14x
      per repeat: wall / nanoGPT 1.25x 1.07x 1.13x; tok/s vs hub 1.32x 1.47x 1.26x;
      tok/s vs nanoGPT 1.07x 1.20x 1.24x

and a fifth (`--repeats 5`, no warm row), the machine steady:

    kerasllm                       12.9     32,190         1.23x         1.25x
    keras-hub GPT2Backbone         22.6     25,710         2.17x         1.00x
    nanoGPT (PyTorch)              10.4     30,757         1.00x         1.20x
      per repeat: wall / nanoGPT 1.33x 1.31x 1.21x 1.15x 1.24x; tok/s vs hub 1.19x 1.15x 1.25x 1.38x 1.22x;
      tok/s vs nanoGPT 0.97x 0.99x 1.10x 1.12x 1.04x

Runs 1 and 4 meet all three goals (wall <= 1.2x nanoGPT: 1.21x / 1.08x; tokens/s >= 1.3x keras-hub:
1.35x / 1.32x; >= nanoGPT: 1.14x / 1.16x); runs 2, 3 and 5 do not (5: 1.23x wall, 1.25x keras-hub). In the slow repeats of run 3 kerasllm
fell to 0.82-0.87x nanoGPT's tokens/s: with one thread per part, a core the host slows holds its
part back, where the shared pool let the other thread take over kernels (a guess from the
pattern, not measured apart). What a step's kernels cost now (XLA profiler, one thread per part,
fast phase): ~34-36 ms of kernel time per step, dots ~25 ms (single-threaded Eigen, ~20% more
than the pooled dots' event time), element-wise ~9.5-10 ms (against 12-13.5 with the pool).
Measured this session and not kept: column reductions (the layer norms' gamma gradients, ~100 us
each in the step) written as a dot with a ones vector, a transposed row reduction or two stages (in
a micro-benchmark, 16 at [384, 128]: all 63-88 us each, XLA folds them into the same reduce; a row
reduction of the same data takes 23 us). Measured and not built: launching an XLA program with 108
resource variables and 72 tensor arguments costs ~410 us against ~85 us for 39 + 2 (tiny tensors),
so apply_mean over flat optimizer slots would save ~0.3 ms a step (~1.4%), not worth a second
optimizer layout under every distribution strategy.

2026-12-06, eighth session, on another machine: 2 cores of an AMD EPYC (Zen 4), where nanoGPT's
PyTorch runs ~40% slower than on the earlier Xeon and TensorFlow about as fast. Before any change
(`--repeats 3`, then `--repeats 5`):

    kerasllm                       18.0     22,589         0.94x         1.21x
    keras-hub GPT2Backbone         31.8     18,690         1.66x         1.00x
    nanoGPT (PyTorch)              19.1     16,470         1.00x         0.88x

    kerasllm                       18.1     22,810         1.02x         1.21x
    keras-hub GPT2Backbone         32.0     18,818         1.81x         1.00x
    nanoGPT (PyTorch)              17.7     17,451         1.00x         0.93x

Per dot of one split-step part (XLA profiler, HLO names mapped to shapes): the feed-forward
output's kernel gradient, `[384, 512]^T [384, 128]`, ran at ~54 GFLOP/s against 90-105 for every
other projection; computed as `(dy^T x)^T` (layers/feedforward.narrowing_projection) it runs at
~91, and whole CLI runs gained ~9% tokens/s (6 alternated pairs). Then `--repeats 7`, the
machine in a faster phase for every program:

    kerasllm                       15.7     25,260         0.90x         1.19x
    keras-hub GPT2Backbone         27.7     21,173         1.59x         1.00x
    nanoGPT (PyTorch)              17.5     18,486         1.00x         0.87x
      per repeat: tok/s vs hub 1.12x 1.33x 1.23x 1.31x 1.13x 1.16x 1.18x

`--repeats 0 --full --skip-kerashub`: val loss after 2000 iterations 1.823 (nanoGPT 1.886).
On this machine two goals hold (tokens/s 1.35-1.37x nanoGPT's, wall 0.90-1.02x) and one does not
(1.19-1.21x keras-hub's, goal 1.3x). A part's kernels are ~29 ms, ~23 of them dots at 90-105
GFLOP/s except attention's batched `[64, 64]` products (44-60 GFLOP/s, ~2.5 ms): the step is
bound by fp32 matrix throughput, so 1.3x keras-hub here would need fewer FLOPs than the same model.
Measured and not kept: XLA's XNNPACK dots (`--xla_cpu_use_xnnpack`: 21,032 vs 21,711 tok/s, 4
pairs), the attention's batched products and the square output projection's gradient in the other
orientation (micro-benchmarks: no faster), GELU's derivative saved from the forward instead of
recomputed (no faster). One thread per part still wins here: 21,305 vs 19,041 tok/s with TensorFlow's
default threads (medians of 4 alternated pairs, 200 steps).

2026-12-06, ninth session, same machine, no training change landed. Measured and not kept (one
split-step part's kernel time from XLA's profiler, 3 alternated processes each, unless stated):
* the layer norm's gradient written out, the gamma gradient as `ones[1, rows] @ (dy * x_hat)` with
  runtime ones (XLA fuses the product into its vector-matrix loop, 70-80 us, as slow as the reduce it
  replaces): non-dot kernel time 3.6-4.1 ms either way;
* GELU's forward as `0.5 x (1 + erf(x / sqrt 2))` instead of TensorFlow's erfc form (1.5x faster
  alone: 337 vs 505 us a [384, 512] chain link): the GELU kernels 1.75 -> 1.18 ms a part, but XLA
  then fuses differently and the part's dots took 1.2-1.4 ms longer in 3/3 pairs;
* the optimizer update in two programs, one per core, each over half the weights (the global-norm
  clip computed in both; weights bit-identical after 50 steps): XLA runs a program of independent
  updates on the intra-op pool, which holds one thread here, so both halves queued on it: fit step
  27.98 vs 28.02 and 28.12 vs 30.81 ms (no gain); with two intra-op threads and single-threaded
  XLA dots (`--xla_cpu_multi_thread_eigen=false`) every step was ~1 ms slower;
* apply_mean left to TensorFlow's executor (no XLA): no faster (29.55 vs 29.38, 31.66 vs 29.10 ms);
* attention's `P^T dO` and `dS^T Q` as an explicit transpose (behind an optimization barrier) then a
  plain dot: 101 vs 120 us a dot in a micro-benchmark, ~0.15 ms of a 27 ms part: not worth a custom
  gradient.

2026-12-06, tenth session, same machine, no training change, `--steps 300 --repeats 3`:

    kerasllm                       19.0     22,088         0.94x         1.21x
    keras-hub GPT2Backbone         31.9     18,197         1.58x         1.00x
    nanoGPT (PyTorch)              20.3     14,990         1.00x         0.82x
      per repeat: tok/s vs hub 1.21x 1.13x 1.25x; tok/s vs nanoGPT 1.18x 1.45x 1.62x; wall 1.05x 0.97x 0.82x

Tried that session and not kept: XLA's oneDNN dots on this CPU (`--xla_cpu_use_onednn=true`, and
`--xla_cpu_experimental_onednn_custom_call=true`): fit step 35.4 and 35.1 ms against 34.6 ms in the
same minutes (the machine in a slow phase).

2026-12-06, eleventh session, same machine, no training change, `--steps 300 --repeats 3`:

    kerasllm                       15.6     25,661         1.03x         1.19x
    keras-hub GPT2Backbone         26.3     21,713         1.74x         1.00x
    nanoGPT (PyTorch)              15.8     20,740         1.00x         0.96x
      per repeat: tok/s vs hub 1.19x 1.21x 1.15x; tok/s vs nanoGPT 1.24x 1.49x 1.20x; wall 1.03x 0.90x 1.04x

Where a step's wall time goes (XLA's profiler, the fit of this file's shape in one process, 30.4 ms
a step): both parts run 26.2 ms side by side; then apply_mean ~3.5 ms, of which ~0.9 ms is
TensorFlow's launch before its first kernel and ~0.3 ms after its last, and the rest its kernels on
the one intra-op thread while the calling thread waits (the global-norm clip joins every gradient
before any update, and the thread that finishes the join cannot hand work to a second worker).
So ~11% of each step has one core idle; the ninth session's two-program update (above) and flat
launches were the tries at it. Tried this session and not kept: the parts returning their
gradients as one flat buffer each, apply_mean clipping the flat mean (one reduction) before cutting
it into the weights' shapes, so the updates become ready on the calling thread: weights equal to
the current step's after 50 steps, fit steps alternated in one process (50-step fits, 6 pairs
twice): minimum 29.42 vs 29.54 and 31.68 vs 32.68 ms, medians within the machine's noise. In those
in-process A/Bs some 50-step fits took ~1 s longer with both cores idle for that second (vmstat),
on either side; they are the reason such A/Bs compare minima.

2026-12-06, twelfth session, same machine, `--steps 300 --repeats 3` after the split step began
weighing its parts by the loss's denominator (split_batch.loss_denominator: for this model's loss
the rows, as before; two scalar ops more per step in the uncompiled outer function):

    kerasllm                       16.2     24,709         0.81x         1.24x
    keras-hub GPT2Backbone         29.7     19,954         1.48x         1.00x
    nanoGPT (PyTorch)              20.1     16,302         1.00x         0.82x
      per repeat: tok/s vs hub 1.24x 1.20x 1.26x; tok/s vs nanoGPT 1.52x 1.37x 1.63x; wall 0.80x 0.93x 0.83x

Goals: tokens/s >= nanoGPT's and wall <= 1.2x met; 1.3x keras-hub's still not (1.20-1.26x).
Then `lm_windows`' random offsets began to reach the corpus's last token (an off-by-one; nanoGPT's
range), and `--repeats 0 --full --skip-kerashub`: kerasllm val loss after 2000 iterations 1.819
(1.823 before), nanoGPT 1.886 (goal <= 1.88: met).

2026-12-07, thirteenth session, same machine in a slow phase (keras-hub 18.2-20.0k tokens/s against
~20k the session before), no training change, `--steps 300 --repeats 3`:

    kerasllm                       19.2     21,858         0.90x         1.19x
    keras-hub GPT2Backbone         32.5     18,428         1.53x         1.00x
    nanoGPT (PyTorch)              21.2     14,836         1.00x         0.81x
      per repeat: tok/s vs hub 1.09x 1.26x 1.16x; tok/s vs nanoGPT 1.47x 1.84x 1.18x; wall 0.90x 0.73x 1.20x

2026-12-07, fourteenth session, same machine, no training change, `--steps 300 --repeats 3`:

    kerasllm                       15.5     25,884         0.94x         1.24x
    keras-hub GPT2Backbone         28.0     20,878         1.69x         1.00x
    nanoGPT (PyTorch)              16.5     19,343         1.00x         0.93x
      per repeat: tok/s vs hub 1.20x 1.24x 1.30x; tok/s vs nanoGPT 1.28x 1.34x 1.56x; wall 0.95x 0.97x 0.88x

2026-12-07, fifteenth session, same machine, `--steps 300 --repeats 3`, before and after the day's
correctness changes to training (the clip after the replicas' sum, which one device never takes; the
checkpoint callback keeping its files; the stop on a NaN loss without Keras's print): the compiled
step is the same program. Nothing else running either time:

    kerasllm                       17.1     23,639         0.86x         1.19x
    keras-hub GPT2Backbone         29.6     19,877         1.48x         1.00x
    nanoGPT (PyTorch)              19.9     15,302         1.00x         0.77x
      per repeat: tok/s vs hub 1.24x 1.12x 1.19x; tok/s vs nanoGPT 1.62x 1.53x 1.23x; wall 0.86x 0.86x 1.05x

    kerasllm                       15.8     25,903         0.85x         1.44x
    keras-hub GPT2Backbone         32.1     18,036         1.73x         1.00x
    nanoGPT (PyTorch)              18.6     15,597         1.00x         0.86x
      per repeat: tok/s vs hub 1.22x 1.69x 1.37x; tok/s vs nanoGPT 1.27x 1.67x 1.97x; wall 0.97x 0.82x 0.73x

In the second run the baselines slowed in its later repeats (keras-hub 21.2k -> 15.4k and 18.0k tokens/s,
nanoGPT 20.4k -> 12.6k) while kerasllm held 24.8-26.0k: its one-thread-per-part step is less exposed to
the machine's slow phases here, which moves the ratio more than any change did. The 1.3x keras-hub goal
is met in that run, not in the first (nor in most runs since 2026-12-06).

2026-12-07, sixteenth session, same machine, nothing else running, no change to the causal LM's step,
`--steps 300 --repeats 3` (the machine steady: every program within 8% across its repeats):

    kerasllm                       15.2     25,683         0.86x         1.19x
    keras-hub GPT2Backbone         25.9     21,631         1.47x         1.00x
    nanoGPT (PyTorch)              17.7     16,437         1.00x         0.76x
      per repeat: tok/s vs hub 1.22x 1.19x 1.17x; tok/s vs nanoGPT 1.59x 1.61x 1.27x; wall 0.92x 0.84x 0.98x

2026-12-07, seventeenth session, same machine, no change to the causal LM's step, `--steps 300 --repeats 3`
(a 3-second Python import of Keras ran beside the first repeat):

    kerasllm                       17.4     22,520         0.96x         1.10x
    keras-hub GPT2Backbone         28.2     20,559         1.56x         1.00x
    nanoGPT (PyTorch)              18.0     16,389         1.00x         0.80x
      per repeat: tok/s vs hub 1.10x 1.22x 1.14x; tok/s vs nanoGPT 1.37x 1.62x 1.19x; wall 1.04x 0.86x 1.00x

tokens/s 1.37x nanoGPT (goal >= 1x met), 1.14x keras-hub in the median repeat (goal 1.3x not met), wall
0.96x nanoGPT (goal <= 1.2x met). The same command at the session's end (9161dac; no change to the step),
nothing else running:

    kerasllm                       15.9     25,398         0.86x         1.21x
    keras-hub GPT2Backbone         27.1     21,033         1.47x         1.00x
    nanoGPT (PyTorch)              18.4     16,065         1.00x         0.76x
      per repeat: tok/s vs hub 1.17x 1.21x 1.20x; tok/s vs nanoGPT 1.27x 1.62x 1.63x; wall 0.93x 0.86x 0.83x

tokens/s 1.58x nanoGPT and 1.21x keras-hub (goal 1.3x not met), wall 0.86x.

2026-12-07, eighteenth session, same machine, no change to the causal LM's step (1c1766d), nothing else
running, `--steps 300 --repeats 3`:

    kerasllm                       15.1     32,237         0.87x         1.17x
    keras-hub GPT2Backbone         28.4     27,639         1.64x         1.00x
    nanoGPT (PyTorch)              17.3     18,502         1.00x         0.67x
      per repeat: tok/s vs hub 1.14x 1.18x 1.37x; tok/s vs nanoGPT 1.74x 1.63x 2.15x; wall 0.95x 0.89x 0.79x

tokens/s 1.74x nanoGPT (met), 1.18x keras-hub in the median repeat (goal 1.3x not met; 1.37x in one), wall
0.87x (met). The day's training changes (--checkpoint-interval, the signal and disk-space checks) run
outside the compiled step: a Python check per callback and, per checkpoint, a sum over the variables.

2026-12-07, nineteenth session, same machine, no change to the causal LM's step (883bd03), nothing else
running, `--steps 300 --repeats 3`, then `--repeats 5` right after:

    kerasllm                       13.5     34,070         0.82x         1.31x
    keras-hub GPT2Backbone         27.2     26,084         1.65x         1.00x
    nanoGPT (PyTorch)              16.5     18,989         1.00x         0.73x
      per repeat: tok/s vs hub 1.31x 1.26x 1.33x; tok/s vs nanoGPT 1.62x 1.79x 1.80x; wall 0.87x 0.78x 0.82x
    kerasllm                       15.9     32,223         0.82x         1.24x
    keras-hub GPT2Backbone         29.7     26,003         1.54x         1.00x
    nanoGPT (PyTorch)              19.3     16,848         1.00x         0.65x
      per repeat: tok/s vs hub 1.15x 1.14x 1.55x 1.28x 1.13x; vs nanoGPT 1.40x-2.06x; wall 0.75x-1.10x

1.31x keras-hub in the first run, 1.24x (per-repeat median 1.15x) in the second: keras-hub's own tokens/s
moved 21,388-29,294 within one run. The day's changes (the unknown-token share read once before training,
the plan recorded in config.json) run outside the compiled step.

2026-12-07, twentieth session, same machine, nothing else running, `--steps 300 --repeats 3`, at 3ce1e34 (the
session's start), then at 76711c0 (the day's changes: AdamW's clip takes sparse gradients dense, which the split
step's averaged parts already are; a log line per interval where stderr is no terminal):

    kerasllm                       14.3     34,988         0.80x         1.30x
    keras-hub GPT2Backbone         27.5     26,889         1.53x         1.00x
    nanoGPT (PyTorch)              17.9     18,535         1.00x         0.69x
      per repeat: tok/s vs hub 1.46x 1.18x 1.30x; tok/s vs nanoGPT 1.97x 1.75x 1.94x; wall 0.72x 0.91x 0.80x
    kerasllm                       16.2     31,398         0.99x         1.23x
    keras-hub GPT2Backbone         29.6     25,457         1.80x         1.00x
    nanoGPT (PyTorch)              16.5     19,421         1.00x         0.76x
      per repeat: tok/s vs hub 1.38x 1.21x 1.23x; tok/s vs nanoGPT 1.60x 1.79x 1.58x; wall 0.99x 0.86x 0.99x

1.30x then 1.23x keras-hub (goal 1.3x: at the line once, below it once), 1.89x / 1.62x nanoGPT, wall 0.80x / 0.99x.

2026-12-08, twenty-first session, same machine, nothing else running, `--steps 300 --repeats 3` at fce6414 (the
day's changes touch the readers, not the step: a corpus reads CRLF as LF, which this one does not hold):

    kerasllm                       15.2     33,948         0.85x         1.26x
    keras-hub GPT2Backbone         27.4     26,970         1.53x         1.00x
    nanoGPT (PyTorch)              17.9     18,488         1.00x         0.69x
      per repeat: tok/s vs hub 0.90x 1.26x 1.54x; tok/s vs nanoGPT 1.55x 1.65x 1.99x; wall 0.92x 1.00x 0.74x

1.26x keras-hub (goal 1.3x not met; per repeat 0.90-1.54x: keras-hub's own tokens/s moved 23,916-30,702 within the
run), 1.84x nanoGPT's tokens/s, wall 0.85x. Measured that session (one process, one thread each, XLA-compiled
chains of 20 dots at the step's shapes): XLA's dots reach 152-203 GFLOP/s on a core here, except the feed-forward
output's weight gradient `[512, 384]^T`-shaped product (98-108: the case narrowing_projection already turns), and
fall to 127-164 with a second process busy on the other core, the step's situation (its two parts side by side);
the experimental LLVM IR GEMM (`--xla_backend_extra_options=xla_force_enable_experimental_llvm_ir_gemm`) gave
181-236 against 164-204 in one pass and no better in the next (noise). TensorFlow's own kernels are built without
AVX2/FMA/AVX-512 (its start-up line), but XLA's dots are not held back by it.
"""

from __future__ import annotations

import argparse
import json
import os
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


def timed(command: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, str, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return elapsed, done.stdout, done.stderr


def run_kerasllm(steps: int, workdir: Path, eval_interval: int, precision: str = "fp32", batch_split: str = "",
                 warm_cache: Path | None = None) -> dict:
    out = workdir / f"kerasllm-{time.monotonic_ns()}"
    config = workdir / "config.json"
    config.write_text(json.dumps(CONFIG))
    # A fresh (cold) XLA compilation cache for every run: the CLI keeps compiled programs
    # between runs, and nanoGPT compiles nothing, so a warm cache would flatter kerasllm.
    # `warm_cache` (the extra row): the cache a first run of the same shape filled, as a user's rerun finds it.
    cache = warm_cache or workdir / f"xla-cache-{time.monotonic_ns()}"
    wall, _, _ = timed([sys.executable, "-m", "kerasllm", "train", "causal-lm", "--data", str(CORPUS), "--out", str(out),
                     "--config", str(config), "--seq-len", str(SEQ), "--batch-size", str(BATCH), "--steps", str(steps),
                     "--lr", "1e-3", "--warmup-steps", "100", "--eval-interval", str(eval_interval),
                     "--eval-steps", "20", "--precision", precision, "--quiet"],
                     env={"KERASLLM_XLA_CACHE": str(cache), "KERASLLM_BATCH_SPLIT": batch_split})
    if warm_cache is None:
        shutil.rmtree(cache, ignore_errors=True)
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
    with tempfile.TemporaryDirectory(prefix="bench-nanogpt-") as out_dir:  # its ckpt.pt, deleted after the run
        wall, stdout, stderr = timed([
            torch_python, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
            "--eval_iters=20", "--log_interval=1", f"--block_size={SEQ}", f"--batch_size={BATCH}", "--n_layer=4",
            "--n_head=4", "--n_embd=128", f"--max_iters={steps}", "--lr_decay_iters=2000", "--dropout=0.0",
            f"--eval_interval={eval_interval}", f"--out_dir={out_dir}",
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
    parser.add_argument("--warm-cache-row", action="store_true",
                        help="also run kerasllm with the XLA cache a first run filled (a rerun of the same shape; "
                             "the goals compare the cold row)")
    parser.add_argument("--no-split-row", action="store_true",
                        help="also run kerasllm with KERASLLM_BATCH_SPLIT=1 (Keras's one-program step; an extra row)")
    parser.add_argument("--bf16", action="store_true",
                        help="also run kerasllm with --precision mixed_bfloat16 (an extra row; the goals compare fp32)")
    args = parser.parse_args()
    if not CORPUS.exists():
        raise SystemExit(f"{CORPUS} not found (the shared tinyshakespeare corpus)")
    use_nanogpt = bool(args.nanogpt and args.torch_python)
    if use_nanogpt:
        prepare_nanogpt(args.nanogpt, args.torch_python)
    workdir = Path(tempfile.mkdtemp())
    bf16 = "kerasllm mixed_bfloat16"
    unsplit = "kerasllm batch_split=1"
    warm = "kerasllm, warm XLA cache"
    runs: dict[str, list[dict]] = {"kerasllm": [], warm: [], unsplit: [], bf16: [], "keras-hub GPT2Backbone": [],
                                   "nanoGPT (PyTorch)": []}
    warm_cache = workdir / "xla-cache-warm"
    if args.warm_cache_row and args.repeats:
        run_kerasllm(args.steps, workdir, eval_interval=args.steps, warm_cache=warm_cache)  # fills it, untimed
    for repeat in range(args.repeats):
        runs["kerasllm"].append(run_kerasllm(args.steps, workdir, eval_interval=args.steps))
        if args.warm_cache_row:
            runs[warm].append(run_kerasllm(args.steps, workdir, eval_interval=args.steps, warm_cache=warm_cache))
        if args.no_split_row:
            runs[unsplit].append(run_kerasllm(args.steps, workdir, eval_interval=args.steps, batch_split="1"))
        if args.bf16:
            runs[bf16].append(run_kerasllm(args.steps, workdir, eval_interval=args.steps, precision="mixed_bfloat16"))
        if not args.skip_kerashub:
            runs["keras-hub GPT2Backbone"].append(run_kerashub(args.steps, eval_interval=args.steps))
        if use_nanogpt:
            runs["nanoGPT (PyTorch)"].append(run_nanogpt(args.nanogpt, args.torch_python, args.steps, args.steps))
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    full = {}
    if args.full:
        full["kerasllm"] = run_kerasllm(2000, workdir, eval_interval=250)["val_loss"]
        if args.bf16:
            full[bf16] = run_kerasllm(2000, workdir, eval_interval=250, precision="mixed_bfloat16")["val_loss"]
        if not args.skip_kerashub:
            full["keras-hub GPT2Backbone"] = run_kerashub(2000, eval_interval=250)["val_loss"]
        if use_nanogpt:
            full["nanoGPT (PyTorch)"] = run_nanogpt(args.nanogpt, args.torch_python, 2000, 250)["val_loss"]

    summary = {name: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                      "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs)}
               for name, rs in runs.items() if rs}
    base = summary.get("nanoGPT (PyTorch)")
    hub = summary.get("keras-hub GPT2Backbone")
    if not summary:  # --repeats 0: only the --full validation losses
        for name, val in full.items():
            print(f"{name:<26} val loss after 2000 iterations {val:.3f}")
        shutil.rmtree(workdir, ignore_errors=True)
        return
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
    # Each run, in order: the machine's speed drifts by 20-40% within minutes, so the ratios of the
    # runs of one repeat (minutes apart at most) show what medians of separate runs can hide.
    print("\nruns in order (wall s / tokens/s):")
    for name, rs in runs.items():
        if rs:
            print(f"  {name:<26}" + "  ".join(f"{r['wall_s']:5.1f}/{r['tokens_per_s']:>6,.0f}" for r in rs))
    pairs = {"wall / nanoGPT": ("nanoGPT (PyTorch)", "wall_s"), "tok/s vs hub": ("keras-hub GPT2Backbone", "tokens_per_s"),
             "tok/s vs nanoGPT": ("nanoGPT (PyTorch)", "tokens_per_s")}
    for label, (other, key) in pairs.items():
        if runs[other] and runs["kerasllm"]:
            ratios = [a[key] / b[key] for a, b in zip(runs["kerasllm"], runs[other])]
            print(f"  kerasllm {label:<17} per repeat: " + " ".join(f"{r:.2f}x" for r in ratios)
                  + f"  (median {statistics.median(ratios):.2f}x)")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
