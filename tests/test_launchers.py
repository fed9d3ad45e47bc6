"""The launch scripts, run with fake `deepspeed`, `srun` and `scontrol` on PATH that record what they were asked to
do: the plumbing (hosts, ranks, master address, arguments, environment, preemption requeue) is checked without a
cluster."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from test_train import _env

REPO = Path(__file__).resolve().parents[1]


def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    scripts = {
        # Records its arguments and, for SLURM tests, the rank variables it was started with.
        "deepspeed": f'echo "deepspeed $* | node_rank_env=${{SLURM_PROCID:-}}" >> {log}\n'
                     'if [ -n "${FAKE_SLEEP:-}" ]; then trap "echo got-TERM >> ' + str(log) + '; exit 0" TERM; '
                     'sleep "$FAKE_SLEEP" & wait; fi',
        "scontrol": f'if [ "$1 $2" = "show hostnames" ]; then printf "gpu-a01\\ngpu-a02\\n"; '
                    f'else echo "scontrol $*" >> {log}; fi',
        # srun --ntasks-per-node=1 ... CMD ARGS: run CMD once per node with SLURM_PROCID set, like srun would.
        "srun": 'while [ "${1#-}" != "$1" ]; do shift; done\n'
                'for r in 0 1; do SLURM_PROCID=$r "$@" & done; wait',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body + "\n")
        path.chmod(0o755)
    return bin_dir


def launcher_free_env(**extra) -> dict:
    """os.environ without rank variables: an in-process run earlier in the session may have set them, and the
    scripts honour an existing MASTER_ADDR / MASTER_PORT."""
    return dict(_env(), PATH=f"{extra.pop('bin_dir')}:{os.environ['PATH']}", **extra)


def run_script(script: str, args: list[str], tmp_path: Path, env: dict | None = None, **kwargs):
    full_env = launcher_free_env(bin_dir=fake_bin(tmp_path), **(env or {}))
    return subprocess.run(["bash", str(REPO / script), *args], cwd=tmp_path, env=full_env, capture_output=True,
                          text=True, timeout=60, **kwargs)


@pytest.mark.parametrize("script", ["launchers/train.sh", "launchers/smoke.sh", "slurm/train.sbatch", "slurm/smoke.sbatch"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0


def test_train_sh_uses_the_hostfile_and_writes_deepspeed_env(tmp_path):
    (tmp_path / "hosts").write_text("# cluster\nnode01 slots=8\nnode02 slots=8\n")
    proc = run_script("launchers/train.sh", ["--config", "demo", "--output", "runs/x", "train.steps=5"], tmp_path,
                      env={"HOSTFILE": "hosts", "NCCL_DEBUG": "INFO"})
    assert proc.returncode == 0, proc.stderr
    call = (tmp_path / "calls.log").read_text()
    assert "--hostfile hosts --master_addr node01 --master_port 29500 --module kclip.cli train --config demo" in call
    assert "train.steps=5" in call
    assert "NCCL_DEBUG=INFO" in (tmp_path / ".deepspeed_env").read_text().splitlines()


def test_train_sh_without_hostfile_fails_with_one_line(tmp_path):
    proc = run_script("launchers/train.sh", [], tmp_path, env={"HOSTFILE": "nope"})
    assert proc.returncode == 2 and "hostfile 'nope' not found" in proc.stderr


def test_smoke_sh_defaults_to_the_smoke_config_on_one_device(tmp_path):
    proc = run_script("launchers/smoke.sh", ["train.steps=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    call = (tmp_path / "calls.log").read_text()
    assert "--num_gpus 1 --module kclip.cli train --config smoke train.steps=3 --output runs/smoke" in call


def test_sbatch_starts_one_launcher_per_node_with_ranks_and_master(tmp_path):
    env = {"SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
           "SLURM_GPUS_PER_NODE": "h100:8"}
    proc = run_script("slurm/train.sbatch", ["--config", "cc3m-llama2-7b-vitb16", "--output", "runs/cc3m"], tmp_path,
                      env=env)
    assert proc.returncode == 0, proc.stderr
    calls = sorted((tmp_path / "calls.log").read_text().splitlines())
    assert len(calls) == 2
    for rank, call in enumerate(calls):
        assert f"--no_ssh --node_rank {rank} --num_nodes 2 --num_gpus 8 --master_addr gpu-a01 --master_port 24242" in call
        assert "--module kclip.cli train --resume auto --config cc3m-llama2-7b-vitb16 --output runs/cc3m" in call


def test_sbatch_forwards_preemption_and_requeues(tmp_path):
    env = {"SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "FAKE_SLEEP": "30"}
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    full_env = launcher_free_env(bin_dir=fake_bin(tmp_path), **env)
    proc = subprocess.Popen(["bash", str(REPO / "slurm/train.sbatch"), "--output", str(run_dir)], cwd=tmp_path,
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "calls.log"
    deadline = time.time() + 20
    while not (log.is_file() and log.read_text().count("deepspeed") == 2) and time.time() < deadline:
        time.sleep(0.1)
    (run_dir / "PREEMPTED").write_text("step=10\n")  # what the ranks leave after checkpointing on the signal
    proc.send_signal(10)  # SIGUSR1, as `#SBATCH --signal=B:USR1@180` sends it
    assert proc.wait(timeout=30) == 0
    assert "scontrol requeue 7" in log.read_text()
