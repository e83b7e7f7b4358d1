"""Multi-worker start-up through the CLI (subprocesses): a worker whose peers never come says what
it waits for, stops on SIGINT/SIGTERM, and gives up after KERASLLM_WORKER_WAIT seconds; workers
started with different arguments stop in one line each."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker as dw

FAST = ["--steps", 4, "--eval-interval", 2, "--eval-steps", 1, "--batch-size", 8, "--seq-len", 16, "--layers", 2,
        "--hidden", 32, "--no-jit-compile", "--quiet", "--strategy", "multi-worker"]


def start_worker0(args: list, peer: str, wait: float, log: Path) -> subprocess.Popen:
    """`kerasllm ARGS` as worker 0 of a 2-worker cluster whose worker 1 is at `peer`."""
    env = dw.worker_env(extra={"KERASLLM_WORKER_WAIT": str(wait)})
    env.pop("TF_CPP_MIN_LOG_LEVEL")  # the CLI's own default, as a user's
    env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{dw.free_ports(1)[0]}", peer]},
                                   "task": {"type": "worker", "index": 0}})
    return subprocess.Popen([sys.executable, "-m", "kerasllm", *map(str, args)], env=env, cwd=dw.ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # noqa: SIM115 - closed with it


def test_a_worker_whose_peer_never_comes_gives_up_in_one_line(tmp_path, corpus_file):
    """A peer at a closed port, and one that answers but is no TensorFlow worker (it never
    registers): each had left worker 0 waiting forever in TensorFlow's start-up, printing nothing."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # answers connections, never registers with the cluster
    mute_peer = f"127.0.0.1:{silent.getsockname()[1]}"
    closed, mute = (start_worker0(["train", "causal-lm", "--data", corpus_file, "--out", tmp_path / name, *FAST],
                                  peer, 4, tmp_path / f"{name}.log")
                    for name, peer in (("closed", "127.0.0.1:1"), ("mute", mute_peer)))
    codes = [closed.wait(timeout=120), mute.wait(timeout=120)]
    silent.close()
    logs = [(tmp_path / f"{name}.log").read_text().splitlines() for name in ("closed", "mute")]
    assert codes == [1, 1], (codes, logs)
    assert logs[0] == [
        "kerasllm: multi-worker: worker 0 is waiting for worker 1 (127.0.0.1:1) to start (up to 4 s, "
        "KERASLLM_WORKER_WAIT)",
        "kerasllm: error: multi-worker: gave up after 4 s: worker 1 (127.0.0.1:1) did not answer (wait longer with "
        "KERASLLM_WORKER_WAIT=SECONDS)"], logs[0]
    assert logs[1] == [f"kerasllm: error: multi-worker: gave up after 4 s: worker 1 ({mute_peer}) did not join the "
                       "cluster (wait longer with KERASLLM_WORKER_WAIT=SECONDS)"], logs[1]
    assert not (tmp_path / "closed").exists() and not (tmp_path / "mute").exists()


def test_sigint_and_sigterm_stop_a_waiting_worker_at_once(tmp_path, corpus_file):
    """SIGINT and SIGTERM had not stopped a worker waiting for its peers (only SIGKILL did)."""
    procs = {sig: start_worker0(["train", "causal-lm", "--data", corpus_file, "--out", tmp_path / sig.name, *FAST],
                                "127.0.0.1:1", 300, tmp_path / f"{sig.name}.log")
             for sig in (signal.SIGINT, signal.SIGTERM)}
    deadline = time.monotonic() + 120
    for sig, proc in procs.items():
        while "is waiting for worker 1" not in (tmp_path / f"{sig.name}.log").read_text():
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / f"{sig.name}.log").read_text()
            time.sleep(0.2)
        proc.send_signal(sig)
    codes = {sig: proc.wait(timeout=10) for sig, proc in procs.items()}
    # (click echoes an empty line on every Ctrl-C before kerasllm's own line)
    logs = {sig: [line for line in (tmp_path / f"{sig.name}.log").read_text().splitlines() if line] for sig in procs}
    assert codes == {signal.SIGINT: 130, signal.SIGTERM: -signal.SIGTERM}, (codes, logs)
    assert logs[signal.SIGINT][1:] == ["kerasllm: interrupted"], logs
    assert logs[signal.SIGTERM][1:] == ["kerasllm: stopped by SIGTERM while worker 0 waited for the other workers"]


def test_workers_started_with_other_arguments_stop_in_one_line(tmp_path, corpus_file):
    """--lr and --precision differ on worker 1: both workers had trained on, each its own way. The
    data path, spelled differently on each (as each machine may keep its copy elsewhere), is not
    an argument that differs."""
    import os

    ports = dw.free_ports(2)
    procs = []
    data = [corpus_file, os.path.relpath(corpus_file, dw.ROOT)]
    for index, extra in enumerate(([], ["--lr", "0.002", "--precision", "mixed_bfloat16"])):
        env = dw.worker_env(index, ports, {"TMPDIR": str(tmp_path)})
        env.pop("TF_CPP_MIN_LOG_LEVEL")
        args = ["train", "causal-lm", "--data", data[index], "--out", tmp_path / "run", *FAST, *extra]
        procs.append(subprocess.Popen([sys.executable, "-m", "kerasllm", *map(str, args)], env=env, cwd=dw.ROOT,
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"w{index}.log", "w")))  # noqa: SIM115
    codes = [p.wait(timeout=240) for p in procs]
    logs = [(tmp_path / f"w{i}.log").read_text().splitlines() for i in range(2)]
    assert codes == [2, 2], (codes, logs)
    assert logs[0] == ["kerasllm: error: multi-worker: worker 0 was started with other arguments than worker 1: "
                       "--lr 0.001 here, 0.002 there; --precision \"fp32\" here, \"mixed_bfloat16\" there; start "
                       "every worker with the same command"], logs[0]
    assert logs[1][0].startswith("kerasllm: error: multi-worker: worker 1 was started with other arguments than "
                                 "worker 0: --lr 0.002 here, 0.001 there;") and len(logs[1]) == 1, logs[1]
    assert not (tmp_path / "run").exists()
