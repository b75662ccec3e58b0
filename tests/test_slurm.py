"""launchers/slurm/train.sbatch on a real, throw-away Slurm cluster.

The test installs Slurm and MUNGE from Debian's packages when missing (`.ci/slurm-setup.sh`),
starts munged, slurmctld and slurmd on localhost with their own key, ports, state folder and
slurm.conf (cgroup-free, no accounting), submits the batch script twice for two CPU ranks on a
tiny digits GPS job, and checks that both ranks ran, each run wrote its delta into an output
folder named after the job id, and MLflow got the experiment named by MLFLOW_EXPERIMENT_NAME;
one of the two jobs gets USR1 mid-epoch, requeues itself and must end with the other's delta,
bit for bit. Every wait has a deadline; the daemons are stopped and their state removed
whatever happens.

Skipped only where Slurm cannot be installed or run (not root, no apt-get, apt-get failing), and
then loudly: the skip names what is missing, raises a warning (warnings summary) and adds a
"REAL SLURM TEST SKIPPED" section to the terminal summary.  `.ci/run` installs Slurm before the
suite where it can (root) and then sets GPS_DS_REQUIRE_SLURM=1, which turns any skip into a
failure: a CI run that could test Slurm never passes without doing so.
The tests at the end run the batch scripts' derivations with stand-ins for `srun`/`scontrol`
(fast, no Slurm needed).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SETUP = Path(os.environ.get("GPS_DS_SLURM_SETUP") or REPO / ".ci" / "slurm-setup.sh")  # as in .ci/run
NEEDED_COMMANDS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo", "munged")
REQUIRE_ENV = "GPS_DS_REQUIRE_SLURM"
SBIN = "/usr/sbin:/sbin"  # Debian puts the daemons here, often not on a user's PATH
SBATCH = REPO / "launchers" / "slurm" / "train.sbatch"
NODE = "localhost"

INSTALL_TIMEOUT_S = 300  # apt-get install of four packages
START_TIMEOUT_S = 60  # daemons up and the node idle
WARM_TIMEOUT_S = 360  # DeepSpeed's CPU all-reduce op, compiled once per machine (cached afterwards)
JOB_TIMEOUT_S = 900  # the job itself: 30-60 s on a quiet machine, several minutes on a loaded one
STOP_TIMEOUT_S = 15

CLUSTER_TEST_TIMEOUT_S = INSTALL_TIMEOUT_S + START_TIMEOUT_S + WARM_TIMEOUT_S + JOB_TIMEOUT_S + 120

SLURM_CONF = """\
ClusterName=gpsds-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
FirstJobId={first_job_id}
NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} CPUs=4 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=30 State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not written)"


class SlurmSkipped(UserWarning):
    """The real-Slurm test did not run (shown in pytest's warnings summary)."""


