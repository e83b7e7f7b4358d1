"""Distributed training: one `--strategy` switch over TensorFlow's `tf.distribute`.

`model.fit` stays unchanged; what changes is where the model, its optimizer and its
metrics are created (inside `strategy.scope()`) and how the global batch reaches the
replicas. The names:

* `auto`: every local GPU (`MirroredStrategy`) when there is more than one, else the
  default strategy (one device, no distribution overhead).
* `one-device`: `OneDeviceStrategy` on the first GPU, else the CPU.
* `mirrored`: synchronous data parallelism over the local GPUs (or, without GPUs, every
  logical CPU device; tests use two).
* `multi-worker`: `MultiWorkerMirroredStrategy` over several processes/machines; the
  cluster comes from `TF_CONFIG`, or from Slurm (`SlurmClusterResolver`) inside an
  `srun` job. Every worker runs the same command with the same `--out`, which must be
  storage all workers can read (only the chief writes there). A worker waits for the others
  at most `$KERASLLM_WORKER_WAIT` seconds (default 900), saying after 10 s what it waits for;
  workers started with different arguments stop at once, each with one line.
* `tpu`: `TPUStrategy` on the TPU named by `--tpu` (`TPUClusterResolver`; "" or "local"
  for a TPU VM).
* `parameter-server`: recognised but refused: Keras 3's `model.fit` has no
  `ClusterCoordinator` support (Keras 2 had); the message says so.

`--batch-size` is always the global batch: each of the N replicas gets batch / N
examples, so a run computes the same gradient whatever the strategy. `--scale-lr`
multiplies the learning rate by N (the linear scaling rule, Goyal et al. 2017), for
users who grow the global batch with the replica count; it is off unless asked for.

`--precision mixed_float16` computes in float16 with float32 variables and dynamic loss
scaling (Keras wraps the optimizer in a `LossScaleOptimizer` at `compile`);
`mixed_bfloat16` needs no loss scaling (bfloat16 has float32's exponent range). The
layers compute softmax and the logits in float32 either way. Saved models carry no
policy: `model.keras` loads in float32, and the export decides fp32 or fp16.

Example:
>>> from kerasllm import CausalLM, DecoderConfig
>>> config = DecoderConfig.preset("tiny", vocab_size=64)
>>> with training_strategy("auto", precision="fp32") as dist:
...     model = CausalLM(config)
...     model.compile(learning_rate=dist.learning_rate(1e-3, scale=False))
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from kerasllm.errors import KerasLLMError, UsageError

log = logging.getLogger("kerasllm")

STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker", "tpu", "parameter-server")
PRECISIONS = ("fp32", "mixed_float16", "mixed_bfloat16")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# -- TF_CONFIG --------------------------------------------------------------------------------
def parse_tf_config(raw: str | None = None) -> dict[str, Any]:
    """Read and check `TF_CONFIG`; any fault is one `UsageError` line naming it."""
    raw = os.environ.get("TF_CONFIG", "") if raw is None else raw
    if not raw.strip():
        raise UsageError("TF_CONFIG is not set (multi-worker needs it, or a Slurm job)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UsageError(f"TF_CONFIG is not valid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(value, dict) or not isinstance(value.get("cluster"), dict):
        raise UsageError('TF_CONFIG has no "cluster" object (e.g. {"cluster": {"worker": ["host:port", ...]}})')
    cluster = value["cluster"]
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses or not all(
                isinstance(a, str) and ":" in a for a in addresses):
            raise UsageError(f'TF_CONFIG cluster "{job}" must be a non-empty list of "host:port" strings')
    task = value.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise UsageError('TF_CONFIG has no "task" with "type" and "index" (e.g. {"type": "worker", "index": 0})')
    if task["type"] not in cluster:
        raise UsageError(f'TF_CONFIG task type "{task["type"]}" is not a job in the cluster ({", ".join(cluster)})')
    index = task["index"]
    if not isinstance(index, int) or not 0 <= index < len(cluster[task["type"]]):
        raise UsageError(f'TF_CONFIG task index {index!r} is out of range for the '
                         f'{len(cluster[task["type"]])} "{task["type"]}" address(es)')
    return value


def _in_slurm_job() -> bool:
    return "SLURM_PROCID" in os.environ and "SLURM_STEP_NODELIST" in os.environ


# -- strategy resolution ----------------------------------------------------------------------
def resolve_strategy(name: str = "auto", tpu: str | None = None):
    """Return the `tf.distribute.Strategy` for a `--strategy` name (see the module docstring).

    Args:
        name: one of `STRATEGIES`.
        tpu: the TPU address or name for `name="tpu"` (`--tpu`); None or "local" means a TPU VM.
    Raises `UsageError` (one line) for an unknown name, a broken `TF_CONFIG`, or a
    cluster/TPU that cannot be reached.
    """
    if name not in STRATEGIES:
        raise UsageError(f"unknown --strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    import tensorflow as tf  # noqa: PLC0415 - only the Keras side distributes

    # Listing logical devices initialises TensorFlow's runtime, after which a multi-worker
    # strategy can no longer be set up ("Collective ops must be configured at program
    # startup"): only the local strategies look at devices.
    if name == "auto":
        # Physical devices first: on one GPU or none the runtime stays unstarted, so a recipe can
        # still set TensorFlow's threads (split_batch.give_parts_a_core_each).
        if len(tf.config.list_physical_devices("GPU")) < 2:
            return tf.distribute.get_strategy()
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "one-device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        return tf.distribute.MirroredStrategy(devices=devices or [d.name for d in tf.config.list_logical_devices("CPU")])
    if name == "multi-worker":
        if os.environ.get("TF_CONFIG", "").strip():
            parse_tf_config()
            resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        elif _in_slurm_job():
            try:
                resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(**_slurm_gpu_slots(tf))
            except (RuntimeError, ValueError, KeyError, OSError) as err:
                raise UsageError(f"multi-worker: cannot read the Slurm job: {err}") from None
        else:
            raise UsageError("--strategy multi-worker needs a cluster: set TF_CONFIG, or run inside a Slurm job (srun)")
        wait = worker_wait_seconds()
        workers = _cluster_workers(resolver)
        wait_for_the_other_workers(workers, wait)
        _bound_tensorflow_registration(resolver, wait)
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        except tf.errors.DeadlineExceededError as err:
            raise KerasLLMError(f"multi-worker: gave up after {wait:g} s: {_unregistered(str(err), workers)} did "
                                f"not join the cluster (wait longer with {WAIT_ENV}=SECONDS)") from None
        except (ValueError, RuntimeError, tf.errors.OpError) as err:
            raise UsageError(f"multi-worker: cannot join the cluster: {str(err).splitlines()[0]}") from None
        if threading.current_thread() is threading.main_thread() and sigterm is not None:
            # The strategy installs TensorFlow's own SIGTERM handler (for a preemption checkpoint
            # handler kerasllm does not use), under which a worker told to stop trained on to the
            # end: SIGTERM ends a worker again as it ends a one-process run, the last backup kept.
            signal.signal(signal.SIGTERM, sigterm)
        return strategy
    if name == "tpu":
        address = "" if tpu in (None, "local") else tpu
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, OSError, tf.errors.OpError) as err:  # OSError: a name off Google Cloud
            where = f"--tpu {tpu}" if tpu else "a local TPU (give --tpu NAME_OR_GRPC_ADDRESS)"
            raise UsageError(f"tpu: cannot reach {where}: {str(err).splitlines()[0]}") from None
        return tf.distribute.TPUStrategy(resolver)
    # parameter-server
    raise UsageError("--strategy parameter-server is not supported: Keras 3 model.fit cannot drive "
                     "ParameterServerStrategy (no ClusterCoordinator); use multi-worker")


# -- joining the cluster -------------------------------------------------------------------------
# How long a worker waits for the others to start (seconds). Long enough for a cluster's slow starts
# (pods scheduled one by one, images pulled, a Slurm step's tasks launched node by node).
WAIT_ENV = "KERASLLM_WORKER_WAIT"
DEFAULT_WORKER_WAIT = 900.0
NOTICE_AFTER = 10.0  # seconds of waiting before the line that says what this worker waits for


def worker_wait_seconds() -> float:
    """The bound on a multi-worker start-up: `$KERASLLM_WORKER_WAIT` seconds, default 900."""
    raw = os.environ.get(WAIT_ENV, "").strip()
    if not raw:
        return DEFAULT_WORKER_WAIT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{WAIT_ENV}={raw!r}: give the seconds a worker waits for the others (e.g. 900)")
    return value


@dataclass
class _Worker:
    index: int  # the worker number kerasllm uses (the chief first)
    address: str  # host:port
    task: str  # TensorFlow's task name, /job:worker/replica:0/task:1
    me: bool


def _cluster_workers(resolver) -> list[_Worker]:
    """The chief and the workers of the cluster, in kerasllm's worker order (see `worker_info`)."""
    spec = resolver.cluster_spec().as_dict()
    workers = []
    for job in ("chief", "worker"):
        addresses = spec.get(job, [])
        for task, address in (addresses.items() if isinstance(addresses, dict) else enumerate(addresses)):
            me = job == resolver.task_type and task == resolver.task_id
            workers.append(_Worker(len(workers), address, f"/job:{job}/replica:0/task:{task}", me))
    return workers


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def wait_for_the_other_workers(workers: list[_Worker], wait: float) -> None:
    """Before TensorFlow joins the cluster: wait, in Python, until every other worker's address
    accepts connections, while this worker's own address accepts them too.

    TensorFlow's start-up (`MultiWorkerMirroredStrategy(...)`) blocks in C++ holding the GIL until
    every worker has registered: no Python thread or signal handler runs there (a Ctrl-C waits
    for it), and it installs its own SIGTERM handler, which ignores the signal. A peer that never
    came had left a worker silent and unstoppable but for SIGKILL. Here the wait says what it waits
    for after NOTICE_AFTER seconds, stops at once on SIGINT (KeyboardInterrupt: "interrupted",
    130) or SIGTERM (one line, then the default action: 143), and ends after `wait` seconds with one line naming
    the workers that never answered. Each worker listens on its own port meanwhile (never
    accepting: a connection the kernel completes is the answer) so that the others can see it; it
    closes the port just before TensorFlow binds it, and a worker that looks in between is
    refused once and looks again (it then meets TensorFlow's server).
    """
    import socket  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415

    me = next(w for w in workers if w.me)
    others = [w for w in workers if not w.me]
    if not others:
        return
    listener = socket.socket(socket.AF_INET6 if ":" in _split_address(me.address)[0] else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", _split_address(me.address)[1]))
        listener.listen(64)
    except OSError as err:
        listener.close()
        raise UsageError(f"multi-worker: worker {me.index} cannot listen on its address {me.address}: "
                         f"{err.strerror or err}") from None

    def stop_on_sigterm(signum, frame):  # one line, then the default action: killed by SIGTERM (143)
        print(f"kerasllm: stopped by SIGTERM while worker {me.index} waited for the other workers", file=sys.stderr,
              flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    in_main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if in_main else None
    if sigterm == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, stop_on_sigterm)
    start, noticed = time.monotonic(), False
    try:
        waiting = list(others)
        while True:
            waiting = [w for w in waiting if not _answers(w.address)]
            if not waiting:
                return
            elapsed = time.monotonic() - start
            if elapsed >= wait:
                raise KerasLLMError(f"multi-worker: gave up after {wait:g} s: {_named(waiting)} did not answer "
                                    f"(wait longer with {WAIT_ENV}=SECONDS)")
            if not noticed and elapsed >= min(NOTICE_AFTER, wait / 2):
                noticed = True
                print(f"kerasllm: multi-worker: worker {me.index} is waiting for {_named(waiting)} to start "
                      f"(up to {wait:g} s, {WAIT_ENV})", file=sys.stderr, flush=True)
            time.sleep(0.5)
    finally:
        listener.close()
        if sigterm == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, sigterm)


