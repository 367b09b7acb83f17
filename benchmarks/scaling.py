"""Data-parallel scaling on the CPU: PGD-AT examples per second, and sharded evaluation time.

Runs the same PGD adversarial-training work in 1 and in N gloo processes started by torchrun
(``python -m torch.distributed.run --standalone``), one thread each, and prints the training
throughput (examples per second over the *global* batch: the recipe's ``batch_size``) and
the time of a sharded evaluation, with their ratios to one process. The training steps are
``artplug.engine.train_epoch`` as ``fit`` runs them (DistributedDataParallel, the all-reduced
metric windows and the per-step stop agreement included; validation and checkpoints
excluded); the evaluation is :func:`artplug.evaluate.evaluate_detailed`, which shards itself
in a distributed run, and every world size evaluates the weights the first one trained (so
the accuracies agree, and the timings compare the same work).

Usage::

    python benchmarks/scaling.py [--nproc 1 2] [--batch-size 64] [--steps 10]
        [--train-steps 36] [--warmup-steps 4] [--eval-examples 300] [--attack pgd-20]
        [--model small-cnn] [--dataset digits] [--device cpu|cuda]

Measure on a quiet machine: each process is pinned to one thread (``OMP_NUM_THREADS=1``,
``run.threads = 1``), so N processes need N idle cores. The exit code is 0 whatever the
ratios (this is a measurement, not a test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_RATIO = 1.6
"""The goal: 2-process PGD-AT throughput / 1-process throughput on CPU, one thread each."""

HERE = Path(__file__).resolve()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps of the training attack")
    parser.add_argument("--train-steps", type=int, default=36, help="timed optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--eval-examples", type=int, default=300)
    parser.add_argument("--attack", default="pgd-20", help="attack-table entry of the eval")
    parser.add_argument("--model", default="small-cnn")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cpu: gloo; cuda: NCCL, one GPU each",
    )
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The PGD-AT recipe every world size trains."""
    return {
        "run": {
            "name": "scaling",
            "seed": 0,
            "epochs": 1000,
            "threads": 1,
            "device": args.device,
            "log_every": 10,
        },
        "data": {"dataset": args.dataset, "batch_size": args.batch_size},
        "model": {"arch": args.model},
        "optim": {"lr": 0.05},
        "threat": {"norm": "linf", "eps": 0.1},
        "perturbation": {"use": "pgd", "steps": args.steps, "random_start": True},
        "loss": [{"use": "cross-entropy"}],
        "tracking": {"backend": "none"},
    }


def worker(args: argparse.Namespace) -> None:
    """One rank: train warm-up + timed steps, then one sharded evaluation; rank 0 reports."""
    import torch
    import torch.distributed as dist

    from artplug import distributed, engine
    from artplug.evaluate import evaluate_detailed
    from artplug.plugins import load_plugins
    from artplug.recipe import resolve

    resolved = resolve(recipe(args), load_plugins().registries)
    c = engine.build(resolved)
    world = c.world
    meter = engine._Meter(c.device, [slot.id for slot in c.losses])
    stop = distributed.make_stop()

    def barrier() -> None:
        if world is not None:
            dist.barrier()

    def train(until: int, step: int, epoch: int) -> tuple[int, int]:
        while step < until:
            step = engine.train_epoch(c, epoch, step, meter=meter, max_steps=until, stop=stop)
            epoch += 1
        return step, epoch

    step, epoch = train(args.warmup_steps, 0, 0)
    barrier()
    started = time.perf_counter()
    step, epoch = train(args.warmup_steps + args.train_steps, step, epoch)
    barrier()
    synchronize(c.device)
    train_s = time.perf_counter() - started

    # Every world size evaluates the same weights: those the first launch trained.
    weights = Path(args.worker).with_name("eval-weights.pt")
    if weights.exists():
        c.model.load_state_dict(torch.load(weights, weights_only=True))
    elif distributed.is_writer():
        torch.save(c.model.state_dict(), weights)
    x, y = c.data.test
    x, y = x[: args.eval_examples], y[: args.eval_examples]
    barrier()
    started = time.perf_counter()
    accuracy, _ = evaluate_detailed(
        c.model, x, y, c.eval_threat, ["clean", args.attack], batch_size=256, device=c.device
    )
    barrier()
    synchronize(c.device)
    eval_s = time.perf_counter() - started
    if distributed.is_writer():
        report = {
            "world_size": world.size if world is not None else 1,
            "train_s": train_s,
            "examples_per_s": args.train_steps * args.batch_size / train_s,
            "eval_s": eval_s,
            "eval_examples": len(x),
            "accuracy": accuracy,
            "threads": torch.get_num_threads(),
        }
        Path(args.worker).write_text(json.dumps(report))


def synchronize(device: Any) -> None:
    """Wait for queued GPU work, so that the timers measure finished work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def launch(nproc: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run :func:`worker` in ``nproc`` processes (torchrun for more than one)."""
    options = ("batch_size", "steps", "train_steps", "warmup_steps", "eval_examples", "attack")
    options += ("model", "dataset", "device")
    forwarded = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in options]
    forwarded.append(f"--worker={out}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ARTPLUG_NO_BUSY_HINT": "1"}
    if nproc == 1:
        command = [sys.executable, str(HERE), *forwarded]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            str(HERE),
            *forwarded,
        ]
    subprocess.run(command, env=env, check=True)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def load_average() -> str:
    """The 1-minute load average (other processes skew every timing)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> None:
    """Measure every ``--nproc`` in turn and print the table and ratios."""
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    print(
        f"scaling: PGD-{args.steps} AT, {args.model} on {args.dataset}, global batch "
        f"{args.batch_size}, {args.train_steps} timed steps (+{args.warmup_steps} warm-up); "
        f"eval: clean + {args.attack} on {args.eval_examples} test examples; {args.device}, "
        f"1 thread per process; {os.cpu_count()} cores, load {load_average()} at start"
    )
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for nproc in args.nproc:
            results.append(launch(nproc, args, Path(scratch) / f"n{nproc}.json"))
    base = results[0]
    print(
        f"{'processes':>9} | {'train ex/s':>10} | {'x 1 proc':>8} | {'eval s':>7} | "
        f"{'speed-up':>8} | accuracy"
    )
    for r in results:
        accuracy = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["accuracy"].items())
        print(
            f"{r['world_size']:>9} | {r['examples_per_s']:>10.1f} | "
            f"{r['examples_per_s'] / base['examples_per_s']:>7.2f}x | {r['eval_s']:>7.2f} | "
            f"{base['eval_s'] / r['eval_s']:>7.2f}x | {accuracy}"
        )
    two = [r for r in results if r["world_size"] == 2]
    if two and base["world_size"] == 1:
        ratio = two[0]["examples_per_s"] / base["examples_per_s"]
        verdict = "meets" if ratio >= TARGET_RATIO else "misses"
        print(
            f"2-process PGD-AT throughput: {ratio:.2f}x one process ({verdict} the "
            f"{TARGET_RATIO}x goal); load {load_average()} at the end"
        )


if __name__ == "__main__":
    main()
