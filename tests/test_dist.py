"""Launcher environments map onto one set of variables; the collectives kclip adds behave on 2 ranks."""
import torch
from multiproc import run_ranks

from kclip import dist


def test_deepspeed_launcher_env_gets_local_world_size():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "1"}
    dist.map_launcher_env(env)
    assert env["LOCAL_WORLD_SIZE"] == "4" and env["RANK"] == "3"


def test_torchrun_env_gets_local_size():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    dist.map_launcher_env(env)
    assert env["LOCAL_SIZE"] == "2"


def test_srun_env_is_mapped():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
           "MASTER_ADDR": "node7"}
    dist.map_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "8", "1", "4")
    assert env["MASTER_ADDR"] == "node7" and env["LOCAL_SIZE"] == "4"


def test_plain_process_is_world_of_one():
    env = {}
    dist.map_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("0", "1", "1")
    assert int(env["MASTER_PORT"]) > 0


def _gather_rows():
    r = dist.rank()
    rows = torch.full((r + 1, 2), float(r))  # rank 0 has 1 row, rank 1 has 2
    to_zero, total = dist.gather_rows(rows)
    return dist.all_gather_rows(rows).tolist(), dist.all_reduce_max(10 * r + 1), to_zero.tolist(), total


def test_all_gather_rows_handles_unequal_counts():
    (all0, max0, zero0, total0), (all1, max1, zero1, total1) = run_ranks(_gather_rows)
    assert all0 == all1 == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]] and max0 == max1 == 11
    assert zero0 == all0 and zero1 == []  # gather_rows: only rank 0 holds the rows...
    assert total0 == total1 == 3  # ...but every rank knows how many there are