def _answers(address: str) -> bool:
    import socket  # noqa: PLC0415

    try:
        with socket.create_connection(_split_address(address), timeout=2):
            return True
    except OSError:  # refused, unreachable, a name not (yet) in DNS, timed out
        return False


def _named(workers: list[_Worker]) -> str:
    return ", ".join(f"worker {w.index} ({w.address})" for w in workers)


def _bound_tensorflow_registration(resolver, wait: float) -> None:
    """TensorFlow's own bound on its start-up, for a worker that answered and then went away:
    the coordination service MultiWorkerMirroredStrategy would configure, with a registration
    barrier that times out after `wait` seconds (DeadlineExceededError naming the missing tasks)
    instead of waiting forever (TensorFlow 2.21's default)."""
    from tensorflow.python.eager import context  # noqa: PLC0415 - no public API for these settings

    spec = resolver.cluster_spec().as_dict()
    if context.context().coordination_service is not None or resolver.task_type not in ("chief", "worker"):
        return
    leader = "chief" if spec.get("chief") else "worker"
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=f"/job:{leader}/replica:0/task:0",
        cluster_register_timeout_in_ms=int(wait * 1000))
    config = context.context().coordination_service
    config.cluster_register_with_barrier = True  # without it the leader's wait ignores the timeout
    for job in ("chief", "worker"):
        if spec.get(job):
            config.coordinated_job_list.add(name=job, num_tasks=len(spec[job]))


