"""Entry points of tests/test_distributed.py's extra processes (test code only).

``torchrun ... tests/distributed_driver.py ARGS [--then ARGS ...]`` runs
:func:`artplug.cli.main` with each ``ARGS`` in turn in the same processes (one process group,
one start-up for several runs) and exits with the first non-zero status. With
``ARTPLUG_TEST_FAIL_AT=RANK:STEP`` in the environment, rank RANK raises a RuntimeError in its
training step STEP (1-based), so that the tests can watch a failure on one rank end every rank.
With ``ARTPLUG_TEST_COUNT_REDUCTIONS=FOLDER`` each rank counts its optimizer steps and DDP's
gradient all-reduce passes (:func:`_count_reductions`).

:func:`sync_bn_worker` is the body of the two processes that compare artplug's CPU
SyncBatchNorm with BatchNorm on the whole batch (started with ``torch.multiprocessing``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

THEN = "--then"


def _inject_failure(spec: str) -> None:
    from artplug import engine

    rank, step = (int(part) for part in spec.split(":"))
    if int(os.environ.get("RANK", "0")) != rank:
        return
    real = engine.train_step

    def failing(c: Any, x: Any, y: Any, progress: Any, meter: Any = None) -> Any:
        if progress.step + 1 == step:
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        return real(c, x, y, progress, meter)

    engine.train_step = failing


def _count_reductions(folder: str) -> None:
    """Count, per rank, the optimizer steps and the gradient all-reduce passes of DDP.

    A DDP comm hook sees every gradient bucket; the last bucket of a backward closes one
    all-reduce pass. Written to ``folder/rank<RANK>.json`` at exit, summed over every run.
    """
    import atexit
    import json

    import torch
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from artplug import engine

    counts = {"optimizer_steps": 0, "reduce_passes": 0}
    real_build = engine.build

    # No annotations: DDP compares them with the real classes, and this module's are strings.
    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]
        if bucket.is_last():
            counts["reduce_passes"] += 1
        return allreduce_hook(state, bucket)

    def build(*args: Any, **kwargs: Any) -> Any:
        c = real_build(*args, **kwargs)
        if c.ddp is not None:
            c.ddp.register_comm_hook(None, counting_hook)

        def step_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            counts["optimizer_steps"] += 1

        c.optimizer.register_step_post_hook(step_hook)
        return c

    engine.build = build
    rank = os.environ.get("RANK", "0")
    atexit.register(lambda: (Path(folder) / f"rank{rank}.json").write_text(json.dumps(counts)))


def run_commands(argv: list[str]) -> int:
    """``artplug`` with each ``--then``-separated part of ``argv``; the first failure's status."""
    from artplug.cli import main

    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == THEN:
            commands.append([])
        else:
            commands[-1].append(arg)
    for args in commands:
        try:
            main(args)
        except SystemExit as exc:
            if exc.code:
                return exc.code if isinstance(exc.code, int) else 1
    return 0


def sync_bn_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank ``rank`` of 2: CpuSyncBatchNorm on its half of a fixed batch; saves its results."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from artplug.distributed import convert_sync_batchnorm, local_slice

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.randn(11, 3, 4, 4) * 3 + 1  # 6 + 5 rows: unequal parts
    bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))
    with torch.no_grad():
        bn[0].weight.uniform_(0.5, 1.5)
        bn[0].bias.uniform_(-0.5, 0.5)
    part = x[local_slice(len(x), rank, world)].clone().requires_grad_(True)
    weights = torch.arange(1.0, 1 + part.numel()).view_as(part)  # a loss that is not symmetric
    out_part = bn(part)
    (out_part * weights).sum().backward()
    result = {
        "out": out_part.detach(),
        "grad_x": part.grad,
        "grad_w": bn[0].weight.grad,
        "grad_b": bn[0].bias.grad,
        "running_mean": bn[0].running_mean,
        "running_var": bn[0].running_var,
        "type": type(bn[0]).__name__,
    }
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    if os.environ.get("ARTPLUG_TEST_FAIL_AT"):
        _inject_failure(os.environ["ARTPLUG_TEST_FAIL_AT"])
    if os.environ.get("ARTPLUG_TEST_COUNT_REDUCTIONS"):
        _count_reductions(os.environ["ARTPLUG_TEST_COUNT_REDUCTIONS"])
    sys.exit(run_commands(sys.argv[1:]))
