"""The lab commands come from the built-in plugin ``lab_commands``; ``artplug sweep --jobs N``."""

from __future__ import annotations

import json
from pathlib import Path

from artplug_plugins import lab_commands
from click.testing import CliRunner
from clitools import run_main

from artplug import lab
from artplug.cli import make_cli
from artplug.plugins import load_plugins
from artplug.recipe import dumps_toml
from artplug.testing import digits_recipe

LAB = ("compare", "sweep", "rerun")


# ------------------------------------------------------------------------------------------
# The commands come through register_commands


def test_lab_commands_come_through_the_hook(plugin_set):
    assert plugin_set.plugins["lab_commands"].builtin
    with_lab = make_cli(plugin_set)
    assert set(LAB) <= set(with_lab.commands)
    without = make_cli(load_plugins(disabled=("lab_commands",)))
    assert not set(LAB) & set(without.commands)
    assert {"run", "eval", "validate"} <= set(without.commands)  # the core keeps its own
    # The hook is what adds them: a group built without calling it has none of them.
    implementation = plugin_set.pm.get_plugin("lab_commands")
    assert implementation is lab_commands


def test_help_lists_the_lab_commands_and_blocking_removes_them(capsys, monkeypatch):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert set(LAB) <= listed
    monkeypatch.setenv("ARTPLUG_DISABLE_PLUGINS", "lab_commands")
    code, out, _ = run_main(["--help"], capsys)
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert code == 0 and not set(LAB) & listed
    code, _, err = run_main(["compare"], capsys)
    assert code == 2 and "No such command 'compare'" in err


def test_sweep_help_keeps_its_options(plugin_set):
    text = CliRunner().invoke(make_cli(plugin_set), ["sweep", "--help"]).output
    for option in ("--grid", "--set", "--quiet", "--max-steps", "--jobs"):
        assert option in text