def _unregistered(message: str, workers: list[_Worker]) -> str:
    """The workers a TensorFlow registration timeout names (the leader names the tasks that did not
    register; another worker, which could not register with the leader, names the leader)."""
    named = [w for w in workers if not w.me and re.search(re.escape(w.task) + r"(?!\d)", message)]
    return _named(named or [w for w in workers if not w.me])


def _slurm_gpu_slots(tf) -> dict:
    """SlurmClusterResolver's GPU arguments for this node. Left to itself it runs nvidia-smi (absent
    on CPU nodes: "No such file or directory") and gives each task a slice of the node's GPUs,
    dropping the tasks past the last GPU (with none: "range() arg 3 must not be zero"). So it is
    told the GPU count; on a node without GPUs each task gets a notional slot of its own, and
    CUDA_VISIBLE_DEVICES is left as it is."""
    gpus = len(tf.config.list_physical_devices("GPU"))  # physical: the runtime stays unstarted
    if gpus:
        return {"gpus_per_node": gpus}
    return {"gpus_per_node": int(os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_STEP_NUM_TASKS") or 1),
            "gpus_per_task": 1, "auto_set_gpu": False}


# -- facts about a strategy -------------------------------------------------------------------
def is_multi_worker(strategy) -> bool:
    """True under a `MultiWorkerMirroredStrategy` with more than one worker (Keras's own test)."""
    import tensorflow as tf  # noqa: PLC0415

    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())  # noqa: SLF001 - the test Keras itself uses


