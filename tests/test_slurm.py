"""deploy/slurm: the environment the scripts read and the commands they build (always), a node of a
multi-node job (SLURM_* → training.num_machines, main_process_ip, machine rank) training for real on
127.0.0.1, and, where Debian's slurm-wlm is installed, a real `sbatch --requeue` job that `scontrol requeue`
interrupts mid-train and that resumes and completes."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prefect_stack import free_port, tiny_run_overrides

from alphaspin.config import load_config
from alphaspin.runs import Run
from alphaspin.stage_spec import Node

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "deploy" / "slurm"
RUN_SCRIPT = SLURM / "alphaspin-run.sbatch"
NODE_SCRIPT = SLURM / "alphaspin-node.sh"
WORKERS_SCRIPT = SLURM / "prefect-workers.sbatch"
BIN = Path(sys.executable).parent
ALPHASPIN = str(BIN / "alphaspin")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any Slurm or Prefect variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PREFECT_API_URL", "ALPHASPIN_SLURM"))}
    env.update(extra)
    return env


def script(path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(path), *args], cwd=ROOT, env=clean_env(**env), capture_output=True, text=True)


def words(done: subprocess.CompletedProcess) -> list[str]:
    assert done.returncode == 0, done.stderr
    return shlex.split(done.stdout.strip().splitlines()[-1])


# -- outside Slurm, and bad environments: one line, exit 2, nothing run ----------------------------
@pytest.mark.parametrize("path", [RUN_SCRIPT, NODE_SCRIPT, WORKERS_SCRIPT])
def test_a_script_run_outside_slurm_says_so_in_one_line_and_exits_2(path, tmp_path):
    done = subprocess.run(
        ["bash", str(path), "--config", "configs/quickstart.yaml"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "SLURM_JOB_ID is not set" in done.stderr and "sbatch" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no log, no runs folder: nothing started


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"SLURM_NNODES": "2", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "a,b"},
            "expected 0 <= SLURM_NODEID < SLURM_NNODES",
        ),
        ({"SLURM_NNODES": "3", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "a,b"}, "names 2 node(s) but SLURM_NNODES=3"),
        ({"SLURM_NNODES": "2", "SLURM_NODEID": "1"}, "SLURM_JOB_NODELIST is not set"),
        ({"SLURM_NNODES": "1", "ALPHASPIN": "/nonexistent/alphaspin"}, "no alphaspin command"),
    ],
)
def test_the_node_script_refuses_an_inconsistent_slurm_environment(env, expected):
    done = script(
        NODE_SCRIPT,
        "--config",
        "x.yaml",
        SLURM_JOB_ID="7",
        ALPHASPIN_SLURM_DRY_RUN="1",
        **{"ALPHASPIN": ALPHASPIN, **env},
    )
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# -- the commands the scripts build from Slurm's environment --------------------------------------
def test_one_node_runs_alphaspin_run_with_the_arguments_and_without_a_temporary_prefect_server():
    args = ["--config", "configs/quickstart.yaml", "--set", "method.alpha=1.0"]
    base = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "ALPHASPIN": ALPHASPIN,
            "ALPHASPIN_SLURM_DRY_RUN": "1"}  # fmt: skip
    assert words(script(NODE_SCRIPT, *args, **base)) == [ALPHASPIN, "run", *args, "--no-prefect"]
    on_server = script(NODE_SCRIPT, *args, PREFECT_API_URL="http://prefect:4200/api", **base)
    assert words(on_server) == [ALPHASPIN, "run", *args]  # the flow runs go to the user's server


def test_several_nodes_take_the_rendezvous_and_machine_ranks_from_slurm():
    args = ["--config", "configs/paper-gemma-2b.yaml", "--set", "training.main_process_ip=10.9.9.9", "-v"]
    base = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "3", "SLURM_JOB_NODELIST": "gpu-a,gpu-b,gpu-c", "ALPHASPIN": ALPHASPIN,
            "ALPHASPIN_SLURM_DRY_RUN": "1"}  # fmt: skip
    slurm = ["--set", "training.num_machines=3", "--set", "training.main_process_ip=gpu-a"]
    assert words(script(NODE_SCRIPT, *args, SLURM_NODEID="0", **base)) == [
        ALPHASPIN,
        "run",
        *args,
        *slurm,
        "--no-prefect",
    ]
    for rank in ("1", "2"):
        follower = words(script(NODE_SCRIPT, *args, SLURM_NODEID=rank, **base))
        assert follower == [
            str(BIN / "python"),
            "-m",
            "alphaspin.distributed",
            "follow",
            *args,
            *slurm,
            "--machine-rank",
            rank,
        ]
    # Slurm's address wins over the recipe's fixed one: the later --set is applied last.
    config = load_config(ROOT / "configs/quickstart.yaml", ["training.main_process_ip=10.9.9.9", "training.num_machines=3",
                                                            "training.num_processes=3", "training.main_process_ip=gpu-a"])  # fmt: skip
    assert config.training.main_process_ip == "gpu-a"


def test_the_batch_script_srun_s_the_node_script_on_every_node():
    base = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu-a,gpu-b", "ALPHASPIN": ALPHASPIN, "ALPHASPIN_SLURM_DRY_RUN": "1",
            "SLURM_SUBMIT_DIR": str(ROOT)}  # fmt: skip
    two = script(RUN_SCRIPT, "--config", "c.yaml", SLURM_NNODES="2", **base)
    lines = [shlex.split(line) for line in two.stdout.strip().splitlines()]
    assert lines[0][:3] == [ALPHASPIN, "run", "--config"] and "training.main_process_ip=gpu-a" in lines[0]
    assert lines[1] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "bash",
                        str(NODE_SCRIPT), "--config", "c.yaml"]  # fmt: skip
    one = script(RUN_SCRIPT, "--config", "c.yaml", SLURM_NNODES="1", **base)
    assert shlex.split(one.stdout.strip().splitlines()[1]) == ["bash", str(NODE_SCRIPT), "--config", "c.yaml"]
    text = RUN_SCRIPT.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@120" in text


def test_the_worker_allocation_starts_one_process_worker_per_gpu():
    base = {"SLURM_JOB_ID": "42", "PREFECT_API_URL": "http://prefect:4200/api", "PREFECT": str(BIN / "prefect"),
            "ALPHASPIN_SLURM_DRY_RUN": "1"}  # fmt: skip
    done = script(WORKERS_SCRIPT, "gpu-big", SLURM_JOB_GPUS="4,5,6", **base)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"CUDA_VISIBLE_DEVICES={g} {BIN / 'prefect'} worker start --pool gpu-big --type process --name slurm-42-gpu{g} --limit 1"
        for g in (4, 5, 6)
    ]
    by_count = script(WORKERS_SCRIPT, SLURM_GPUS_ON_NODE="2", **base).stdout.splitlines()
    assert [line.split()[0] for line in by_count] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"]
    assert all("--pool gpu " in line for line in by_count)
    indexed = script(WORKERS_SCRIPT, SLURM_JOB_GPUS="4,5", ALPHASPIN_SLURM_GPU_IDS="index", **base).stdout.splitlines()
    assert [line.split()[0] for line in indexed] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"]
    for env, expected in (({}, "the job has no GPU"), ({"PREFECT_API_URL": ""}, "PREFECT_API_URL is not set")):
        refused = script(WORKERS_SCRIPT, **{**base, **env})
        assert refused.returncode == 2 and expected in refused.stderr and len(refused.stderr.splitlines()) == 1


def test_follow_refuses_machine_rank_0_naming_the_knob():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "alphaspin.distributed",
            "follow",
            "--config",
            "configs/quickstart.yaml",
            "--machine-rank",
            "0",
            "-v",
        ],  # fmt: skip
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "--machine-rank 0: training.num_machines is 1" in done.stderr.strip().splitlines()[-1]


# -- two "nodes" on 127.0.0.1, each started by the node script as srun would -----------------------
@pytest.mark.slow
def test_two_nodes_train_together_with_the_rendezvous_from_slurm_s_environment(tmp_path, tiny_model):
    overrides = [*tiny_run_overrides(tmp_path / "runs", "slurm-2nodes"), "training.num_processes=2",
                 "training.rendezvous_timeout_seconds=120", f"training.main_process_port={free_port()}"]  # fmt: skip
    args = ["--config", "configs/quickstart.yaml"] + [x for item in overrides for x in ("--set", item)]
    slurm = {
        "SLURM_JOB_ID": "7",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1",
        "ALPHASPIN": ALPHASPIN,
    }

    def node(rank: int, log: Path) -> subprocess.Popen:
        return subprocess.Popen(["bash", str(NODE_SCRIPT), *args], cwd=ROOT, env=clean_env(SLURM_NODEID=str(rank), **slurm),
                                stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip

    follower = node(1, tmp_path / "node1.log")
    try:
        main = node(0, tmp_path / "node0.log")
        assert main.wait(timeout=900) == 0, (tmp_path / "node0.log").read_text()[-3000:]
        assert follower.wait(timeout=120) == 0, (tmp_path / "node1.log").read_text()[-3000:]
    finally:
        if follower.poll() is None:  # SIGTERM: it stops the launch it started (its own session) too
            follower.terminate()
            try:
                follower.wait(timeout=40)
            except subprocess.TimeoutExpired:
                follower.kill()
    run = Run(load_config(ROOT / "configs/quickstart.yaml", overrides))
    record = run.dir(Node("train", 0)).verify()
    assert record is not None
    follower_log = (tmp_path / "node1.log").read_text()
    assert "iter-0/train is done" in follower_log
    assert follower_log.count("accelerate.commands.launch") == 1  # joined once: not the finished attempt again


# -- a real Slurm on this machine ------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm():
    from slurm_cluster import OneNodeSlurm, missing

    reason = missing()
    if reason:
        pytest.skip(reason)
    cluster = OneNodeSlurm().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.parametrize("interrupt", ["scontrol requeue", "time limit"])
def test_sbatch_requeue_mid_train_resumes_and_completes(interrupt, slurm, tmp_path, tiny_model):
    """``scontrol requeue``: Slurm SIGTERMs every process of the job and queues it again. ``time limit``: the
    USR1 that ``--signal=B:USR1@120`` sends to the batch shell before the limit (sent here at once with
    ``scancel --batch --signal=USR1``); the script passes SIGTERM to alphaspin and requeues the job itself."""
    assert slurm.run("scontrol", "show", "hostnames", "gpu[01-03],cpu7").split() == ["gpu01", "gpu02", "gpu03", "cpu7"]
    run_id = f"slurm-{uuid.uuid4().hex[:8]}"
    overrides = [*tiny_run_overrides(tmp_path / "runs", run_id), "training.save_steps=100"]
    args = ["--config", "configs/quickstart.yaml"] + [x for item in overrides for x in ("--set", item)]
    marker, out = tmp_path / "paused", tmp_path / "job.out"
    env = {
        **clean_env(SLURM_CONF=str(slurm.conf)),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "preempt_inject"), os.environ.get("PYTHONPATH", "")]),
        "ALPHASPIN_TEST_PAUSE": f"main:2:{marker}",  # train waits at the end of step 2 of 3 for the requeue
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--output={out}", str(RUN_SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]

    deadline = time.monotonic() + 600
    while not marker.exists():
        assert time.monotonic() < deadline, f"{slurm.job(job)}\n{out.read_text() if out.exists() else ''}"
        time.sleep(0.5)
    if interrupt == "scontrol requeue":
        slurm.run("scontrol", "requeue", job)  # SIGTERM to every process of the job, then back to pending
    else:
        slurm.run("scancel", "--batch", "--signal=USR1", job)
    requeued = time.monotonic()
    while slurm.job(job).get("Restarts") != "1" or slurm.job(job)["JobState"] not in (
        "PENDING",
        "RUNNING",
        "COMPLETED",
    ):
        assert time.monotonic() - requeued < 60, slurm.job(job)
        time.sleep(0.5)
    text = out.read_text()
    assert "alphaspin exited with code 143" in text, text[-3000:]
    if interrupt == "time limit":
        assert "the time limit is near (USR1)" in text and f"requeueing job {job}" in text
    assert "preempted by SIGTERM at step 2/3; checkpoint-2 is stored" in text
    train = Run(load_config(ROOT / "configs/quickstart.yaml", overrides)).dir(Node("train", 0))
    assert train.read_manifest() is None and "_scratch/checkpoints/checkpoint-2/_COMPLETE.json" in train.list_files()
    # Skip Slurm's requeue delay, but only once the node has finished cleaning up the first attempt (its
    # slurmstepd still ends the batch step): the delay exists for that, and a relaunch before the node is
    # idle again was seen to fail at once on a loaded CI machine (FAILED, exit 1, no output).
    deadline = time.monotonic() + 120
    while not (node := slurm.run("sinfo", "-h", "-o", "%t").strip()).startswith("idle"):
        assert time.monotonic() < deadline, f"node {node!r} not idle 120 s after the requeue\n{slurm.logs()}"
        time.sleep(0.5)
    # and only in a later second than the kill: slurmd refuses a batch job whose credential was issued in the
    # second its previous attempt's credential was revoked (slurm_cred_revoked: cred->ctime <= revoked, both
    # whole seconds): "Job 2 already killed, do not launch batch job", the job FAILED, seen in a fresh-clone
    # suite with 0.4 s between the end of the first attempt and the relaunch
    time.sleep(2.0)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")

    while (state := slurm.job(job))["JobState"] != "COMPLETED":
        assert state["JobState"] in ("PENDING", "RUNNING", "COMPLETING"), (
            f"{state}\n{out.read_text()[-3000:]}\n{slurm.logs()}"
        )
        assert time.monotonic() - requeued < 600, state
        time.sleep(1)
    assert slurm.job(job)["ExitCode"] == "0:0"
    text = out.read_text()
    assert "(restart 1)" in text and text.rstrip().endswith("alphaspin exited with code 0")
    record = train.verify()
    assert record is not None and record.metrics["resumed_from"] == "checkpoint-2"