def test_bad_tag_is_a_one_line_error(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(dumps_toml(digits_recipe()))
    code, _, err = run_main(["run", str(recipe), "--tag", "no-equals-sign"], capsys)
    assert code == 2 and "Error: --tag 'no-equals-sign': expected KEY=VALUE" in err


# ------------------------------------------------------------------------------------------
# --jobs: placement, progress lines, child commands


def test_placement_divides_cores_and_deals_gpus_round_robin(monkeypatch):
    monkeypatch.setattr(lab_commands, "_cores", lambda: 16)
    monkeypatch.setattr(lab_commands, "_visible_gpus", lambda: [])
    cpu = lab_commands._Placement.detect(3, "auto", 0)
    assert cpu.threads == 5 and cpu.env(0) == {} and "on CPU, 5 threads each" in cpu.describe()
    assert lab_commands._Placement.detect(32, "auto", 0).threads == 1  # never 0
    assert lab_commands._Placement.detect(3, "auto", 2).threads == 2  # the recipe's own wins
    monkeypatch.setattr(lab_commands, "_visible_gpus", lambda: ["4", "7"])
    gpu = lab_commands._Placement.detect(3, "auto", 0)
    assert [gpu.env(slot)["CUDA_VISIBLE_DEVICES"] for slot in range(3)] == ["4", "7", "4"]
    assert "2 GPUs round-robin" in gpu.describe()
    # A recipe that names its device is not renumbered.
    assert lab_commands._Placement.detect(2, "cpu", 0).gpus == ()
    assert lab_commands._Placement.detect(2, "cuda:1", 0).gpus == ()


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert lab_commands._visible_gpus() == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert lab_commands._visible_gpus() == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lab_commands._visible_gpus() == []


def test_progress_line_counts_and_estimates(monkeypatch):
    clock = iter([130.0, 160.0])
    monkeypatch.setattr(lab_commands.time, "monotonic", lambda: next(clock))
    progress = lab_commands._Progress(4, started=100.0)
    child = lab_commands._Child(1, 4, {"optim.lr": "0.1"}, "optim.lr=0.1", [], seconds=29.6)
    child.status, child.run_id = "FINISHED", "0123456789abcdef" * 2
    # 30 s for one of 4: three left at 30 s each.
    assert progress.finished(child) == (
        "[1/4 done] optim.lr=0.1: FINISHED in 0:30 (run 01234567); ETA 1:30"
    )
    child.status, child.run_id = "FAILED", None
    # 60 s for two: two left at 30 s each.
    assert progress.finished(child).startswith("[2/4 done, 1 failed] optim.lr=0.1: FAILED")
    assert lab_commands._clock(3723) == "1:02:03"


def test_child_command_nests_the_run_under_the_parent():
    class Parent:
        tracking_uri = "http://mlflow:5000"
        run_id = "f" * 32

    child = lab_commands._Child(2, 3, {"optim.lr": "0.1"}, "optim.lr=0.1", ["optim.lr=0.1"])
    command = lab_commands._child_command("r.toml", child, Parent(), 4, True, 2)
    assert command[1:5] == ["-m", "artplug", "run", "r.toml"]
    text = " ".join(command)
    assert "--set optim.lr=0.1" in text and "--threads 4" in text and "--max-steps 2" in text
    assert f"--parent-run {'f' * 32}" in text and "--tracking-uri http://mlflow:5000" in text
    assert f"--tag {lab.SWEEP_INDEX_TAG}=2/3" in text
    assert f'--tag {lab.SWEEP_VALUES_TAG}={{"optim.lr": "0.1"}}' in text


def test_a_child_killed_by_the_os_gets_its_run_closed_as_failed(tmp_path):
    from types import SimpleNamespace

    calls = []

    class Client:
        def search_runs(self, experiments, filter_string, max_results):
            calls.append(("search", experiments, filter_string))
            info = SimpleNamespace(run_id="r" * 32, status="RUNNING")
            return [SimpleNamespace(info=info)]

        def set_tag(self, run_id, key, value):
            calls.append(("tag", key, value))

        def set_terminated(self, run_id, status):
            calls.append(("end", status))

    log = tmp_path / "1.log"
    log.write_text("# python -m artplug run ...\nepoch 1 step 3\n")
    parent = SimpleNamespace(experiment_id="7", run_id="p" * 32)
    child = lab_commands._Child(1, 2, {"optim.lr": "0.1"}, "optim.lr=0.1", [])
    lab_commands._finish(child, -9, log, Client(), parent)  # SIGKILL (out of memory)
    assert child.status == "FAILED" and child.run_id == "r" * 32
    assert child.error == "epoch 1 step 3"  # no Error: line: the log's last line
    assert calls[0][1] == ["7"] and f"= '{'p' * 32}'" in calls[0][2] and "'1/2'" in calls[0][2]
    assert calls[1:] == [("tag", lab.ERROR_TAG, "epoch 1 step 3"), ("end", "FAILED")]
    log.write_text("x\nError: data.root: not found\n")
    lab_commands._finish(child, 2, log, Client(), parent)
    assert child.error == "data.root: not found"
    killed = lab_commands._Child(2, 2, {}, "", [])
    lab_commands._finish(killed, 143, log, Client(), parent)
    assert killed.status == "KILLED" and calls[-1] == ("end", "KILLED")


# ------------------------------------------------------------------------------------------
# A real --jobs 2 sweep with one failing child


def test_parallel_sweep_keeps_the_records_of_a_serial_one(run_tmp, capsys, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{run_tmp / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    recipe = run_tmp / "tiny.toml"
    raw = digits_recipe(
        run={"name": "tiny", "epochs": 1, "seed": 0, "log_every": 1, "threads": 1},
        eval={"every_epochs": 0, "attacks": ["clean"], "final_attacks": ["clean"]}
        | {"test_examples": 16, "sanity": False},
        tracking={"backend": "mlflow", "experiment": "jobs"},
    )
    recipe.write_text(dumps_toml(raw))
    empty = run_tmp / "no-data"
    empty.mkdir()
    args = ["sweep", str(recipe), "--grid", "data.dataset=cifar10,digits", "--jobs", "2"]
    args += ["--set", f'data.root="{empty}"', "--max-steps", "2", "-q"]
    code, out, err = run_main(args, capsys)
    assert code == 1, err
    assert "2 child processes on CPU, 1 threads each" in out
    assert "run 1/2 (data.dataset=cifar10) failed: cifar10 not found" in err
    assert "1 of 2 runs failed" in err
    assert "[2/2 done, 1 failed]" in out and "sweep done" in out  # one line per child
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("jobs").experiment_id])
    (parent,) = [r for r in runs if lab.SWEEP_GRID_TAG in r.data.tags]
    children = {r.data.params["data.dataset"]: r for r in runs if r is not parent}
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics == {"sweep/finished": 1.0, "sweep/failed": 1.0}
    failed, done = children["cifar10"], children["digits"]
    assert failed.info.status == "FAILED" and "cifar10" in failed.data.tags[lab.ERROR_TAG]
    assert done.info.status == "FINISHED" and "test/clean_acc" in done.data.metrics
    for child, index in ((failed, "1/2"), (done, "2/2")):
        assert child.data.tags[lab.PARENT_TAG] == parent.info.run_id
        assert child.data.tags[lab.SWEEP_INDEX_TAG] == index
    assert done.info.run_name == "tiny data.dataset=digits"
    assert json.loads(done.data.tags[lab.SWEEP_VALUES_TAG]) == {"data.dataset": "digits"}
    assert done.data.params["run.threads"] == "1"
    # The finished child's run folder, and the sweep's records on the parent.
    folders = [p for p in (run_tmp / "runs").iterdir() if not p.name.startswith("sweep-")]
    assert [p.name.startswith("tiny-data.dataset-digits") for p in folders] == [True]
    assert (folders[0] / "eval.json").is_file()
    artifacts = client.list_artifacts(parent.info.run_id, "sweep")
    assert {a.path for a in artifacts} >= {"sweep/sweep.json", "sweep/compare.md", "sweep/logs"}
    logs = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep/logs")}
    assert logs == {"sweep/logs/1.log", "sweep/logs/2.log"}
    summary = Path(client.download_artifacts(parent.info.run_id, "sweep/sweep.json", str(run_tmp)))
    entries = json.loads(summary.read_text())["runs"]
    assert {e["run_id"] for e in entries} == {failed.info.run_id, done.info.run_id}
    assert "FAILED" in out and "FINISHED" in out  # the final table
