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


RANK_SCRIPT = """
import os, sys, time, torch
from kclip import dist
time.sleep(float(sys.argv[1]))
dist.init(timeout_s=1.0, rendezvous_timeout_s=float(sys.argv[2]))
t = torch.ones(1)
dist.all_reduce_sum(t)
print("sum", int(t.item()), flush=True)
if dist.rank() == 1:
    time.sleep(6)  # rank 0's next collective waits for it longer than dist.timeout_s
    os._exit(0)
start = time.perf_counter()
try:
    dist.all_reduce_sum(t)
except Exception:
    print("collective timed out after %.1f s" % (time.perf_counter() - start), flush=True)
os._exit(0)
"""


def _rank_env(rank: int, port: int) -> dict:
    import os

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE="2",
               LOCAL_RANK=str(rank), LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def test_a_late_rank_joins_within_the_rendezvous_timeout_not_the_collective_one():
    """dist.timeout_s (1 s here) bounds collectives only: a rank starting 4 s late still joins, and a collective
    after the start still times out after about 1 s."""
    import subprocess
    import sys

    port = dist.free_port()
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(delay), "60"], env=_rank_env(rank, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, delay in ((0, 0), (1, 4))]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "sum 2" in out, out + err[-2000:]
    timed_out = [line for line in outs[0][0].splitlines() if line.startswith("collective timed out")]
    assert timed_out and float(timed_out[0].split()[-2]) < 4.0, outs[0]


def test_a_rank_that_never_joins_fails_the_start_in_one_line(tmp_path):
    import subprocess
    import sys

    from shapes import make_shapes_mds

    data = make_shapes_mds(tmp_path / "shapes", n=32)
    cmd = [sys.executable, "-m", "kclip.cli", "train", "--config", "smoke", "--output", str(tmp_path / "run"),
           f"data.train={data}", "dist.rendezvous_timeout_s=3"]
    proc = subprocess.run(cmd, env=_rank_env(0, dist.free_port()), capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kclip: error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "not every rank joined" in errors[0] and "dist.rendezvous_timeout_s" in errors[0], errors


def test_a_port_in_use_is_named_not_blamed_on_the_other_ranks(tmp_path):
    import socket
    import subprocess
    import sys

    from shapes import make_shapes_mds

    data = make_shapes_mds(tmp_path / "shapes", n=32)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "kclip.cli", "train", "--config", "smoke", "--output", str(tmp_path / "run"),
               f"data.train={data}"]
        env = dict(_rank_env(0, port), WORLD_SIZE="1", LOCAL_SIZE="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kclip: error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert f"MASTER_PORT {port} is already in use" in errors[0], errors
