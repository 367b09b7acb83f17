"""Data-parallel training and sharded evaluation over ``torch.distributed`` (docs/distributed.md).

A run is distributed when ``torchrun`` (or ``artplug run --nproc N``, which starts the same
launcher, :func:`launch`) starts it with ``WORLD_SIZE`` > 1. Then:

- :func:`setup` joins the process group from torchrun's environment variables: NCCL on CUDA
  (each process takes ``cuda:LOCAL_RANK``), gloo on the CPU; a second, gloo group carries the
  small host-side agreements (the stop request, random generator states), so that they never
  touch the accelerator;
- the recipe's ``data.batch_size`` is the *global* batch: every rank keeps the whole split on
  its device, draws the same seeded permutation and trains on its contiguous slice of each
  global batch (:func:`check_global_batch`, :func:`local_slice`), so a step sees the examples
  a one-process step sees;
- the engine trains through the :class:`~torch.nn.parallel.DistributedDataParallel` wrapper
  (:func:`wrap`) only in the update's forwards; attacks run on the unwrapped module, so their
  input-gradient passes do no gradient all-reduce. ``[run] sync_bn`` converts BatchNorm layers
  (:func:`convert_sync_batchnorm`; on the CPU with :class:`CpuSyncBatchNorm`, since torch's
  ``SyncBatchNorm`` runs on accelerators only);
- rank 0 is the only writer (:func:`is_writer`): run folder, checkpoints, MLflow, output.
  Every other rank keeps its own copies of the checkpoints in a private scratch folder
  (:func:`scratch_dir`), so that restoring a checkpoint (best epoch, rollback, overfitting
  stop) needs neither a shared file system nor a broadcast;
- evaluation is sharded: :func:`eval_part` gives a rank its contiguous part of the examples
  and :func:`gather_rows` puts the per-example results back together in order, so the numbers
  equal a one-process evaluation's (exactly, for deterministic attacks);
- a stop request (SIGINT/SIGTERM) is agreed on by every rank at the same step boundary
  (:class:`AgreedStop`), and a rank that fails leaves its message in torchrun's store for rank
  0 to record (:func:`report_failure`, :func:`peer_failures`).

Without ``WORLD_SIZE`` > 1 nothing here runs: no process group, no wrapper, no extra sync.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from artplug.errors import ArtplugError
from artplug.interrupt import HANDLED_SIGNALS, StopRequest

FAILURE_KEY = "artplug/failure/"
"""Prefix of the keys of torchrun's store under which a failing rank leaves its message."""


class DistributedError(ArtplugError):
    """A distributed run cannot start (bad device or batch for N processes) or a rank failed.

    Exit code 2 for a set-up the user can fix; a run ended by another rank's failure uses
    :class:`PeerFailed` (exit code 1).
    """


class PeerFailed(DistributedError):
    """Another rank of the run failed or stopped, so this one cannot go on (exit code 1)."""

    exit_code = 1


# ------------------------------------------------------------------------------------------
# The environment torchrun sets


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        return default


def env_rank() -> int:
    """``RANK`` from torchrun's environment (0 when it is not set)."""
    return _env_int("RANK", 0)


def env_world_size() -> int:
    """``WORLD_SIZE`` from torchrun's environment (1 when it is not set)."""
    return max(_env_int("WORLD_SIZE", 1), 1)


def launched() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    return env_world_size() > 1


def is_writer() -> bool:
    """Whether this process writes the run's files, MLflow and output: rank 0 (or alone)."""
    return env_rank() == 0


# ------------------------------------------------------------------------------------------
# The process group


@dataclass
class World:
    """This process's place in a distributed run."""

    rank: int
    size: int
    local_rank: int
    device: torch.device
    backend: str
    control: Any = None
    """The gloo group for host-side agreements (``None``: the default group is gloo already)."""
    owned: bool = True
    """Whether artplug initialised the process group (and so destroys it at exit)."""
    scratch: Path | None = field(default=None, repr=False)

    @property
    def writer(self) -> bool:
        """Rank 0 writes; every other rank only computes."""
        return self.rank == 0


_WORLD: World | None = None


def current() -> World | None:
    """The distributed run this process is part of, or ``None`` (a one-process run)."""
    return _WORLD