class _SkipReport:
    """Adds a section to pytest's terminal summary naming what the real-Slurm test missed."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.section("REAL SLURM TEST SKIPPED", sep="!", red=True, bold=True)
        for reason in self.reasons:
            terminalreporter.line(reason, red=True)
        terminalreporter.line(f"(run .ci/run as root, or set {REQUIRE_ENV}=1 to make this a failure)")


def _missing_commands() -> list[str]:
    path = os.environ.get("PATH", "") + ":" + SBIN
    return [c for c in NEEDED_COMMANDS if shutil.which(c, path=path) is None]


def _skip_loudly(config, reason: str) -> None:
    """Fail when Slurm is required (GPS_DS_REQUIRE_SLURM=1, set by .ci/run after installing it);
    otherwise skip, with a warning and a terminal-summary section that say what is missing."""
    missing = _missing_commands()
    full = f"real-Slurm test not run: {reason}" + (f" (missing: {', '.join(missing)})" if missing else "")
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{REQUIRE_ENV} is set but {full}")
    if config is not None:
        report = next((p for p in config.pluginmanager.get_plugins() if isinstance(p, _SkipReport)), None)
        if report is None:
            report = _SkipReport()
            config.pluginmanager.register(report, "gps-ds-slurm-skip-report")
        report.reasons.append(full)
    warnings.warn(full, SlurmSkipped, stacklevel=2)
    pytest.skip(full)


def _install_slurm(config=None) -> None:
    try:
        proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{SETUP} did not finish within {INSTALL_TIMEOUT_S} s")
    if proc.returncode in (3, 4):  # cannot install here: not root, no apt-get, apt-get failed
        last = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]
        _skip_loudly(config, f"Slurm cannot be installed here: {last}")
    assert proc.returncode == 0, f"{SETUP} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    if os.geteuid() != 0:
        _skip_loudly(config, "slurmd must run as root to launch job steps; not root")


class Cluster:
    """munged + slurmctld + slurmd on localhost, all state under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))
        self.env["PATH"] = self.env.get("PATH", "") + ":/usr/sbin:/sbin"
        self.job_ids: list[str] = []
        self.master_ports: list[int] = []

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        root = self.root
        for sub in ("munge", "state", "spool", "run", "log"):
            (root / sub).mkdir(mode=0o755)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        # A first job id drawn at random: the batch script derives MASTER_PORT from it, so two
        # test runs on one machine (each with its own cluster) do not share a rendezvous port.
        while True:
            first_job_id = random.randint(1000, 999_999)
            if _port_is_free(10000 + first_job_id % 20000):
                break
        ctld_port = _free_port()
        slurmd_port = _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        (root / "slurm.conf").write_text(SLURM_CONF.format(
            host=socket.gethostname().split(".")[0], ctld_port=ctld_port, slurmd_port=slurmd_port, root=root,
            node=NODE, first_job_id=first_job_id))

        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                               f"--socket={root / 'munge' / 'munge.socket'}", f"--pid-file={root / 'run' / 'munged.pid'}",
                               f"--seed-file={root / 'munge' / 'munged.seed'}",
                               f"--log-file={root / 'log' / 'munged.log'}"])
        self._wait_for(lambda: (root / "munge" / "munge.socket").exists(), "munged's socket", 20)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait_for(lambda: self._run(["scontrol", "ping"], check=False).returncode == 0, "slurmctld", 30)
        self._spawn("slurmd", ["slurmd", "-D", "-N", NODE])
        self._wait_for(self._node_idle, f"node {NODE} idle", START_TIMEOUT_S)

    def stop(self) -> None:
        for job in self.job_ids:
            self._run(["scancel", "--full", job], check=False)
        if self.job_ids:  # give slurmd a moment to end the steps it was asked to cancel
            self._wait_for(lambda: not self._run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip(),
                           "cancelled jobs gone", 20, fail=False)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        # DeepSpeed's CPU all-reduce leaves its shared-memory buffers (~70 MB per rank) behind.
        for port in self.master_ports:
            for leftover in Path("/dev/shm").glob(f"deepspeed_*_{os.getuid()}_{NODE}_{port}_*"):
                leftover.unlink(missing_ok=True)

    # -- helpers -----------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def _run(self, cmd: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=kw.pop("env", self.env), timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}\n{self.logs()}")
        return proc

    def _node_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-n", NODE, "-o", "%T"], check=False).stdout.strip()
        return out.startswith("idle")

    def _wait_for(self, ready, what: str, timeout: float, fail: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None and fail:
                    raise AssertionError(f"{name} exited ({proc.returncode}) while waiting for {what}\n{self.logs()}")
            if ready():
                return True
            time.sleep(0.5)
        if fail:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.logs()}")
        return False

    def logs(self) -> str:
        parts = []
        for name in ("munged.out", "slurmctld.out", "slurmctld.log", "slurmd.out", "slurmd.log"):
            parts.append(f"--- {name}\n{_tail(self.root / 'log' / name, 15)}")
        return "\n".join(parts)

    # -- jobs --------------------------------------------------------------------------------------
    def submit(self, args: list[str], env: dict[str, str]) -> str:
        job = self._run(["sbatch", "--parsable", *args], env={**self.env, **env}, cwd=REPO).stdout.strip()
        job = job.split(";")[0]
        self.job_ids.append(job)
        self.master_ports.append(10000 + int(job) % 20000)
        return job

    def wait(self, job: str, timeout: float) -> dict[str, str]:
        """Poll until the job leaves the queue; return its `scontrol show job` fields."""
        deadline = time.monotonic() + timeout
        while True:
            state = self._job_fields(job).get("JobState", "")
            if state and state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"):
                return self._job_fields(job)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} still {state or 'unknown'} after {timeout} s")
            time.sleep(2)

    def _job_fields(self, job: str) -> dict[str, str]:
        out = self._run(["scontrol", "show", "job", "-o", job], check=False).stdout
        fields = {}
        for item in out.split():
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        return fields


