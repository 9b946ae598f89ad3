"""What the multi-process tests share: a free loopback port, and joining a gloo process group the way
a launcher (torchrun / srun) would set it up (a plain module beside the root conftest, importable from
every test folder)."""

import os
import socket

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_gloo(rank: int, port: int, world: int) -> None:
    """Set the variables a launcher sets (Lightning then joins this process group instead of making
    its own), one intra-op thread per rank (2 ranks share 2 cores), and join the gloo group."""
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
