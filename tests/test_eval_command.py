"""`artplug eval` on checkpoints, run folders and run ids; what `artplug run` prints."""

from __future__ import annotations

import json
import shutil

import pytest
from clitools import call

from artplug import checkpoint as ckpt
from artplug.recipe import dumps_toml
from artplug.testing import digits_recipe

RUN_ID = "0123456789abcdef0123456789abcdef"


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if not line.startswith("Warning:")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`artplug run` of a 2-epoch digits recipe: (run folder, what it printed)."""
    root = tmp_path_factory.mktemp("eval-command")
    recipe = root / "r.toml"
    raw = digits_recipe(
        run={"name": "evaluated", "epochs": 2, "log_every": 100, "out_dir": str(root / "runs")},
        eval={
            "every_epochs": 1,
            "attacks": ["clean", "pgd-20"],
            "final_attacks": ["clean", "fgsm", "pgd-20"],
            "n_examples": 40,
            "test_examples": 40,
            "eps_curve": [0.0, 0.1],
        },
    )
    recipe.write_text(dumps_toml(raw))
    code, out, err = call(["run", str(recipe), "--no-track", "-q"])
    assert code == 0, err
    (run_dir,) = (root / "runs").iterdir()
    return run_dir, out


def test_run_prints_the_checkpoint_the_gate_and_the_curve(trained):
    run_dir, out = trained
    report = json.loads((run_dir / "eval.json").read_text())
    epoch = report["checkpoint_epoch"]
    assert f"checkpoint: {report['checkpoint']} (epoch {epoch}); " in out
    assert "\nworst " in out  # fgsm and pgd-20: a worst case over two attacks
    assert "Sanity gate: " in out
    for check in report["sanity"]["checks"]:
        assert f"  {check['status'].upper()}" in out and check["name"] in out
    assert "eps curve (pgd-20, linf): 0: " in out and "plot eps_curve.png" in out
    assert (run_dir / "eps_curve.png").is_file()
    assert [eps for eps, _ in report["eps_curve"]["points"]] == [0.0, 0.1]


def test_eval_a_run_folder_uses_its_best_checkpoint(trained):
    run_dir, _ = trained
    best = ckpt.load(run_dir / "checkpoint-best.pt")
    code, out, err = call(
        ["eval", str(run_dir), "--attack", "clean", "--attack", "fgsm", "--attack", "pgd-20"]
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "Test accuracy (linf, eps=0.1; first 40 of 359 test examples, in order)"
    assert [line.split()[0] for line in lines[3:7]] == ["clean", "fgsm", "pgd-20", "worst"]
    assert f"checkpoint: checkpoint-best.pt (epoch {best['epoch']}) from " in out
    assert "not logged to MLflow (the checkpoint has no MLflow run)" in out
    (folder,) = run_dir.glob("eval-*")
    report = json.loads((folder / "eval.json").read_text())
    assert report["checkpoint"] == "checkpoint-best.pt" and report["n_examples"] == 40
    assert set(report["accuracy"]) == {"clean", "fgsm", "pgd-20", "worst"}
    assert report["accuracy"]["worst"] <= min(report["accuracy"].values())
    shutil.rmtree(folder)


def test_eval_a_checkpoint_file_with_options(trained, tmp_path):
    run_dir, _ = trained
    code, out, err = call(
        [
            "eval",
            str(run_dir / "checkpoint-last.pt"),
            "--eps",
            "0",
            "--n",
            "25",
            "--sanity",
            "--curve",
            "0.1,0",
            "--out",
            str(tmp_path / "e"),
            "-q",
        ]
    )
    assert code == 0, err
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert report["checkpoint"] == "checkpoint-last.pt" and report["n_examples"] == 25
    assert report["threat"] == {"norm": "linf", "eps": 0.0}
    accuracy = report["accuracy"]
    assert accuracy["pgd-20"] == accuracy["clean"]  # eps 0: no attack
    assert report["sanity"]["n_examples"] == 25 and len(report["sanity"]["checks"]) == 7
    assert "Sanity gate: " in out and "eps curve (pgd-20, linf): 0: " in out
    assert (tmp_path / "e" / "eps_curve.png").is_file()
    assert f"results in {tmp_path / 'e'}" in out


def test_eval_by_mlflow_run_id_once_tracking_can_download(trained, monkeypatch):
    import artplug.tracking

    run_dir, _ = trained
    seen = {}

    def download_checkpoints(run_id, dest, *, tracking_uri=None):
        seen["run_id"] = run_id
        shutil.copy(run_dir / "checkpoint-best.pt", dest / "checkpoint-best.pt")
        return dest

    monkeypatch.setattr(
        artplug.tracking, "download_checkpoints", download_checkpoints, raising=False
    )
    code, out, err = call(["eval", RUN_ID, "--attack", "clean", "--n", "10", "--no-track", "-q"])
    assert code == 0, err
    assert seen == {"run_id": RUN_ID}
    assert f"from MLflow run {RUN_ID} (checkpoint-best.pt)" in out
    assert "not logged to MLflow (--no-track)" in out and "results in" not in out


def test_eval_logs_to_the_checkpoints_mlflow_run(trained, tmp_path, run_tmp, monkeypatch):
    import mlflow

    from artplug.tracking import MlflowTracker

    # run_tmp: the working directory is tmp_path, where MLflow puts its artifact root.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = MlflowTracker("eval-test", "trained", tracking_uri=uri)
    tracker.start()
    tracker.end("FINISHED")
    run_dir, _ = trained
    payload = ckpt.load(run_dir / "checkpoint-best.pt")
    payload["tracking_run_id"] = tracker.run_id
    ckpt.save_atomic(payload, tmp_path / "tracked" / "checkpoint-best.pt")

    code, out, err = call(
        ["eval", str(tmp_path / "tracked"), "--attack", "fgsm", "--attack", "pgd-20", "-q"]
    )
    assert code == 0, err
    assert f"MLflow run {tracker.run_id}" in out
    client = mlflow.MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert {"eval/fgsm_acc", "eval/pgd-20_acc", "eval/worst_acc"} <= set(run.data.metrics)
    assert (
        run.data.tags["artplug.eval.checkpoint"] == f"checkpoint-best.pt (epoch {payload['epoch']})"
    )
    (evals,) = client.list_artifacts(tracker.run_id, "evals")
    assert [
        a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(tracker.run_id, evals.path)
    ] == ["eval.json"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["missing.pt"], "missing.pt: no such checkpoint file, run folder or MLflow run id"),
        (["NOTES"], "NOTES: not a readable checkpoint"),
        (["EMPTY"], "EMPTY: no checkpoint-best.pt or checkpoint-last.pt in this folder"),
        (["RUN", "--attack", "pgd20"], "--attack pgd20: unknown attack (did you mean 'pgd-20'"),
        (["RUN", "--curve", "0,x"], "--curve: 'x' is not a number"),
        (
            [
                "RUN",
                "--set",
                "model.arch=wide-resnet",
                "--set",
                "model.depth=10",
                "--set",
                "model.width=1",
            ],
            "does not match this recipe's model",
        ),
        ([RUN_ID], f"{RUN_ID}: no such MLflow run"),
    ],
)
def test_eval_errors_are_one_line(trained, tmp_path, args, needle):
    run_dir, _ = trained
    (tmp_path / "NOTES").write_text("not a checkpoint")
    (tmp_path / "EMPTY").mkdir()
    paths = {"NOTES": tmp_path / "NOTES", "EMPTY": tmp_path / "EMPTY", "RUN": run_dir}
    argv = [str(paths.get(a, a)) if a in paths else a for a in args]
    code, _, err = call(["eval", *argv, "--no-track", "-q"])
    lines = errors(err)
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("Error: ") and needle in lines[0], lines[0]