def _device_for(setting: str, local_rank: int) -> torch.device:
    """The device of the process with ``local_rank`` for ``run.device = setting``."""
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "mps":
        raise DistributedError(
            "run.device = 'mps' cannot be used by a distributed run (torch.distributed has no "
            'backend for it); use device = "cpu" or run one process'
        )
    if setting.startswith("cuda:"):
        raise DistributedError(
            f"run.device = {setting!r} would put every process on the same GPU; use "
            'device = "cuda" (or "auto") under torchrun: each process takes cuda:LOCAL_RANK'
        )
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        count = torch.cuda.device_count()
        if count == 0:
            raise DistributedError(
                f"run.device = {setting!r} but torch sees no CUDA device; use device = "
                '"cpu" for a gloo run on the CPU'
            )
        if local_rank >= count:
            raise DistributedError(
                f"local rank {local_rank} has no GPU of its own: this machine has {count}; "
                f"start at most {count} processes per node (--nproc-per-node)"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_setting: str = "auto") -> World | None:
    """Join the process group torchrun describes; ``None`` for a one-process run.

    Idempotent: the first call initialises (or adopts a group the caller initialised), later
    calls return the same :class:`World`. Ranks other than 0 stop showing Python warnings:
    rank 0 shows the same ones.
    """
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        return None
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run one process")
    local_rank = _env_int("LOCAL_RANK", 0)
    device = _device_for(device_setting, local_rank)
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    backend = str(dist.get_backend())
    if dist.get_world_size() == 1:
        return None
    # Host-side agreements (a stop flag, RNG states) go through gloo, never the GPU.
    control = None if backend == "gloo" else dist.new_group(backend="gloo")
    _WORLD = World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        backend=backend,
        control=control,
        owned=owned,
    )
    atexit.register(teardown)
    if not _WORLD.writer:
        warnings.filterwarnings("ignore")
    return _WORLD


def teardown() -> None:
    """Remove this rank's scratch folders and leave the process group artplug initialised
    (registered at exit; a group the caller initialised is the caller's to destroy)."""
    global _WORLD
    world, _WORLD = _WORLD, None
    if world is None:
        return
    if world.scratch is not None:
        shutil.rmtree(world.scratch, ignore_errors=True)
    if world.owned and dist.is_initialized():
        dist.destroy_process_group()


def scratch_dir(world: World) -> Path:
    """A new private folder of a non-writer rank, standing in for one run's folder.

    A fresh one per run (a sweep trains several in one process), so that no file of an
    earlier run (a best checkpoint) is ever taken for this one's; all are removed at exit.
    """
    if world.scratch is None:
        world.scratch = Path(tempfile.mkdtemp(prefix=f"artplug-rank{world.rank}-"))
    return Path(tempfile.mkdtemp(prefix="run-", dir=world.scratch))


# ------------------------------------------------------------------------------------------
# The global batch


def check_global_batch(batch_size: int, world_size: int, where: str = "data.batch_size") -> int:
    """The per-rank batch of a global ``batch_size``; DistributedError when it does not divide."""
    if world_size > 1 and batch_size % world_size:
        lower = batch_size - batch_size % world_size
        raise DistributedError(
            f"{where} = {batch_size} is the global batch and must divide evenly over "
            f"{world_size} processes; use a multiple of {world_size} (e.g. {lower or world_size} "
            f"or {lower + world_size}) or start {_divisor_hint(batch_size, world_size)}"
        )
    return batch_size // max(world_size, 1)


def _divisor_hint(batch_size: int, world_size: int) -> str:
    divisors = [n for n in range(2, world_size + 1) if batch_size % n == 0]
    return f"{divisors[-1]} processes" if divisors else "one process"


