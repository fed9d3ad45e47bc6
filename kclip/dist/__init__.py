"""Process groups for kclip, one job per module:

- env: the launch environment, whichever launcher started the ranks (or none).
- group: the default process group's start, this rank's place in it and on its node, its node's group.
- watchdog: a rank died: heartbeats, the watchdog, the one-line exit of the survivors.
- collectives: the few collectives kclip needs beyond torch.distributed's.

Callers use the names re-exported here (`from kclip import dist; dist.rank()`).
"""
from kclip.dist.collectives import (
    all_gather_rows,
    all_gather_with_grad,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast,
    broadcast_object,
    gather_rows,
)
from kclip.dist.env import free_port, map_launcher_env
from kclip.dist.group import (
    RendezvousError,
    device,
    init,
    is_main,
    local_rank,
    local_world_size,
    log_startup,
    node_group,
    node_index,
    num_nodes,
    rank,
    world_size,
)
from kclip.dist.watchdog import describe_failure, exit_after_lost_peer

__all__ = [
    "all_gather_rows", "all_gather_with_grad", "all_reduce_max", "all_reduce_sum", "barrier", "broadcast",
    "broadcast_object", "gather_rows", "free_port", "map_launcher_env", "RendezvousError", "device", "init", "is_main",
    "local_rank", "local_world_size", "log_startup", "node_group", "node_index", "num_nodes", "rank", "world_size",
    "describe_failure", "exit_after_lost_peer",
]
