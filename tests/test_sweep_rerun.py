"""`artplug sweep` (a parent run with nested children) and `artplug rerun`, on tiny digits runs."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
from clitools import run_main

from artplug import lab
from artplug.errors import ArtplugError
from artplug.recipe import dumps_toml
from artplug.testing import digits_recipe

# Two optimizer steps per run, 16 test examples, clean and FGSM: about a second each.
FAST_EVAL = {
    "every_epochs": 0,
    "attacks": ["clean"],
    "final_attacks": ["clean", "fgsm"],
    "test_examples": 16,
    "sanity": False,
}


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module: creating its tables takes seconds on a small machine."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('lab')}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creates the tables now, once
    return uri


@pytest.fixture
def tracked(
    store_uri: str, run_tmp: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> tuple[str, Path, str]:
    """The store as MLFLOW_TRACKING_URI, a tracked digits recipe in run_tmp, its experiment."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    experiment = request.node.name  # one experiment per test keeps their runs apart
    recipe = run_tmp / "tiny.toml"
    raw = digits_recipe(
        run={"name": "tiny", "epochs": 1, "seed": 0, "log_every": 1},
        eval=FAST_EVAL,
        tracking={"backend": "mlflow", "experiment": experiment},
    )
    recipe.write_text(dumps_toml(raw))
    return store_uri, recipe, experiment


def runs_of(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def recipe_artifact(uri: str, run_id: str, dest: Path) -> dict:
    from mlflow import MlflowClient

    path = MlflowClient(uri).download_artifacts(run_id, lab.RECIPE_ARTIFACT, str(dest))
    return tomllib.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------
# Grid parsing


def test_split_values_respects_brackets_and_quotes():
    assert lab.split_values("0.05, 0.1") == ["0.05", "0.1"]
    assert lab.split_values('["clean","fgsm"],["clean"]') == ['["clean","fgsm"]', '["clean"]']
    assert lab.split_values('{use="pgd",steps=3},{use="fgsm"}') == [
        '{use="pgd",steps=3}',
        '{use="fgsm"}',
    ]
    assert lab.split_values('"a,b",c') == ['"a,b"', "c"]
    assert lab.split_values(r'"say \"x,y\"",z') == [r'"say \"x,y\""', "z"]
    assert lab.split_values("'lit\\',x") == ["'lit\\'", "x"]  # no escapes in literal strings
    for bad in ("[1,2", "1]", '"open'):
        with pytest.raises(ValueError):
            lab.split_values(bad)


def test_parse_grid_and_combinations():
    grid = lab.parse_grid(["optim.lr=0.05,0.1", "loss[0].label_smoothing=0,0.1,0.2"])
    assert grid == {"optim.lr": ["0.05", "0.1"], "loss.0.label_smoothing": ["0", "0.1", "0.2"]}
    combos = lab.combinations(grid)
    assert len(combos) == 6
    assert combos[0] == {"optim.lr": "0.05", "loss.0.label_smoothing": "0"}
    assert combos[1] == {"optim.lr": "0.05", "loss.0.label_smoothing": "0.1"}
    assert combos[-1] == {"optim.lr": "0.1", "loss.0.label_smoothing": "0.2"}
    assert lab.combination_label(combos[1]) == "optim.lr=0.05 loss.0.label_smoothing=0.1"
    assert lab.combination_overrides(combos[1]) == ["optim.lr=0.05", "loss.0.label_smoothing=0.1"]


@pytest.mark.parametrize(
    ("specs", "needle"),
    [
        (["optim.lr"], "expected KEY=V1,V2"),
        (["optim.lr=0.1,"], "empty value"),
        (["optim.lr=0.1", "optim.lr=0.2"], "already a grid key"),
        (["optim.lr=0.1,0.1"], "given twice: 0.1"),
        (["tracking.experiment=a,b"], "tracking.* cannot vary"),
        (["eval.attacks=[1,2"], "unclosed bracket"),
        ([], "at least one --grid"),
    ],
)
def test_parse_grid_errors(specs, needle):
    with pytest.raises(ArtplugError) as info:
        lab.parse_grid(specs)
    assert needle in str(info.value)


# ------------------------------------------------------------------------------------------
# Sweeps


def test_sweep_makes_a_parent_with_one_nested_child_per_combination(tracked, capsys):
    uri, recipe, experiment = tracked
    args = ["sweep", str(recipe), "--grid", "optim.lr=0.05,0.1", "--max-steps", "2", "-q"]
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    runs = runs_of(uri, experiment)
    (parent,) = [r for r in runs if lab.SWEEP_GRID_TAG in r.data.tags]
    children = [r for r in runs if r.data.tags.get(lab.PARENT_TAG) == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny sweep"
    assert json.loads(parent.data.tags[lab.SWEEP_GRID_TAG]) == {"optim.lr": ["0.05", "0.1"]}
    assert parent.data.tags[lab.SWEEP_SIZE_TAG] == "2"
    assert parent.data.metrics == {"sweep/finished": 2.0, "sweep/failed": 0.0}
    by_lr = {c.data.params["optim.lr"]: c for c in children}
    assert sorted(by_lr) == ["0.05", "0.1"]
    for lr, child in by_lr.items():
        assert child.info.status == "FINISHED"
        assert child.info.run_name == f"tiny optim.lr={lr}"
        assert json.loads(child.data.tags[lab.SWEEP_VALUES_TAG]) == {"optim.lr": lr}
        assert "test/clean_acc" in child.data.metrics
    assert by_lr["0.05"].data.tags[lab.SWEEP_INDEX_TAG] == "1/2"
    from mlflow import MlflowClient

    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id, "sweep")}
    assert artifacts == {
        "sweep/tiny.toml",
        "sweep/sweep.json",
        "sweep/compare.md",
        "sweep/compare.png",
    }
    # The final table is the grid's comparison; what the runs share is said above it.
    tail = out[out.index(f"sweep 'tiny sweep' ({parent.info.run_id}") :].splitlines()
    assert tail[2].startswith("same for all runs: techniques=pgd + cross-entropy, ")
    header = [cell.strip() for cell in tail[3].split("|")]
    assert header[:3] == ["name", "optim.lr", "clean"]
    # One line per finished run, with the count so far and the time left (a serial sweep too).
    done = [line for line in out.splitlines() if line.startswith("[") and " done" in line]
    assert len(done) == 2
    assert done[0].startswith("[1/2 done] optim.lr=0.05: FINISHED in 0:")
    assert "; ETA 0:" in done[0]
    assert done[1].startswith("[2/2 done] optim.lr=0.1: FINISHED")
    assert done[1].endswith("; sweep done")