@pytest.fixture
def cluster(request):
    _install_slurm(request.config)
    # Short path: munged's socket path must stay under the 108-byte limit of Unix sockets.
    root = Path(tempfile.mkdtemp(prefix="gpsds-slurm-", dir="/tmp"))
    c = Cluster(root)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def _job_path() -> str:
    """The job's PATH: this process's own, as for the suite's other multi-rank tests, so that
    DeepSpeed's op build finds the same `ninja` (two ninja versions writing one build folder in
    ~/.cache/torch_extensions see each other's log as foreign and rebuild at every switch)."""
    return os.environ.get("PATH", "")


def _warm_deepspeed_cpu_op() -> None:
    """Compile (or find cached) DeepSpeed's shared-memory all-reduce op once, here, rather than
    inside the job where both ranks would wait for it: keeps the job's own time predictable."""
    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"  # what every rank calls first
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WARM_TIMEOUT_S,
                              env=dict(os.environ, PATH=_job_path()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"compiling DeepSpeed's CPU op took more than {WARM_TIMEOUT_S} s")
    assert proc.returncode == 0, f"DeepSpeed's CPU op does not build:\n{proc.stderr[-3000:]}"


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def _wait_final(cluster: Cluster, job: str, timeout: float) -> dict[str, str]:
    """Like Cluster.wait, but through requeues (REQUEUED -> PENDING -> RUNNING ...)."""
    deadline = time.monotonic() + timeout
    while True:
        fields = cluster._job_fields(job)
        if fields.get("JobState") in FINAL_STATES:
            return fields
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job} still {fields.get('JobState')} after {timeout} s")
        time.sleep(1)


def _check_job(job: str, out: Path, text: str, method: str) -> None:
    """What every job of the real cluster must show: both ranks ran with the variables derived
    from Slurm's, the output folder is named after the job id, the MLflow run landed in the
    experiment named by MLFLOW_EXPERIMENT_NAME and finished."""
    from gps_ds.delta import load_delta

    port = 10000 + int(job) % 20000
    for rank in (0, 1):
        assert f"gps-ds slurm: rank {rank}/2 local {rank}/2 node 0/1" in text, text[-4000:]
    assert f"master {NODE}:{port}" in text, text[-4000:]
    assert "MLFLOW_EXPERIMENT_NAME" in text, text[-4000:]
    assert (out / "delta_last.safetensors").is_file(), f"{out} holds {sorted(p.name for p in out.glob('*'))}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["test"]["top1"] is not None
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert load_delta(out / "delta_last.safetensors").whole, "the delta holds no trained tensor"
    with sqlite3.connect(out / "mlflow.db") as db:  # embedded sqlite store in the output folder
        names = {row[0] for row in db.execute("select name from experiments")}
        statuses = [row[0] for row in db.execute("select status from runs")]
    assert "slurm-test" in names, names
    assert statuses == ["FINISHED"], statuses  # a requeued job continues its one run