def worker_info(strategy) -> tuple[int, int]:
    """`(worker_index, num_workers)`; `(0, 1)` outside multi-worker training."""
    if not is_multi_worker(strategy):
        return 0, 1
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict()
    workers = len(spec.get("chief", [])) + len(spec.get("worker", []))
    # The chief (if the cluster names one) is worker 0, then the "worker" job in order.
    index = resolver.task_id if resolver.task_type == "chief" else resolver.task_id + len(spec.get("chief", []))
    return int(index), int(workers)


def is_chief(strategy) -> bool:
    """True for the one process that writes the model, history and checkpoints.

    As in TensorFlow's convention: the "chief" task if the cluster has one, else worker 0;
    every process outside multi-worker training is the chief.
    """
    return worker_info(strategy)[0] == 0


def per_replica_batch_size(global_batch_size: int, strategy) -> int:
    """The examples each replica gets from a global batch; it must split evenly."""
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise UsageError(f"--batch-size {global_batch_size} does not split evenly over {replicas} replicas; "
                         f"use a multiple of {replicas}")
    return global_batch_size // replicas


def scaled_learning_rate(learning_rate: float, strategy, scale: bool) -> float:
    """`learning_rate x replicas` when `scale` (`--scale-lr`), else `learning_rate` unchanged."""
    return learning_rate * strategy.num_replicas_in_sync if scale else learning_rate


