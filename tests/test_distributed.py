"""Data-parallel training and sharded evaluation on the CPU: 2 gloo processes (issue 12).

The end-to-end tests start real ``torchrun`` jobs (``python -m torch.distributed.run``, or
``artplug run --nproc 2``) with one thread per process, on digits. They carry the
``distributed`` marker (``-m "not distributed"`` deselects them); the longest are also
``slow``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import free_port, run_main
from torch import nn

from artplug import checkpoint as ckpt
from artplug import distributed
from artplug.data import BatchLoader
from artplug.distributed import DistributedError, check_global_batch, exit_status, local_slice
from artplug.engine import build, evaluate_test, load_weights
from artplug.errors import ResumeError
from artplug.recipe import dumps_toml, resolve
from artplug.testing import digits_recipe
from artplug.workflows import check_world_size, train_and_evaluate

TESTS = Path(__file__).resolve().parent
DRIVER = TESTS / "distributed_driver.py"
ROOT = TESTS.parent
STEPS = 6
TIMEOUT = 300


# ------------------------------------------------------------------------------------------
# Helpers


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ARTPLUG_NO_BUSY_HINT": "1", **extra}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The child processes import the test driver and artplug from the checkout.
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def torchrun(
    args: list[str],
    cwd: Path,
    *,
    launcher: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 DRIVER ARGS`` in ``cwd``."""
    launcher = launcher or ["--standalone", "--nproc-per-node", "2"]
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, str(DRIVER), *args]
    return subprocess.run(
        command,
        cwd=cwd,
        env=env or _env(cwd),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def fgsm_raw(out_dir: Path, **run: object) -> dict:
    """Digits, FGSM without random start (deterministic), SyncBN; odd evaluation sizes so
    that the shards are unequal (32 + 31, 51 + 50)."""
    return digits_recipe(
        run={
            "name": "ddp",
            "epochs": 1,
            "log_every": 2,
            "sync_bn": True,
            "threads": 1,
            "out_dir": str(out_dir),
            **run,
        },
        perturbation={"use": "fgsm", "random_start": False},
        eval={
            "every_epochs": 1,
            "attacks": ["clean", "fgsm"],
            "final_attacks": ["clean", "fgsm"],
            "n_examples": 63,
            "test_examples": 101,
            "sanity": False,
        },
    )


def only_run(folder: Path) -> Path:
    runs = sorted(p for p in folder.iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close_weights(a: dict, b: dict, atol: float = 1e-5) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        if a[key].is_floating_point():
            worst = max(worst, (a[key].double() - b[key].double()).abs().max().item())
        else:
            assert torch.equal(a[key], b[key]), key
    assert worst <= atol, worst
    return worst


def mlflow_runs(tmp_path: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return [
        run
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id])
    ]


# ------------------------------------------------------------------------------------------
# Units (no process group)


def test_local_slices_partition_in_order_and_differ_by_at_most_one():
    for n in (0, 1, 5, 63, 64, 101):
        for size in (1, 2, 3, 8):
            parts = [local_slice(n, rank, size) for rank in range(size)]
            rows = [i for part in parts for i in range(*part.indices(n))]
            assert rows == list(range(n))
            lengths = [len(range(*p.indices(n))) for p in parts]
            assert max(lengths) - min(lengths) <= 1


def test_global_batch_must_divide_with_a_message_naming_the_fix():
    assert check_global_batch(64, 2) == 32
    assert check_global_batch(64, 1) == 64
    with pytest.raises(DistributedError) as caught:
        check_global_batch(64, 3)
    message = caught.value.one_line()
    assert "data.batch_size = 64" in message and "3 processes" in message
    assert "63 or 66" in message and caught.value.exit_code == 2


def test_sharded_loader_yields_each_ranks_slice_of_the_same_global_batch():
    x = torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1)
    y = torch.arange(50)
    common = {"batch_size": 10, "shuffle": True, "drop_last": True, "seed": 3}
    whole = BatchLoader(x, y, **common)
    parts = [BatchLoader(x, y, shard=(rank, 2), **common) for rank in range(2)]
    assert len(parts[0]) == len(whole) == 5
    for epoch in (0, 1):
        for loader in (whole, *parts):
            loader.set_epoch(epoch)
        for (xw, yw), (x0, y0), (x1, y1) in zip(whole, *parts, strict=True):
            assert torch.equal(torch.cat([y0, y1]), yw) and len(y0) == len(y1) == 5
            assert torch.equal(torch.cat([x0, x1]), xw)