@pytest.mark.slow
@pytest.mark.timeout(CLUSTER_TEST_TIMEOUT_S + JOB_TIMEOUT_S)
def test_train_sbatch_two_cpu_ranks(cluster, tmp_path):
    """Two copies of one 2-rank GPS job, submitted with train.sbatch, side by side: one runs
    through; the other gets USR1 (what --signal=B:USR1@300 sends before the time limit) once its
    first mid-epoch checkpoint exists, requeues itself, comes back with --resume and must end with
    the same mask and delta, bit for bit, as the uninterrupted one (the resumed run winds the
    epoch's stream forward and restores every rank's random states)."""
    from safetensors.torch import load_file

    from gps_ds.data.datasets import write_digits

    shards = tmp_path / "shards"
    write_digits(shards, test_size=0.5, progress=False)
    config = {
        "model": {"name": "test_vit", "img_size": 32, "num_classes": 10},
        "data": {"train": str(shards), "test": str(shards), "recipe": "digits", "image_size": 32, "workers": 0,
                 "steps_per_epoch": 24},
        "gps": {"k": 2, "max_batches": 2},
        "train": {"method": "gps", "epochs": 2, "lr": 0.003, "optimizer": "adamw", "weight_decay": 0.05},
        "deepspeed": {"train_micro_batch_size_per_gpu": 16},
        "output": {"checkpoint_every_steps": 3},
        "tracking": {"enabled": True},
    }
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    started = time.monotonic()
    _warm_deepspeed_cpu_op()
    warmed = time.monotonic()
    env = {"PATH": _job_path() + ":/usr/sbin:/sbin", "PYTHON": sys.executable, "GPS_DS_ROOT": str(REPO),
           "HF_HUB_OFFLINE": "1", "MLFLOW_EXPERIMENT_NAME": "slurm-test", "GPS_DS_COLLECTIVE_TIMEOUT": "180"}
    jobs, outs = {}, {}
    for name in ("through", "signalled"):
        config["output"]["dir"] = str(tmp_path / "runs" / name)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        jobs[name] = cluster.submit(["--job-name=gpsds-test", "--nodes=1", "--ntasks-per-node=2",
                                     "--cpus-per-task=1", "--time=15", f"--output={log_dir}/%x-%j.out",
                                     str(SBATCH), str(path), "--quiet"], env)
        # one output folder per job: the config's output.dir with the job id appended
        outs[name] = tmp_path / "runs" / f"{name}-{jobs[name]}"
    signalled = jobs["signalled"]
    logs = {name: log_dir / f"gpsds-test-{job}.out" for name, job in jobs.items()}

    # USR1 to the batch script as soon as the first periodic checkpoint is on disk (mid-epoch 0).
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (outs["signalled"] / "checkpoints" / "latest").is_file():
        state = cluster._job_fields(signalled).get("JobState")
        if state in FINAL_STATES or time.monotonic() > deadline:
            pytest.fail(f"job {signalled} {state} before its first checkpoint\n{_tail(logs['signalled'], 60)}")
        time.sleep(0.2)
    cluster._run(["scancel", "--batch", "--signal=USR1", signalled])

    try:
        fields = {name: _wait_final(cluster, job, JOB_TIMEOUT_S) for name, job in jobs.items()}
    except TimeoutError as err:
        pytest.fail(f"{err}\n--- job output\n{_tail(logs['signalled'], 60)}\n{cluster.logs()}")
    print(f"slurm test: DeepSpeed CPU op ready in {warmed - started:.0f} s, jobs ran "
          f"{fields['through'].get('RunTime')} / {fields['signalled'].get('RunTime')} (after its restart), "
          f"{time.monotonic() - warmed:.0f} s from submission")
    texts = {name: log.read_text(errors="replace") if log.exists() else "" for name, log in logs.items()}
    for name, f in fields.items():
        assert (f.get("JobState"), f.get("ExitCode")) == ("COMPLETED", "0:0"), (name, f, _tail(logs[name], 60))
        _check_job(jobs[name], outs[name], texts[name], "gps")
    assert fields["signalled"].get("Restarts") == "1", fields["signalled"]
    assert fields["through"].get("Restarts") == "0", fields["through"]

    # The log (appended across both starts) shows the requeue and a resume from inside epoch 0.
    text = texts["signalled"]
    assert f"USR1 (time limit near, or preemption notice): requeueing job {signalled}" in text, text[-4000:]
    assert f"restart 1 of job {signalled}: resuming the run in {outs['signalled']}" in text, text[-4000:]
    resumed = re.search(r"resuming from \S+ \(epoch (\d+), batch (\d+), step (\d+)\)", text)
    assert resumed, text[-4000:]
    epoch, batch, step = map(int, resumed.groups())
    assert 3 <= step < 2 * config["data"]["steps_per_epoch"], resumed.group(0)  # not a finished run
    assert (epoch, batch) != (0, 0)

    # Same selection and delta, bit for bit, and the same test result (no data.val: no best delta).
    for name in ("mask.safetensors", "delta_last.safetensors"):
        a, b = load_file(outs["through"] / name), load_file(outs["signalled"] / name)
        assert a.keys() == b.keys() and a, name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after the requeue"
    summaries = [json.loads((outs[n] / "summary.json").read_text()) for n in ("through", "signalled")]
    assert summaries[0]["test"] == summaries[1]["test"]