# -- precision --------------------------------------------------------------------------------
def precision_policy(precision: str) -> str:
    """Keras dtype policy name for `--precision`."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown --precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    return "float32" if precision == "fp32" else precision


# -- XLA ----------------------------------------------------------------------------------------
def xla_compiles_step(strategy) -> bool:
    """Whether XLA can compile a train step under `strategy`: one replica, or TPUs.

    With several CPU/GPU replicas Keras 3.15 + TF 2.21 cannot XLA-compile the replicated
    step (MirroredStrategy: "Trying to access resource ... located in device CPU:1";
    MultiWorkerMirroredStrategy on CPU: no XLA kernel for CollectiveGatherV2). TPUStrategy
    always compiles with XLA. `TransformerModel.compile(jit_compile="auto")` and the CLI's
    `--jit-compile` both follow this rule.
    """
    import tensorflow as tf  # noqa: PLC0415

    return strategy.num_replicas_in_sync == 1 or isinstance(strategy, tf.distribute.TPUStrategy)


# -- the one helper recipes use ---------------------------------------------------------------
@dataclass
class DistributeArgs:
    """The `--strategy/--tpu/--precision/--scale-lr` options of every `kerasllm train` command."""

    strategy: str = "auto"
    tpu: str | None = None
    precision: str = "fp32"
    scale_lr: bool = False

    @contextlib.contextmanager
    def scope(self, quiet: bool = False) -> Iterator[Distribution]:
        """`training_strategy(...)` for these options."""
        with training_strategy(self.strategy, self.precision, self.tpu, quiet=quiet) as dist:
            dist.options = self
            yield dist


def distributed_recipe(recipe):
    """Run a `kerasllm train` recipe under its `--strategy`/`--precision` (the one shared plumbing).

    The recipe has the usual `(args, out, ..., resume=False, quiet=False, ...)` parameters
    and a `dist` parameter; callers pass `distribute=DistributeArgs(...)` (default: auto,
    fp32) instead. The wrapper resolves the strategy, sets the precision policy, enters
    `strategy.scope()` for the whole recipe (so the model, optimizer and metrics are
    created in it), and hands the recipe `dist` (a `Distribution`): `dist.is_chief`
    (only the chief writes the run directory), `dist.distribute(...)` (per-worker input),
    `dist.learning_rate(...)` and `dist.jit_compile(...)`. A restarted multi-worker job
    whose `out` holds a stopped run resumes it without `--resume`: cluster managers
    restart the very same command. The recipe's module names its task in `TASK` (what the
    recipe records in config.json), which the workers compare.
    """
    import functools  # noqa: PLC0415
    import inspect  # noqa: PLC0415

    signature = inspect.signature(recipe)
    task = inspect.getmodule(recipe).TASK  # what the recipe records in config.json ("causal-lm")

    @functools.wraps(recipe)
    def run(*args, distribute: DistributeArgs | None = None, **kwargs):
        from kerasllm.training import unfinished_run  # noqa: PLC0415 - imports keras

        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call = bound.arguments
        options = distribute or DistributeArgs()
        with options.scope(quiet=call.get("quiet", False)) as dist:
            if dist.multi_worker:
                check_same_arguments(dist, command_record(task, call, options))
            if dist.multi_worker and not call["resume"] and (
                    unfinished_run(call["out"]) or started_by_this_command(call["out"], task, call["args"], options)):
                call["resume"] = True
                log.info("multi-worker: resuming the stopped run in %s", call["out"])
            call["dist"] = dist
            return recipe(*bound.args, **bound.kwargs)

    return run


# The recipe parameters that do not change what a worker computes: left out of the comparison.
NOT_COMPARED = ("out", "quiet", "extra_callbacks", "dist")


def command_record(task: str, call: dict, options: DistributeArgs) -> dict:
    """What a worker was asked to train, as comparable JSON: the recipe, its arguments (each
    field of the args dataclass), `--config`, the model overrides, `--resume` and the
    `--strategy/--precision/--scale-lr` options; not the data paths (`DATA_PATHS`, `--init-from`):
    each machine may keep its copy of the data elsewhere."""
    import dataclasses  # noqa: PLC0415

    from kerasllm.recipes.common import DATA_PATHS  # noqa: PLC0415 - the recipes' module

    record = {"command": task}
    for name, value in call.items():
        if name in NOT_COMPARED:
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            record.update(dataclasses.asdict(value))
        else:
            record[name] = value
    for name in (*DATA_PATHS, "init_from"):
        # Where each machine keeps its copy of the data ("data.txt" here, "/mnt/d/data.txt" there):
        # not compared. Different data still stops the job in one line where the shapes then differ.
        record.pop(name, None)
    record.update(precision=options.precision, scale_lr=options.scale_lr)
    return json.loads(json.dumps(record, default=str))


def _option(name: str) -> str:
    return {"command": "the train command", "config_file": "--config",
            "config_overrides": "the model options (--layers, --heads, ...)"}.get(name, "--" + name.replace("_", "-"))


def check_same_arguments(dist: Distribution, record: dict) -> None:
    """Every worker must train with the same arguments: each publishes `record` (`command_record`)
    in the cluster's key-value store (TensorFlow's coordination service) and compares it with every
    other worker's. A difference is one UsageError line naming the worker and the arguments;
    without this check a different --steps or vocabulary ended in a collective op's traceback,
    and a different --precision, --lr or --seed trained on silently, each worker its own way."""
    from tensorflow.python.eager import context  # noqa: PLC0415 - the coordination service's store

    key = "kerasllm/arguments/{}"
    ctx = context.context()
    ctx.set_config_key_value(key.format(dist.worker_index), json.dumps(record, sort_keys=True))
    for other in range(dist.num_workers):
        if other == dist.worker_index:
            continue
        theirs = json.loads(ctx.get_config_key_value(key.format(other), int(worker_wait_seconds() * 1000)))
        differ = [name for name in sorted({*record, *theirs}) if record.get(name) != theirs.get(name)]
        if differ:
            shown = "; ".join(f"{_option(n)} {json.dumps(record.get(n))} here, {json.dumps(theirs.get(n))} there"
                              for n in differ[:4])
            more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
            raise UsageError(f"multi-worker: worker {dist.worker_index} was started with other arguments than worker "
                             f"{other}: {shown}{more}; start every worker with the same command")


def started_by_this_command(out, task: str, args, options: DistributeArgs) -> bool:
    """`out` holds a run that this very command started and that stopped before its first checkpoint
    (its config.json records the same command, training arguments and options; no model.keras):
    a restarted job resumes it, which, with no checkpoint, starts training over with the saved
    tokenizer (the history past step 0 dropped). A directory of another command stays refused."""
    import dataclasses  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from kerasllm.recipes.common import train_record  # noqa: PLC0415 - the recipes' module
    from kerasllm.training import CONFIG_FILE, MODEL_FILE, read_run_config  # noqa: PLC0415 - imports keras

    out = Path(out)
    if not dataclasses.is_dataclass(args) or not (out / CONFIG_FILE).is_file() or (out / MODEL_FILE).exists():
        return False
    try:
        saved = read_run_config(out)
    except KerasLLMError:  # unreadable or malformed: prepare_run_dir refuses the directory as before
        return False
    if not isinstance(saved, dict):
        return False
    distribute, trained = saved.get("distribute"), saved.get("train")
    given = json.loads(json.dumps(train_record(args), default=str))
    # An option the command left out (None) matches what the recipe chose and saved for it (seq2seq's
    # --seq-len: the model's max_length).
    return (saved.get("task") == task
            and isinstance(trained, dict) and set(trained) == set(given)
            and all(value is None or trained[name] == value for name, value in given.items())
            and isinstance(distribute, dict) and distribute.get("precision") == options.precision
            and distribute.get("scale_lr") == options.scale_lr)


def shard_batches(dataset, shard_index: int, num_shards: int):
    """Worker `shard_index`'s batches of a pipeline that every worker builds identically.

    For input builders with no sharding of their own: each worker keeps batches
    `i, i + n, ...`, so no batch is read twice or skipped; the price is that every
    worker prepares all n shards' batches. The pipeline must be deterministic (seeded).
    """
    return dataset if num_shards <= 1 else dataset.shard(num_shards, shard_index)


@dataclass
class Distribution:
    """What a recipe needs to know about where it trains (from `training_strategy`)."""

    strategy: Any
    precision: str
    worker_index: int
    num_workers: int
    options: DistributeArgs | None = None

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0

    @property
    def multi_worker(self) -> bool:
        return self.num_workers > 1

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def per_replica_batch_size(self, global_batch_size: int) -> int:
        return per_replica_batch_size(global_batch_size, self.strategy)

    def jit_compile(self, requested: bool) -> bool:
        """XLA for the train step only where it can compile it (`xla_compiles_step`); the
        CLI's `--jit-compile` is turned off elsewhere, with a log line."""
        if not requested or xla_compiles_step(self.strategy):
            return requested
        log.info("--jit-compile is off: XLA cannot compile a step replicated over %d devices", self.num_replicas)
        return False

    def threads_for(self, config, jit_compile: bool) -> None:
        """Before TensorFlow's runtime starts: its threads for training `config` here (see
        `kerasllm.models.split_batch.give_parts_a_core_each`)."""
        from kerasllm.models.split_batch import give_parts_a_core_each  # noqa: PLC0415 - imports keras

        give_parts_a_core_each(jit_compile=jit_compile, dropout=config.dropout, replicas=self.num_replicas)

    def learning_rate(self, learning_rate: float, scale: bool | None = None) -> float:
        """`--lr`, times the replicas with `--scale-lr` (`scale`, default: the run's option)."""
        if scale is None:
            scale = bool(self.options and self.options.scale_lr)
        return scaled_learning_rate(learning_rate, self.strategy, scale)

    def distribute(self, make_dataset, global_batch_size: int):
        """The training input for `model.fit`.

        `make_dataset(batch_size, shard_index, num_shards)` builds one input pipeline.
        On one worker it is called once with the global batch and Keras splits each
        batch over the local replicas. Across workers every worker builds its own
        shard (`distribute_datasets_from_function`): batches of
        `global / replicas` examples, its own part of the data, so no worker reads what
        another one reads (see `kerasllm.data.lm_windows`).
        """
        self.per_replica_batch_size(global_batch_size)  # refuse uneven splits early
        if not self.multi_worker:
            return make_dataset(global_batch_size, 0, 1)
        import tensorflow as tf  # noqa: PLC0415

        def per_worker(context: tf.distribute.InputContext):
            return make_dataset(context.get_per_replica_batch_size(global_batch_size),
                                context.input_pipeline_id, context.num_input_pipelines)

        return self.strategy.distribute_datasets_from_function(per_worker)


