"""Fixtures shared by the trainer-side tests (tests/rl)."""
import socket

import pytest


@pytest.fixture
def world_of_one():
    """A 1-process gloo group in this process (destroyed afterwards)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