# --------------------------------------------------------------------------- without a cluster
# The batch scripts' derivations, run by bash with stand-ins for `scontrol` and `srun` (fast,
# no Slurm needed; not marked slow).
STUB_SCONTROL = """#!/usr/bin/env bash
if [ "$1" = requeue ]; then echo "scontrol requeue $2" >> "${STUB_LOG:?}"; exit 0; fi
[ "$1 $2" = "show hostnames" ] || exit 1
echo node07; echo node08
seq -f "node%05g" 1 20000  # a long list: reading only its first line must not kill the script (SIGPIPE)
"""
# `srun` stand-in: runs the command once per task of the first node, as srun would, with
# Slurm's per-task variables set.
STUB_SRUN = """#!/usr/bin/env bash
echo "SRUN_ARGS $*" >&2
while [[ "$1" == --* ]]; do shift; done
for id in 0 1; do
    SLURM_PROCID=$id SLURM_LOCALID=$id SLURM_NODEID=0 SLURM_STEP_NUM_TASKS=$SLURM_NTASKS \\
        SLURM_STEP_NUM_NODES=2 SLURM_STEP_TASKS_PER_NODE="2(x2)" "$@" || exit $?
done
"""
PROBE = "import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}))"


def _run_batch_script(tmp_path: Path, args: list[str], env: dict[str, str], script: Path = SBATCH,
                      srun: str = STUB_SRUN, signal_after: float | None = None):
    """Run a batch script with the stand-ins; `signal_after`: send it USR1 that many seconds
    after it starts (as `--signal=B:USR1@...` would)."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, text in (("scontrol", STUB_SCONTROL), ("srun", srun)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    # the "interpreter" prints what it was given instead of training
    probe = stubs / "probe-python"
    probe.write_text(f"#!/usr/bin/env bash\n"  # `python - CONFIG` (reading output.dir) runs for real
                     f"[ \"$1\" = - ] && exec {sys.executable} \"$@\"\n"
                     f"exec {sys.executable} -c \"{PROBE}\" \"$@\"\n")
    probe.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLFLOW_", "GPS_DS_"))}
    base.update(PATH=f"{stubs}:{os.environ.get('PATH', '')}", PYTHON=str(probe), SLURM_JOB_ID="123456",
                SLURM_JOB_NODELIST="node[07-08]", SLURM_NTASKS="4", SLURM_JOB_NUM_NODES="2",
                SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_PER_TASK="3", **env)
    base.pop("OMP_NUM_THREADS", None)
    if signal_after is None:
        proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=base, timeout=60,
                              cwd=tmp_path)
    else:
        with subprocess.Popen(["bash", str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=base, cwd=tmp_path) as p:
            time.sleep(signal_after)
            p.send_signal(signal.SIGUSR1)
            out, err = p.communicate(timeout=60)
        proc = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    ranks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, ranks


def _config(tmp_path: Path, output: dict | None = None) -> Path:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"output": output} if output is not None else {}))
    return path


def test_batch_script_derives_rendezvous_ranks_and_output(tmp_path):
    cfg = _config(tmp_path, {"dir": "runs/mine"})
    proc, ranks = _run_batch_script(tmp_path, [str(cfg), "--set", "gps.k=2", "--quiet"],
                                    {"MLFLOW_TRACKING_URI": "http://tracker:5000", "MLFLOW_TRACKING_PASSWORD": "s3cret"})
    assert proc.returncode == 0, proc.stderr
    assert len(ranks) == 2, proc.stdout
    for task, rank in enumerate(ranks):
        env = rank["env"]
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == (str(task), str(task), "4")
        assert (env["LOCAL_SIZE"], env["CROSS_RANK"], env["CROSS_SIZE"]) == ("2", "0", "2")
        assert env["MASTER_ADDR"] == "node07"
        assert env["MASTER_PORT"] == str(10000 + 123456 % 20000)
        assert env["OMP_NUM_THREADS"] == "3"
        assert env["MLFLOW_TRACKING_PASSWORD"] == "s3cret"  # forwarded ...
        assert rank["argv"] == ["launchers/train.py", "--config", str(cfg),
                                "--set", "output.dir=runs/mine-123456", "--set", "tracking.uri=http://tracker:5000",
                                "--set", "gps.k=2", "--quiet"]
    log = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if not line.startswith("{")]
    assert any("MLFLOW_TRACKING_PASSWORD" in line for line in log), log  # ... named in the log,
    assert not any("s3cret" in line for line in log), log  # never its value
    assert "--cpus-per-task=3" in proc.stderr and "--kill-on-bad-exit=1" in proc.stderr


def test_batch_script_keeps_what_the_user_sets(tmp_path):
    cfg = _config(tmp_path)
    proc, ranks = _run_batch_script(tmp_path, ["--set", "output.dir=runs/x", "--set", "tracking.uri=sqlite:///t.db"],
                                    {"CONFIG": str(cfg), "MLFLOW_TRACKING_URI": "http://ignored:5000",
                                     "MLFLOW_EXPERIMENT_NAME": "exp1"})
    assert proc.returncode == 0, proc.stderr
    assert ranks[0]["argv"] == ["launchers/train.py", "--config", str(cfg), "--set", "tracking.experiment=exp1",
                                "--set", "output.dir=runs/x", "--set", "tracking.uri=sqlite:///t.db"]
    # no output.dir anywhere: runs/<config name>-<job id>
    proc, ranks = _run_batch_script(tmp_path, [str(cfg)], {})
    assert ranks[0]["argv"][3:] == ["--set", "output.dir=runs/cfg-123456"], ranks[0]["argv"]


def test_batch_script_errors_are_one_line(tmp_path):
    proc, _ = _run_batch_script(tmp_path, [], {})
    assert proc.returncode == 2 and "no config" in proc.stderr, proc.stderr
    proc, _ = _run_batch_script(tmp_path, [str(tmp_path / "missing.json")], {})
    assert proc.returncode == 2 and "config file not found" in proc.stderr, proc.stderr


def test_select_script_writes_the_mask_into_the_job_folder(tmp_path):
    cfg = _config(tmp_path, {"dir": str(tmp_path / "runs" / "sel")})
    proc, ranks = _run_batch_script(tmp_path, [str(cfg), "--quiet"], {},
                                    script=REPO / "launchers" / "slurm" / "select.sbatch")
    assert proc.returncode == 0, proc.stderr
    out_dir = tmp_path / "runs" / "sel-123456"
    assert ranks[0]["argv"] == ["launchers/select.py", "--config", str(cfg), "--set", f"output.dir={out_dir}",
                                "--out", f"{out_dir}/mask.safetensors", "--quiet"]
    assert out_dir.is_dir()
    proc, ranks = _run_batch_script(tmp_path, [str(cfg), "--out", "m.safetensors"], {},
                                    script=REPO / "launchers" / "slurm" / "select.sbatch")
    assert ranks[0]["argv"][-2:] == ["--out", "m.safetensors"]


def test_rank_env_with_one_gpu_per_task(tmp_path):
    """Slurm binding each task to its own GPU (--gpus-per-task) leaves one visible device: CUDA
    index 0 whatever the local rank; a local rank beyond the visible GPUs is refused."""
    wrapper = REPO / "launchers" / "slurm" / "rank_env.sh"
    base = dict(os.environ, SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_NODEID="1",
                SLURM_STEP_TASKS_PER_NODE="4(x2)", MASTER_ADDR="n1", MASTER_PORT="12345")
    show = [sys.executable, "-c", "import os; print(os.environ['LOCAL_RANK'], os.environ['LOCAL_SIZE'])"]
    proc = subprocess.run(["bash", str(wrapper), *show], capture_output=True, text=True, timeout=30,
                          env={**base, "CUDA_VISIBLE_DEVICES": "3"})
    assert proc.stdout.splitlines()[-1] == "0 4", proc.stdout + proc.stderr
    proc = subprocess.run(["bash", str(wrapper), *show], capture_output=True, text=True, timeout=30,
                          env={**base, "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert proc.stdout.splitlines()[-1] == "1 4", proc.stdout + proc.stderr
    proc = subprocess.run(["bash", str(wrapper), *show], capture_output=True, text=True, timeout=30,
                          env={**base, "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert proc.returncode == 2 and "GPU(s) are visible" in proc.stderr, proc.stderr


def test_batch_script_masks_uri_credentials_in_its_log(tmp_path):
    cfg = _config(tmp_path)
    proc, ranks = _run_batch_script(tmp_path, [str(cfg)], {"MLFLOW_TRACKING_URI": "https://bob:t0ken@mlflow.example"})
    assert proc.returncode == 0, proc.stderr
    assert "--set" in ranks[0]["argv"] and "tracking.uri=https://bob:t0ken@mlflow.example" in ranks[0]["argv"]
    log = [line for line in proc.stdout.splitlines() if not line.startswith("{")]
    assert any("tracking.uri=https://***@mlflow.example" in line for line in log), log
    assert not any("t0ken" in line for line in log), log


def _fake_setup(tmp_path, code: int, message: str) -> Path:
    script = tmp_path / "slurm-setup.sh"
    script.write_text(f"#!/usr/bin/env bash\necho 'slurm-setup: {message}' >&2\nexit {code}\n")
    return script


def test_slurm_skip_is_loud(tmp_path, monkeypatch, request):
    """Where Slurm cannot be installed, the skip names the reason and what is missing, warns,
    and registers the terminal-summary section; with GPS_DS_REQUIRE_SLURM=1 it fails instead."""
    here = sys.modules[__name__]
    monkeypatch.setattr(here, "SETUP", _fake_setup(tmp_path, 3, "cannot install slurmctld: not root"))
    bin_dir = tmp_path / "bin"  # bash and nothing else: no Slurm command anywhere on PATH
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to(shutil.which("bash"))
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(here, "SBIN", str(bin_dir))
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    plugins_before = set(map(id, request.config.pluginmanager.get_plugins()))
    with pytest.warns(SlurmSkipped, match="not root") as warned, pytest.raises(pytest.skip.Exception) as skipped:
        _install_slurm(request.config)
    assert "missing: slurmctld" in str(skipped.value) and "munged" in str(skipped.value)
    assert "not root" in str(warned[0].message)
    report = next(p for p in request.config.pluginmanager.get_plugins() if isinstance(p, _SkipReport))
    try:
        assert any("not root" in r for r in report.reasons)

        class Terminal:
            def __init__(self):
                self.text = []

            def section(self, title, **kw):
                self.text.append(title)

            def line(self, text, **kw):
                self.text.append(text)

        term = Terminal()
        report.pytest_terminal_summary(term)
        assert term.text[0] == "REAL SLURM TEST SKIPPED" and any("missing: slurmctld" in t for t in term.text)
    finally:
        if id(report) not in plugins_before:  # this test's own entry must not reach the real summary
            request.config.pluginmanager.unregister(report)

    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_ENV} is set but .*not root"):
        _install_slurm(request.config)


def test_ci_run_installs_slurm_and_requires_it(tmp_path):
    """`.ci/run`: runs the Slurm set-up before `make test`; on success it exports
    GPS_DS_REQUIRE_SLURM=1, on failure it prints a banner and lets the test skip (loudly)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    make = bin_dir / "make"
    make.write_text('#!/usr/bin/env bash\necho "make $* REQUIRE=${GPS_DS_REQUIRE_SLURM:-unset}"\n')
    make.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
    env.pop(REQUIRE_ENV, None)
    root = os.geteuid() == 0
    for code, want in ((0, "REQUIRE=1"), (3, "REQUIRE=unset"), (4, "REQUIRE=unset")):
        env["GPS_DS_SLURM_SETUP"] = str(_fake_setup(tmp_path, code, f"fake exit {code}"))
        proc = subprocess.run(["bash", str(REPO / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        if not root:  # the set-up is not even tried: slurmd could not run anyway
            assert "make test REQUIRE=unset" in proc.stdout and "REAL SLURM TEST WILL BE SKIPPED: not root" in proc.stdout
            continue
        assert f"make test {want}" in proc.stdout, (code, proc.stdout, proc.stderr)
        if code:
            assert "REAL SLURM TEST WILL BE SKIPPED" in proc.stdout and f"fake exit {code}" in proc.stderr
    # make's exit status is .ci/run's
    make.write_text("#!/usr/bin/env bash\nexit 7\n")
    proc = subprocess.run(["bash", str(REPO / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 7


def test_network_settings_reach_every_rank_and_the_log(tmp_path):
    """NCCL_* / GLOO_SOCKET_IFNAME set before sbatch reach each rank unchanged and are listed, with
    their values, in the job log; a multi-node job without NCCL_SOCKET_IFNAME gets a note."""
    cfg = _config(tmp_path)
    settings = {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_DEBUG": "WARN",
                "GLOO_SOCKET_IFNAME": "eth0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    proc, ranks = _run_batch_script(tmp_path, [str(cfg)], {**settings, "STUB_LOG": str(tmp_path / "log")})
    assert proc.returncode == 0, proc.stderr
    for rank in ranks:
        assert {k: rank["env"].get(k) for k in settings} == settings
    line = next(x for x in proc.stdout.splitlines() if "network settings forwarded" in x)
    assert all(f"{k}={v}" in line for k, v in settings.items()), line
    assert "NCCL_SOCKET_IFNAME" not in proc.stderr  # set: no note
    proc, _ = _run_batch_script(tmp_path, [str(cfg)], {"STUB_LOG": str(tmp_path / "log")})
    assert "network settings forwarded: none" in proc.stdout
    assert "2 nodes and no NCCL_SOCKET_IFNAME" in proc.stderr, proc.stderr


def test_requeued_job_resumes_its_run_and_never_overwrites(tmp_path):
    """SLURM_RESTART_COUNT > 0: --resume is added once the run exists (run.json), --overwrite is
    dropped; before the run exists (killed during selection) it simply starts again."""
    out = tmp_path / "runs" / "r"
    cfg = _config(tmp_path, {"dir": str(out)})
    env = {"STUB_LOG": str(tmp_path / "log")}
    job_dir = Path(f"{out}-123456")
    proc, ranks = _run_batch_script(tmp_path, [str(cfg), "--overwrite"], env)  # first start: as given
    assert ranks[0]["argv"][-1] == "--overwrite" and "--resume" not in ranks[0]["argv"]
    proc, ranks = _run_batch_script(tmp_path, [str(cfg), "--overwrite"], {**env, "SLURM_RESTART_COUNT": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "--resume" not in ranks[0]["argv"] and "--overwrite" not in ranks[0]["argv"], ranks[0]["argv"]
    assert f"no run in {job_dir} yet, starting it" in proc.stdout
    job_dir.mkdir(parents=True)
    (job_dir / "run.json").write_text("{}")
    proc, ranks = _run_batch_script(tmp_path, [str(cfg), "--overwrite", "--quiet"],
                                    {**env, "SLURM_RESTART_COUNT": "2"})
    assert ranks[0]["argv"] == ["launchers/train.py", "--config", str(cfg), "--set", f"output.dir={job_dir}",
                                "--resume", "--quiet"], ranks[0]["argv"]
    assert f"restart 2 of job 123456: resuming the run in {job_dir}" in proc.stdout
    proc, ranks = _run_batch_script(tmp_path, [str(cfg), "--resume"], {**env, "SLURM_RESTART_COUNT": "1"})
    assert ranks[0]["argv"].count("--resume") == 1


def test_usr1_requeues_the_job_and_the_script_keeps_waiting(tmp_path):
    """The batch script's USR1 trap runs `scontrol requeue <own job id>` while the ranks run; the
    ranks themselves ignore USR1 (rank_env.sh), and the script ends with srun's own status."""
    slow_srun = STUB_SRUN.replace('"$@" || exit $?', '"$@" || exit $?\n    sleep 3')
    cfg = _config(tmp_path)
    log = tmp_path / "log"
    proc, ranks = _run_batch_script(tmp_path, [str(cfg)], {"STUB_LOG": str(log)}, srun=slow_srun, signal_after=2)
    assert proc.returncode == 0, proc.stderr
    assert len(ranks) == 2, proc.stdout  # the signal did not cut the step short
    assert log.read_text().splitlines() == ["scontrol requeue 123456"]
    assert "USR1 (time limit near, or preemption notice): requeueing job 123456" in proc.stdout
    header = SBATCH.read_text()
    for option in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
        assert option in header
    # a rank ignores USR1: the wrapper's trap is inherited across exec
    wrapper = REPO / "launchers" / "slurm" / "rank_env.sh"
    code = "import os, signal, time; os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.2); print('alive')"
    rank = subprocess.run(["bash", str(wrapper), sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0",
                                               MASTER_ADDR="n1", MASTER_PORT="1"))
    assert rank.returncode == 0 and rank.stdout.splitlines()[-1] == "alive", rank.stdout + rank.stderr