def local_slice(n: int, rank: int, size: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` rows split over ``size`` ranks.

    The parts differ in length by at most one and, concatenated in rank order, give the rows
    in their order (as ``torch.tensor_split``).
    """
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def seed_for_rank(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random generators in a run seeded ``seed``."""
    state = np.random.SeedSequence([seed, rank]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


# ------------------------------------------------------------------------------------------
# The model


def wrap(model: nn.Module, world: World) -> nn.Module:
    """``model`` (on ``world.device``) in :class:`~torch.nn.parallel.DistributedDataParallel`.

    Rank 0's parameters and buffers are broadcast at construction (every rank built the same
    seeded model, so this changes nothing but guarantees it). ``find_unused_parameters`` stays
    off: every built-in technique's loss uses every parameter, and finding the unused ones
    costs a graph traversal per step.
    """
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


class _AllReduceSum(torch.autograd.Function):
    """A differentiable all-reduce (sum): the gradient is all-reduced back the same way."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the ranks."""
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        """Every rank's output depends on every rank's input: sum the gradients too."""
        out = grad.clone()
        dist.all_reduce(out)
        return out


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, over gloo (CPU).

    torch's :class:`~torch.nn.SyncBatchNorm` refuses CPU tensors, so CPU runs (and the tests)
    use this one: two differentiable all-reduces per training forward (per-channel sums, then
    sums of squared deviations: the two-pass variance, as accurate as one process's), whose
    backward all-reduces the gradients. The running statistics take the global mean and the
    unbiased global variance, as one process on the global batch would. In eval mode, or
    outside a process group, it is the ordinary BatchNorm. Its state dict is BatchNorm's, so
    checkpoints load into the unconverted model.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        """Global-batch normalisation in training mode, else BatchNorm's."""
        synced = (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )
        if not synced:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = input.new_tensor([input.numel() // input.shape[1]])
        stats = _AllReduceSum.apply(torch.cat([input.sum(dims), count]))
        n = stats[-1]
        mean = stats[:-1] / n
        centered = input - mean.view(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims)) / n
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None
            with torch.no_grad():
                total = float(n)
                unbiased = var.detach() * (total / max(total - 1.0, 1.0))
                self.running_mean.mul_(1.0 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1.0 - factor).add_(unbiased, alpha=factor)
        return out


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` in its synchronised form for ``device``.

    torch's :class:`~torch.nn.SyncBatchNorm` on accelerators, :class:`CpuSyncBatchNorm` on
    the CPU. The layers keep their parameters and buffers.
    """
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, (CpuSyncBatchNorm, nn.SyncBatchNorm)
        ):
            # The class is swapped in place: CpuSyncBatchNorm adds no state, so the layer keeps
            # its parameters (the optimizer's), buffers, hooks (a latent site) and attributes.
            module.__class__ = CpuSyncBatchNorm
    return model


# ------------------------------------------------------------------------------------------
# Collectives


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the ranks (a new tensor); ``tensor`` itself without a world."""
    if _WORLD is None:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def agree_max(value: int) -> int:
    """The largest of every rank's ``value`` (host-side, over the gloo control group)."""
    if _WORLD is None:
        return value
    flag = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_WORLD.control)
    return int(flag.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled, over the gloo control group)."""
    if _WORLD is None:
        return [obj]
    out: list[Any] = [None] * _WORLD.size
    dist.all_gather_object(out, obj, group=_WORLD.control)
    return out


def eval_part(n: int) -> slice | None:
    """This rank's part of ``n`` examples to evaluate; ``None`` outside a distributed run."""
    if _WORLD is None:
        return None
    return local_slice(n, _WORLD.rank, _WORLD.size)


def gather_rows(part: Tensor, n: int) -> Tensor:
    """The rows every rank computed for its :func:`eval_part` of ``n``, back in order.

    ``part`` is this rank's ``(len(part), ...)`` result (bool, integer or float); every rank
    gets the whole ``(n, ...)`` tensor. The parts are padded to the longest for the
    all-gather and trimmed after.
    """
    world = _WORLD
    if world is None:
        return part
    longest = local_slice(n, 0, world.size).stop
    # NCCL gathers device tensors, gloo host ones; bool travels as uint8 (not every backend
    # reduces or gathers bool).
    dtype = part.dtype
    wire = part.to(world.device, torch.uint8 if dtype == torch.bool else dtype)
    padded = wire.new_zeros((longest, *wire.shape[1:]))
    padded[: len(wire)] = wire
    pieces = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(pieces, padded)
    rows = [
        piece[: len(range(*local_slice(n, rank, world.size).indices(n)))]
        for rank, piece in enumerate(pieces)
    ]
    return torch.cat(rows).to(part.device, dtype)