@contextlib.contextmanager
def training_strategy(name: str = "auto", precision: str = "fp32", tpu: str | None = None,
                      quiet: bool = False) -> Iterator[Distribution]:
    """Resolve `--strategy`, set the `--precision` policy, and enter `strategy.scope()`.

    Create the model and call `compile` inside the block (variables, optimizer slots
    and metrics then live on every replica); `model.fit` may run inside or after it.
    The global dtype policy is restored on exit.
    """
    import keras  # noqa: PLC0415

    policy = precision_policy(precision)
    strategy = resolve_strategy(name, tpu)
    index, workers = worker_info(strategy)
    dist = Distribution(strategy, precision, index, workers)
    if not quiet and (dist.num_replicas > 1 or workers > 1):
        log.info("strategy %s: %d replica(s) on %d worker(s); this is worker %d%s", name, dist.num_replicas,
                 workers, index, " (chief)" if dist.is_chief else "")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        with strategy.scope():
            yield dist
    except Exception as err:
        if workers > 1 and _collective_mismatch(err):
            # Workers that run different steps or shapes (other data, a changed file): TensorFlow's
            # collective traceback, in one line.
            raise KerasLLMError(f"multi-worker: worker {index}'s collective operations do not match the other "
                                f"workers' ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]}); start "
                                "every worker with the same command on the same data") from err
        if workers > 1 and _lost_the_cluster(err):
            # Another worker stopped (the chief refusing its --out, a killed process): one line
            # naming this worker instead of TensorFlow's collective traceback.
            raise KerasLLMError(f"multi-worker: worker {index} lost the other workers ({type(err).__name__}: "
                                f"{str(err).strip().splitlines()[0][:200]}); the first worker to stop says why "
                                "in its own output") from err
        raise
    finally:
        keras.config.set_dtype_policy(previous)


def _lost_the_cluster(err: Exception) -> bool:
    """A collective op that failed because a peer went away (TensorFlow's Unavailable, Aborted,
    Cancelled or DeadlineExceeded)."""
    import tensorflow as tf  # noqa: PLC0415

    return isinstance(err, (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
                            tf.errors.DeadlineExceededError))


def _collective_mismatch(err: Exception) -> bool:
    """A collective op that failed because the workers disagree on it (TensorFlow's InternalError
    "Collective instance ... expected type", InvalidArgumentError "Shape mismatch in the
    collective instance")."""
    import tensorflow as tf  # noqa: PLC0415

    return (isinstance(err, (tf.errors.InternalError, tf.errors.InvalidArgumentError))
            and "collective" in str(err).lower())