def test_exit_status_is_the_rank_that_failed_first_not_the_ones_torchrun_killed():
    class Failure:
        def __init__(self, exitcode: int, timestamp: float) -> None:
            self.exitcode, self.timestamp = exitcode, timestamp

    # Rank 0 was killed (SIGTERM) by torchrun after rank 1 exited with a user error.
    assert exit_status({0: Failure(-15, 1.0), 1: Failure(2, 2.0)}) == 2
    assert exit_status({0: Failure(-2, 1.0)}) == 130
    assert exit_status({1: Failure(3, 5.0), 0: Failure(1, 4.0)}) == 1


def test_resume_with_another_world_size_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "checkpoint-last.pt"
    check_world_size(path, {"world_size": 2}, world_size=2)
    check_world_size(path, {}, world_size=1)
    with pytest.raises(ResumeError, match=r"2 process\(es\), this one has 1.*--nproc 2.*--fork"):
        check_world_size(path, {"world_size": 2}, world_size=1)
    with pytest.raises(ResumeError, match="one process"):
        check_world_size(path, {}, world_size=4)


def test_nproc_checks_the_batch_before_starting_anything(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "r.toml"
    recipe.write_text(dumps_toml(fgsm_raw(tmp_path / "runs")))
    launched: list[tuple[int, list[str]]] = []
    monkeypatch.setattr(distributed, "launch", lambda n, args: launched.append((n, args)) or 0)
    code, _, err = run_main(["run", str(recipe), "--nproc", "3", "--no-track"], capsys)
    assert code == 2 and not launched
    # One line naming the recipe file and the key.
    assert err.startswith(f"Error: {recipe}: data.batch_size = 64 is the global batch")
    assert "\n" == err[-1]
    assert err.count("\n") == 1


def test_nproc_relaunches_the_same_command_without_itself(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "r.toml"
    recipe.write_text(dumps_toml(fgsm_raw(tmp_path / "runs")))
    launched: list[tuple[int, list[str]]] = []
    monkeypatch.setattr(distributed, "launch", lambda n, args: launched.append((n, args)) or 7)
    args = ["--traceback", "run", str(recipe), "--set", "optim.lr=0.1", "--nproc", "2", "-q"]
    code, _, _ = run_main([*args, "--max-steps", "3", "--no-track"], capsys)
    assert code == 7  # the launcher's status is the command's
    ((n, forwarded),) = launched
    assert n == 2 and "--nproc" not in forwarded
    assert forwarded[:2] == ["--traceback", "run"]
    assert forwarded[-2:] == ["--", str(recipe)]
    options = forwarded[2:-2]
    assert options[options.index("--set") + 1] == "optim.lr=0.1"
    assert {"--quiet", "--no-track"} <= set(options)
    assert options[options.index("--max-steps") + 1] == "3"


def test_nproc_inside_torchrun_is_an_error(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "r.toml"
    recipe.write_text(dumps_toml(fgsm_raw(tmp_path / "runs")))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_main(["run", str(recipe), "--nproc", "2"], capsys)
    assert code == 2 and "--nproc starts torchrun itself" in err


def test_a_one_process_run_builds_no_process_group(plugin_set):
    c = build(resolve(digits_recipe(run={"name": "one", "sync_bn": True}), plugin_set.registries))
    assert c.world is None and c.ddp is None and distributed.current() is None
    assert not torch.distributed.is_initialized()
    # sync_bn changes nothing without a process group: plain BatchNorm layers.
    assert any(type(m) is nn.BatchNorm2d for m in c.model.modules())


# ------------------------------------------------------------------------------------------
# CPU SyncBatchNorm on two processes


@pytest.mark.distributed
def test_cpu_sync_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    sys.path.insert(0, str(TESTS))
    import distributed_driver

    mp.spawn(
        distributed_driver.sync_bn_worker,
        args=(2, free_port(), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["type"] == "CpuSyncBatchNorm"

    torch.manual_seed(0)
    x = (torch.randn(11, 3, 4, 4) * 3 + 1).requires_grad_(True)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    out = bn(x)
    parts = [local_slice(len(x), r, 2) for r in range(2)]
    loss = sum(
        (out[p] * torch.arange(1.0, 1 + out[p].numel()).view_as(out[p])).sum() for p in parts
    )
    loss.backward()

    # float32 sums in another order: relative differences of a few 1e-6.
    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    for rank, part in enumerate(parts):
        close(ranks[rank]["out"], out[part].detach())
        # The input gradient includes the other rank's loss, through the shared statistics.
        close(ranks[rank]["grad_x"], x.grad[part])
        close(ranks[rank]["running_mean"], bn.running_mean)
        close(ranks[rank]["running_var"], bn.running_var)
    # DDP sums (and averages) the ranks' parameter gradients.
    close(ranks[0]["grad_w"] + ranks[1]["grad_w"], bn.weight.grad)
    close(ranks[0]["grad_b"] + ranks[1]["grad_b"], bn.bias.grad)


# ------------------------------------------------------------------------------------------
# End to end


@pytest.mark.distributed
def test_two_processes_train_as_one_and_evaluate_as_one(plugin_set, tmp_path, capsys):
    """(a) FGSM without random start and sync_bn: weights equal a one-process run on the same
    global batch; the logged training losses are the global batches'. (c) the sharded
    validation and final table equal a one-process evaluation of the same weights."""
    raw = fgsm_raw(tmp_path / "ddp")
    recipe = tmp_path / "r.toml"
    recipe.write_text(dumps_toml(raw))
    args = ["run", str(recipe), "--nproc", "2", "--max-steps", str(STEPS), "--no-track", "-q"]
    code, out, err = _run_cli_subprocess(args, tmp_path)
    assert code == 0, err[-3000:]
    assert out.count("Test accuracy") == 1  # one writer: the table is printed once
    ddp_dir = only_run(tmp_path / "ddp")
    ddp_report = json.loads((ddp_dir / "eval.json").read_text())

    single = resolve(
        {**raw, "run": {**raw["run"], "out_dir": str(tmp_path / "one")}}, plugin_set.registries
    )
    reference = train_and_evaluate(build(single), run_dir=tmp_path / "one", max_steps=STEPS)

    ddp_last = ckpt.load(ddp_dir / "checkpoint-last.pt", purpose="resume")
    one_last = ckpt.load(tmp_path / "one" / "checkpoint-last.pt", purpose="resume")
    assert ddp_last["step"] == one_last["step"] == STEPS
    assert ddp_last["world_size"] == 2 and len(ddp_last["rng_ranks"]) == 2
    assert_close_weights(ddp_last["model"], one_last["model"])

    # The training windows: losses and accuracies of the global batches, not rank 0's half.
    def windows(records: list[dict]) -> list[tuple[int, float, float]]:
        return [
            (r["step"], r["train/loss"], r["train/adv_acc"]) for r in records if "train/loss" in r
        ]

    ddp_windows, one_windows = windows(metrics(ddp_dir)), windows(metrics(tmp_path / "one"))
    assert [w[0] for w in ddp_windows] == [w[0] for w in one_windows] == [2, 4, 6]
    for (_, loss_d, acc_d), (_, loss_1, acc_1) in zip(ddp_windows, one_windows, strict=True):
        assert loss_d == pytest.approx(loss_1, rel=1e-5) and acc_d == acc_1
    val = [r for r in metrics(ddp_dir) if "val/fgsm_acc" in r]
    one_val = [r for r in metrics(tmp_path / "one") if "val/fgsm_acc" in r]
    assert [v["val/fgsm_acc"] for v in val] == [v["val/fgsm_acc"] for v in one_val]

    # (c) The sharded final table equals one process evaluating the same weights, exactly.
    used = ckpt.load(ddp_dir / ddp_report["checkpoint"])
    c = build(single)
    load_weights(c, used, "ddp checkpoint")
    assert evaluate_test(c) == ddp_report["accuracy"]
    assert ddp_report["n_examples"] == 101
    assert ddp_report["accuracy"] == reference.report["accuracy"]
    # Only rank 0 wrote: one run folder, and no scratch folder is left behind.
    assert [p.name for p in (tmp_path / "ddp").iterdir()] == [ddp_dir.name]


def _run_cli_subprocess(args: list[str], cwd: Path) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "artplug", *args],
        cwd=cwd,
        env=_env(cwd),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return done.returncode, done.stdout, done.stderr


@pytest.mark.distributed
def test_pgd_at_trades_free_at_and_slat_train_under_ddp(tmp_path):
    """(b) The built-in digits recipes of PGD-AT, TRADES, FreeAT (replays, after_backward) and
    SLAT (latent sites) train a few steps on 2 processes, one process group for all four."""
    quick = [
        "--max-steps",
        "3",
        "--no-track",
        "-q",
        "--set",
        "run.threads=1",
        "--set",
        f'run.out_dir="{tmp_path / "runs"}"',
        "--set",
        "eval.every_epochs=0",
        "--set",
        'eval.final_attacks=["clean"]',
        "--set",
        "eval.test_examples=33",
        "--set",
        "eval.sanity=false",
        "--set",
        "eval.eps_curve=[]",
    ]
    names = ["pgd_at", "trades", "free_at", "slat"]
    args: list[str] = []
    for name in names:
        args += [
            *(["--then"] if args else []),
            "run",
            str(ROOT / "recipes/digits" / f"{name}.toml"),
        ]
        args += quick
    counts = tmp_path / "counts"
    counts.mkdir()
    done = torchrun(args, tmp_path, env=_env(tmp_path, ARTPLUG_TEST_COUNT_REDUCTIONS=str(counts)))
    assert done.returncode == 0, done.stderr[-3000:]
    # One gradient all-reduce per optimizer step (FreeAT: per replay): the attacks' input
    # gradients (10 PGD steps, TRADES' KL steps, SLAT's latent step) all-reduce nothing.
    for rank in (0, 1):
        seen = json.loads((counts / f"rank{rank}.json").read_text())
        assert seen["reduce_passes"] == seen["optimizer_steps"] > 4 * 3, seen
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == len(names)
    for run in runs:
        payload = ckpt.load(run / "checkpoint-last.pt", purpose="resume")
        assert payload["step"] == 3 and payload["world_size"] == 2, run.name
        assert json.loads((run / "eval.json").read_text())["accuracy"]["clean"] > 0


@pytest.mark.distributed
def test_a_failure_on_rank_1_ends_both_ranks_and_fails_the_run(tmp_path):
    """(d) A RuntimeError in rank 1's third step: both processes exit non-zero within
    seconds, rank 0 names rank 1's error, and the MLflow run is FAILED, not RUNNING."""
    recipe = tmp_path / "r.toml"
    raw = fgsm_raw(tmp_path / "runs", epochs=2)
    raw["tracking"] = {"backend": "mlflow", "experiment": "ddp-failure"}
    recipe.write_text(dumps_toml(raw))
    env = _env(tmp_path, ARTPLUG_TEST_FAIL_AT="1:3")
    started = time.monotonic()
    done = torchrun(["run", str(recipe), "-q"], tmp_path, env=env)
    assert done.returncode != 0
    assert time.monotonic() - started < 120
    assert "injected failure on rank 1 at step 3" in done.stderr
    assert "Error: another process of this distributed run failed" in done.stderr
    (run,) = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("mlflow.runName") == "ddp"]
    assert run.info.status == "FAILED"
    assert "rank 1: RuntimeError: injected failure" in run.data.tags["artplug.error"]


@pytest.mark.distributed
def test_two_nodes_on_localhost_train_together(tmp_path):
    """(e) Two torchrun "nodes" (one process each) meet at a rendezvous endpoint, as a
    multi-machine job does; only node 0 writes a run folder."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(dumps_toml(fgsm_raw(tmp_path / "runs")))
    port = free_port()
    args = [str(DRIVER), "run", str(recipe), "--max-steps", "4", "--no-track", "-q"]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                *args,
            ],
            cwd=tmp_path,
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:]
    assert "Test accuracy" in outputs[0][0] and not outputs[1][0].strip()
    payload = ckpt.load(only_run(tmp_path / "runs") / "checkpoint-last.pt", purpose="resume")
    assert payload["world_size"] == 2 and payload["step"] == 4


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_stops_every_rank_at_one_step_and_resume_is_bit_identical(tmp_path):
    """SIGTERM to the launcher: every rank stops after the same step, the run folder gets a
    mid-epoch checkpoint with every rank's RNG, exit 143; ``resume --nproc 2`` then ends with
    the weights of an uninterrupted 2-process run (PGD with random starts: per-rank RNG)."""
    raw = fgsm_raw(tmp_path / "runs", epochs=2, log_every=5)
    raw["perturbation"] = {"use": "pgd", "steps": 3, "random_start": True}
    recipe = tmp_path / "r.toml"
    recipe.write_text(dumps_toml(raw))
    base = [sys.executable, "-m", "artplug"]
    args = ["run", str(recipe), "--nproc", "2", "--no-track", "-q"]
    env = _env(tmp_path)
    launcher = subprocess.Popen(
        [*base, *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    runs = tmp_path / "runs"
    deadline = time.monotonic() + TIMEOUT
    # Wait for training to start (the run folder's metrics), then stop the job.
    while not any(runs.glob("*/metrics.jsonl")) or not any(
        line for path in runs.glob("*/metrics.jsonl") for line in path.read_text().splitlines()
    ):
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode == 143, err[-3000:]
    run = only_run(runs)
    payload = ckpt.load(run / "checkpoint-last.pt", purpose="resume")
    assert payload["world_size"] == 2 and len(payload["rng_ranks"]) == 2
    done = subprocess.run(
        [*base, "resume", str(run), "--nproc", "2", "--no-track", "-q"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    raw["run"]["out_dir"] = str(tmp_path / "ref")
    recipe.write_text(dumps_toml(raw))
    done = subprocess.run(
        [*base, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = ckpt.load(run / "checkpoint-last.pt")["model"]
    reference = ckpt.load(only_run(tmp_path / "ref") / "checkpoint-last.pt")["model"]
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    assert np.isfinite(json.loads((run / "eval.json").read_text())["accuracy"]["clean"])