def gather_masks(masks: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Per-example boolean masks of every rank's part, back in order (one all-gather)."""
    names = list(masks)
    if _WORLD is None or not names:
        return dict(masks)
    local = torch.from_numpy(np.stack([np.asarray(masks[k], dtype=bool) for k in names], 1))
    whole = gather_rows(local, n).numpy()
    return {name: whole[:, i].copy() for i, name in enumerate(names)}


def mean_over_ranks(accuracy: float, n_local: int, n: int) -> float:
    """A count-based accuracy of this rank's ``n_local`` examples, as the accuracy over ``n``."""
    if _WORLD is None:
        return accuracy
    count = torch.tensor([round(accuracy * n_local)], dtype=torch.int64)
    dist.all_reduce(count, group=_WORLD.control)
    return int(count.item()) / max(n, 1)


# ------------------------------------------------------------------------------------------
# Stopping together


class AgreedStop(StopRequest):
    """A :class:`~artplug.interrupt.StopRequest` that every rank sees at the same step boundary.

    The signal handler records the request locally (``signum``), as in a one-process run;
    :attr:`requested`, which the training loop reads at every step boundary, all-reduces the
    local requests (one integer over the gloo group, no device sync) until one is seen, so
    that every rank writes the same checkpoint and stops after the same step. Every rank must
    read :attr:`requested` at the same points: the engine's loop does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.agreed: int | None = None

    @property
    def requested(self) -> bool:
        """True once any rank received a signal (the same answer on every rank)."""
        if self.agreed is None:
            signum = agree_max(self.signum or 0)
            if signum:
                self.agreed = signum
                self.signum = signum  # a rank that got no signal ends with the same code
        return self.agreed is not None


def make_stop() -> StopRequest:
    """The stop request of a run: :class:`AgreedStop` in a distributed run."""
    return AgreedStop() if _WORLD is not None or launched() else StopRequest()


def hold_signals() -> None:
    """From now on SIGINT/SIGTERM do nothing in this rank: it is ending and records how.

    torchrun sends every rank SIGTERM as soon as one of them exits with an error; a rank
    that is already handling that failure (or its own stop) must get to mark its MLflow run
    FAILED or KILLED instead of dying half way (the default SIGTERM action) or being
    interrupted again. torchrun kills a rank that still runs after its shutdown timeout.
    No-op outside a distributed run and outside the main thread.
    """
    if not launched() or threading.current_thread() is not threading.main_thread():
        return
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, lambda signum, frame: None)


# ------------------------------------------------------------------------------------------
# Failures


def _store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


def report_failure(message: str) -> None:
    """Leave this rank's failure ``message`` in torchrun's store for rank 0 (best effort)."""
    world = _WORLD
    store = _store() if world is not None else None
    if world is None or store is None:
        return
    # The store may be gone with the agent; the message is printed on stderr anyway.
    with contextlib.suppress(Exception):
        store.set(f"{FAILURE_KEY}{world.rank}", message)


def peer_failures(wait_s: float = 2.0) -> list[str]:
    """``rank N: message`` for every other rank that reported a failure (waits up to ``wait_s``).

    A rank's collective fails as soon as a peer's process exits, and the peer writes its
    message before it exits: the short wait covers a store write still in flight.
    """
    world = _WORLD
    store = _store() if world is not None else None
    if world is None or store is None:
        return []
    keys = [f"{FAILURE_KEY}{rank}" for rank in range(world.size) if rank != world.rank]
    deadline = time.monotonic() + wait_s
    found: list[str] = []
    while True:
        try:
            found = [
                f"rank {key.removeprefix(FAILURE_KEY)}: {store.get(key).decode(errors='replace')}"
                for key in keys
                if store.check([key])
            ]
        except Exception:
            return found
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)


def peer_failure(exc: BaseException) -> PeerFailed | None:
    """The error that names the rank that failed first, when ``exc`` is the echo of it.

    In a distributed run every rank's next collective fails once a peer has died; that
    RuntimeError says only "connection closed". ``None`` when no other rank reported a
    failure (then ``exc`` is this rank's own).
    """
    if _WORLD is None or isinstance(exc, ArtplugError):
        return None
    # A broken collective (RuntimeError) or torchrun's SIGTERM (KeyboardInterrupt) may come
    # a moment before the failed rank's message: wait a little for it.
    wait_s = (
        2.0 if isinstance(exc, RuntimeError) else 0.3 if isinstance(exc, KeyboardInterrupt) else 0.0
    )
    failures = peer_failures(wait_s=wait_s)
    if not failures:
        return None
    return PeerFailed(
        "another process of this distributed run failed, so every process stops: "
        + "; ".join(failures)
    )


# ------------------------------------------------------------------------------------------
# The launcher


def launch(nproc: int, args: Sequence[str]) -> int:
    """``torchrun --standalone --nproc-per-node nproc -m artplug ARGS``, in this process.

    Returns the exit status for the shell: 0, the first failing rank's own status (2 for a
    user error it printed, 3 for a divergence, 1 for a bug), or ``128 + signal`` when a signal
    ended the run. torchrun forwards SIGINT/SIGTERM to every rank, which stop at the next step
    boundary together.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    parser = get_args_parser()
    # Else argparse reads artplug's own options as abbreviations of torchrun's (--n: --nnodes).
    parser.allow_abbrev = False
    torchrun_args = parser.parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "-m", "artplug", *args]
    )
    try:
        torchrun(torchrun_args)
    except ChildFailedError as exc:
        return exit_status(exc.failures)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


def exit_status(failures: Mapping[int, Any]) -> int:
    """The status of a failed launch from torchrun's ``{rank: ProcessFailure}``.

    A rank that exited on its own (an error, a stop) is the root cause; ranks torchrun then
    killed (negative exit codes: killed by a signal) come after.
    """

    def key(item: tuple[int, Any]) -> tuple[bool, float, int]:
        rank, failure = item
        return (int(failure.exitcode) < 0, float(failure.timestamp), rank)

    if not failures:
        return 1
    _, first = min(failures.items(), key=key)
    code = int(first.exitcode)
    return 128 + abs(code) if code < 0 else code