def test_sweep_validates_every_combination_before_training(tracked, capsys):
    uri, recipe, experiment = tracked
    base = ["sweep", str(recipe), "--max-steps", "2", "-q"]
    code, _, err = run_main([*base, "--grid", "optim.lrr=0.1,0.2"], capsys)
    lines = [line for line in err.splitlines() if not line.startswith("Warning:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), err
    # A misspelt key is reported once, not once per combination.
    assert lines[0].count("optim.lrr") == 1 and "optim.lrr: unknown key" in lines[0]
    code, _, err = run_main([*base, "--grid", "optim.lr=0.1,oops,0.2"], capsys)
    assert code == 2 and "[optim.lr=oops] optim.lr:" in err and "[optim.lr=0.1]" not in err
    code, _, err = run_main(
        [*base, "--grid", "optim.lr=0.1", "--set", 'tracking.backend="none"'], capsys
    )
    assert code == 2 and "tracking.backend is 'none'" in err
    assert runs_of(uri, experiment) == []  # nothing was trained or even recorded


def test_failing_child_is_recorded_and_the_sweep_goes_on(tracked, capsys, tmp_path):
    uri, recipe, experiment = tracked
    empty = tmp_path / "no-data"
    empty.mkdir()
    args = ["sweep", str(recipe), "--grid", "data.dataset=cifar10,digits"]
    args += ["--set", f'data.root="{empty}"', "--max-steps", "2", "-q"]
    code, out, err = run_main(args, capsys)
    assert code == 1, err
    assert "run 1/2 (data.dataset=cifar10) failed:" in err and "1 of 2 runs failed" in err
    runs = runs_of(uri, experiment)
    (parent,) = [r for r in runs if lab.SWEEP_GRID_TAG in r.data.tags]
    children = {r.data.params["data.dataset"]: r for r in runs if r is not parent}
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics == {"sweep/finished": 1.0, "sweep/failed": 1.0}
    failed = children["cifar10"]
    assert failed.info.status == "FAILED" and failed.data.tags[lab.PARENT_TAG] == parent.info.run_id
    assert "cifar10" in failed.data.tags[lab.ERROR_TAG]
    assert children["digits"].info.status == "FINISHED"
    assert "FAILED" in out  # the final table has a status column


def test_ctrl_c_ends_the_parent_as_killed_and_keeps_finished_runs(tracked, capsys, monkeypatch):
    uri, recipe, experiment = tracked
    from artplug import engine

    real_fit = engine.fit
    calls = []

    def fit_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(engine, "fit", fit_then_interrupt)
    args = ["sweep", str(recipe), "--grid", "run.seed=0,1,2", "--max-steps", "2", "-q"]
    code, _, err = run_main(args, capsys)
    assert code == 130 and "sweep interrupted at run 2 of 3" in err
    runs = runs_of(uri, experiment)
    (parent,) = [r for r in runs if lab.SWEEP_GRID_TAG in r.data.tags]
    children = {r.data.params["run.seed"]: r.info.status for r in runs if r is not parent}
    assert parent.info.status == "KILLED"
    assert children == {"0": "FINISHED", "1": "KILLED"}  # the third never started


# ------------------------------------------------------------------------------------------
# Re-runs


def test_rerun_links_to_the_original_and_applies_overrides(tracked, capsys, tmp_path):
    uri, recipe, experiment = tracked
    code, _, err = run_main(["run", str(recipe), "--max-steps", "2", "-q"], capsys)
    assert code == 0, err
    # rerun finds the run through MLFLOW_TRACKING_URI: the run must leave it as it found it.
    assert os.environ.get("MLFLOW_TRACKING_URI") == uri, "artplug run changed MLFLOW_TRACKING_URI"
    (original,) = runs_of(uri, experiment)
    run_id = original.info.run_id
    code, out, err = run_main(
        ["rerun", run_id, "--set", "optim.lr=0.02", "--max-steps", "2", "-q"], capsys
    )
    assert code == 0, err
    (again,) = [r for r in runs_of(uri, experiment) if r.info.run_id != run_id]
    assert again.data.tags[lab.RERUN_TAG] == run_id
    # Named after what changed, not a copy of the original's name.
    assert original.info.run_name == "tiny" and again.info.run_name == "tiny optim.lr=0.02"
    assert json.loads(again.data.tags[lab.RERUN_OVERRIDES_TAG]) == ["optim.lr=0.02"]
    note = again.data.tags[lab.NOTE_TAG]
    assert run_id in note and "--set optim.lr=0.02" in note
    assert again.data.params["optim.lr"] == "0.02" and original.data.params["optim.lr"] == "0.05"
    assert again.data.tags["artplug.recipe"] == f"MLflow run {run_id} (recipe.resolved.toml)"
    before = recipe_artifact(uri, run_id, tmp_path / "a")
    after = recipe_artifact(uri, again.info.run_id, tmp_path / "b")
    assert after["optim"].pop("lr") == 0.02 and before["optim"].pop("lr") == 0.05
    assert after["run"].pop("name") == "tiny optim.lr=0.02" and before["run"].pop("name") == "tiny"
    assert after == before  # everything else identical
    assert again.info.run_id in out


def test_rerun_name_holds_the_actual_values():
    values = {"optim.lr": "0.02", "run.seed": "1", "loss.0.beta": "6.0", "run.name": "mine"}
    # The value the new recipe has, not the text given.
    assert lab.rerun_name("pgd-at", ["optim.lr=0.020"], values) == "pgd-at optim.lr=0.02"
    # loss[0].beta and loss.0.beta are one key; several keys in the order given.
    assert (
        lab.rerun_name("trades", ["loss[0].beta=6", "run.seed=1"], values)
        == "trades loss.0.beta=6.0 run.seed=1"
    )
    # A sweep's run (or an earlier re-run) gets its part replaced, not repeated.
    assert (
        lab.rerun_name("tiny optim.lr=0.05 run.seed=0", ["optim.lr=0.02"], values)
        == "tiny run.seed=0 optim.lr=0.02"
    )
    # Keys that do not change the results are not in the name; run.name wins.
    assert lab.rerun_name("pgd-at", ["run.threads=1", "tracking.uri='x'"], values) == "pgd-at"
    assert lab.rerun_name("pgd-at", ["optim.lr=0.02", 'run.name="mine"'], values) == "mine"
    # A whole table has no flattened value: its text, without spaces.
    assert (
        lab.rerun_name("a", ['perturbation={use = "fgsm"}'], values)
        == 'a perturbation={use="fgsm"}'
    )


def test_rerun_errors_are_one_line_exit_2(tracked, capsys):
    uri, _, _ = tracked
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    bare = client.create_run(client.create_experiment("bare")).info.run_id
    cases = [
        ("0" * 32, f"no MLflow run {'0' * 32}"),
        ("not-an-id", "is not an MLflow run id"),
        (bare, f"run {bare} has no recipe.resolved.toml artifact"),
    ]
    for run_id, needle in cases:
        code, _, err = run_main(["rerun", run_id], capsys)
        lines = [line for line in err.splitlines() if not line.startswith("Warning:")]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), err
        assert needle in lines[0]
