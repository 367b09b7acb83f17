"""`artplug compare`: hand-made runs in a throw-away SQLite store, read back as exact tables."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from clitools import run_main

from artplug import lab

EPS_8_255 = 8 / 255


def log_run(
    client,
    experiment_id: str,
    name: str,
    params: dict[str, str],
    metrics: dict[str, float],
    tags: dict[str, str] | None = None,
    status: str = "FINISHED",
) -> str:
    """One run as artplug would have logged it (only the keys compare reads)."""
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(experiment_id, run_name=name, tags=tags or {})
    run_id = run.info.run_id
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in (tags or {}).items()],
    )
    client.set_terminated(run_id, status)
    return run_id


def digits_params(**extra: str) -> dict[str, str]:
    params = {
        "run.epochs": "30",
        "data.dataset": "digits",
        "model.arch": "small-cnn",
        "model.depth": "28",
        "model.width": "10",
        "threat.norm": "linf",
        "threat.eps": "0.2",
        "perturbation.use": "pgd",
        "loss.0.use": "cross-entropy",
    }
    params.update(extra)
    return params


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Three runs in experiment 'lab', a sweep of two in 'grid', one run in 'artplug'."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    lab_id = client.create_experiment("lab", artifact_location=str(root / "artifacts"))
    ids = {"uri": uri}
    ids["pgd"] = log_run(
        client,
        lab_id,
        "pgd-at",
        digits_params(),
        {
            "test/clean_acc": 0.99,
            "test/fgsm_acc": 0.84,
            "test/pgd-20_acc": 0.75,
            "test/worst_acc": 0.74,
            "time/wall_s": 120.5,
            "epoch": 30.0,
            "cost/total_forward_per_example": 330.0,
            "cost/total_backward_per_example": 30.0,
        },
        tags={"artplug.techniques": "pgd + cross-entropy"},
    )
    ids["trades"] = log_run(
        client,
        lab_id,
        "trades",
        digits_params(
            **{
                "data.dataset": "cifar10",
                "model.arch": "wide-resnet",
                "model.depth": "34",
                "threat.eps": repr(EPS_8_255),
            }
        ),
        {
            "test/clean_acc": 0.85,
            "test/fgsm_acc": 0.6,
            "test/pgd-20_acc": 0.55,
            "test/worst_acc": 0.53,
            "time/wall_s": 45.3,
            "epoch": 12.0,  # stopped early: shown as 12/30
        },
        tags={"artplug.techniques": "trades-kl + trades"},
        status="KILLED",
    )
    # No techniques tag (rebuilt from params) and a single robust attack: no worst_acc.
    ids["standard"] = log_run(
        client,
        lab_id,
        "standard",
        digits_params(**{"perturbation.use": "none"}),
        {
            "test/clean_acc": 0.997,
            "test/pgd-20_acc": 0.003,
            "time/wall_s": 10.0,
            "cost/total_forward_per_example": 31.0,
            "cost/total_backward_per_example": 30.0,
        },
    )
    grid_id = client.create_experiment("grid", artifact_location=str(root / "artifacts"))
    grid = {"optim.lr": ["0.05", "0.1"]}
    ids["parent"] = log_run(
        client,
        grid_id,
        "quick sweep",
        {},
        {},
        tags={lab.SWEEP_GRID_TAG: json.dumps(grid), lab.SWEEP_SIZE_TAG: "2"},
    )
    for lr, clean, pgd in (("0.05", 0.9, 0.4), ("0.1", 0.8, 0.5)):
        ids[f"child-{lr}"] = log_run(
            client,
            grid_id,
            f"quick optim.lr={lr}",
            digits_params(**{"optim.lr": lr}),
            {"test/clean_acc": clean, "test/pgd-20_acc": pgd},
            tags={
                lab.PARENT_TAG: ids["parent"],
                lab.SWEEP_VALUES_TAG: json.dumps({"optim.lr": lr}),
            },
        )
    default_id = client.create_experiment("artplug", artifact_location=str(root / "artifacts"))
    ids["default"] = log_run(client, default_id, "plain", digits_params(), {"test/clean_acc": 0.5})
    return ids


@pytest.fixture
def in_store(store, tmp_path, monkeypatch):
    """The store as MLFLOW_TRACKING_URI, and a fresh working folder for the chart."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.chdir(tmp_path)
    return store


EXPECTED_LAB_TABLE = """\
name      | techniques          | data/model        | threat     | epochs |  clean |   fgsm | pgd-20 |  worst |  wall | fwd/ex | bwd/ex | status
----------+---------------------+-------------------+------------+--------+--------+--------+--------+--------+-------+--------+--------+---------
pgd-at    | pgd + cross-entropy | digits/small-cnn  | linf 0.2   | 30     | 99.00% | 84.00% | 75.00% | 74.00% |  2.0m |    330 |     30 | FINISHED
trades    | trades-kl + trades  | cifar10/wrn-34-10 | linf 8/255 | 12/30  | 85.00% | 60.00% | 55.00% | 53.00% | 45.3s |      - |      - | KILLED
standard* | cross-entropy       | digits/small-cnn  | linf 0.2   | 30     | 99.70% |      - |  0.30% |      - | 10.0s |     31 |     30 | FINISHED"""  # noqa: E501


def test_table_rows_sort_order_and_notes(in_store, tmp_path, capsys):
    code, out, err = run_main(["compare", "lab"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"experiment 'lab': 3 runs at {in_store['uri']}"
    # Two runs have worst_acc, the third is sorted by its lowest column and marked.
    assert "test/worst_acc where logged" in lines[1] and "marked *" in lines[1]
    assert "\n".join(lines[2:7]) == EXPECTED_LAB_TABLE
    chart = tmp_path / "compare-lab.png"
    assert lines[7] == f"chart: {chart.name}"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_format(in_store, capsys):
    code, out, err = run_main(["compare", "lab", "--format", "markdown", "--no-chart"], capsys)
    assert code == 0, err
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0] == (
        "| name | techniques | data/model | threat | epochs | clean | fgsm | pgd-20 | worst | "
        "wall | fwd/ex | bwd/ex | status |"
    )
    assert table[1] == "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
    assert table[2] == (
        "| pgd-at | pgd + cross-entropy | digits/small-cnn | linf 0.2 | 30 | 99.00% | 84.00% | "
        "75.00% | 74.00% | 2.0m | 330 | 30 | FINISHED |"
    )
    assert [row.split(" | ")[0] for row in table[2:]] == ["| pgd-at", "| trades", "| standard*"]
    assert not list(Path.cwd().glob("*.png"))


def test_csv_format_is_machine_readable(in_store, capsys):
    code, out, err = run_main(["compare", "lab", "--format", "csv", "--no-chart"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))  # stdout holds the CSV only
    assert [r["name"] for r in rows] == ["pgd-at", "trades", "standard"]
    first, second, third = rows
    assert first["run_id"] == in_store["pgd"]
    assert float(first["clean_acc"]) == 0.99 and float(first["pgd-20_acc"]) == 0.75
    assert first["robust_acc"] == "0.74" and first["robust_from"] == "worst"
    assert float(first["forward_per_example"]) == 330.0 and first["train_s"] == ""
    assert second["threat"] == "linf 8/255" and second["status"] == "KILLED"
    assert second["forward_per_example"] == "" and second["epochs"] == "12/30"
    assert third["robust_acc"] == "0.003" and third["robust_from"] == "pgd-20"
    assert third["worst_acc"] == "" and third["fgsm_acc"] == ""
    assert "sorted by robust accuracy" in err


def test_only_worst_or_only_columns_say_so():
    def row(name: str, worst: float | None, robust: dict[str, float]) -> lab.RunRow:
        return lab.RunRow(
            name, name, "FINISHED", "t", "d", "m", "linf 0.1", "1", 0.9, robust, worst
        )

    only_worst = lab.Comparison("t", [row("a", 0.2, {"fgsm": 0.3, "pgd-20": 0.25})])
    assert "test/worst_acc (an example counts only" in only_worst.sort_note()
    columns = lab.Comparison("t", [row("b", None, {"fgsm": 0.3, "pgd-20": 0.25})])
    assert columns.sort_note().endswith("each run's lowest robust accuracy column")
    assert columns.rows[0].score == (0.25, "pgd-20")
    clean_only = lab.Comparison("t", [row("c", None, {})])
    assert clean_only.sort_note().startswith("no run has a robust test accuracy")


def test_sort_puts_unscored_runs_last_and_breaks_ties_by_clean():
    def row(name: str, clean: float | None, pgd: float | None) -> lab.RunRow:
        robust = {} if pgd is None else {"pgd-20": pgd}
        return lab.RunRow(name, name, "FINISHED", "t", "d", "m", "x", "1", clean, robust)

    rows = [row("none", 0.99, None), row("low", 0.9, 0.1), row("tie-a", 0.5, 0.4)]
    rows.append(row("tie-b", 0.7, 0.4))
    assert [r.name for r in lab.sort_rows(rows)] == ["tie-b", "tie-a", "low", "none"]


@pytest.mark.parametrize(
    ("eps", "text"),
    [(0.2, "0.2"), (8 / 255, "8/255"), (2 / 255, "2/255"), (0.5, "0.5"), (0.0312, "0.0312")],
)
def test_format_eps(eps, text):
    assert lab.format_eps(eps) == text


def test_sweep_parent_shows_the_grid(in_store, tmp_path, capsys):
    code, out, err = run_main(["compare", in_store["parent"]], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"sweep 'quick sweep' ({in_store['parent']}, FINISHED): 2 of 2")
    header = [cell.strip() for cell in lines[2].split("|")]
    assert header[:7] == [
        "name",
        "techniques",
        "data/model",
        "threat",
        "epochs",
        "optim.lr",
        "clean",
    ]
    first, second = ([cell.strip() for cell in line.split("|")] for line in lines[4:6])
    # Sorted by the lowest robust column (no worst_acc): lr 0.1 (50 %) before lr 0.05 (40 %).
    assert first[0] == "quick optim.lr=0.1" and first[5] == "0.1" and first[7] == "50.00%"
    assert second[0] == "quick optim.lr=0.05" and second[5] == "0.05"
    charts = list(tmp_path.glob("compare-sweep-quick-sweep-*.png"))
    assert len(charts) == 1
    # --parent says the same.
    code, again, _ = run_main(["compare", "--parent", in_store["parent"], "--no-chart"], capsys)
    assert code == 0 and again.splitlines()[:6] == lines[:6]


def test_experiment_listing_hides_sweep_parents(in_store, capsys):
    code, out, err = run_main(["compare", "grid", "--no-chart"], capsys)
    assert code == 0, err
    assert "experiment 'grid': 2 runs" in out
    assert "1 sweep parent run(s) not shown" in out and "quick sweep" not in out


def test_default_experiment_is_the_one_plain_runs_use(in_store, capsys):
    assert lab.default_experiment() == "artplug"
    code, out, err = run_main(["compare", "--no-chart"], capsys)
    assert code == 0, err
    assert out.startswith("experiment 'artplug': 1 run") and "plain" in out
    # No robust accuracy anywhere: no chart, and it says so.
    code, out, _ = run_main(["compare"], capsys)
    assert code == 0 and "no chart: no run has both" in out


def test_chosen_runs_and_chart_path(in_store, tmp_path, capsys):
    chart = tmp_path / "out" / "mine.png"
    args = [
        "compare",
        "--run",
        in_store["standard"],
        "--run",
        in_store["pgd"],
        "--chart",
        str(chart),
    ]
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    names = [line.split("|")[0].strip() for line in out.splitlines()[4:]]
    assert names[:2] == ["pgd-at", "standard*"]
    assert f"chart: {chart}" in out and chart.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["compare", "no-such-experiment"],
            "MLflow experiment 'no-such-experiment' does not exist",
        ),
        (["compare", "--run", "0" * 32], f"no MLflow run {'0' * 32}"),
        (["compare", "--run", "abc"], "'abc' is not an MLflow run id"),
        (["compare", "--parent", "PGD"], "not an MLflow run id"),
    ],
)
def test_unknown_experiment_or_run_is_one_line_exit_2(in_store, capsys, args, needle):
    code, _, err = run_main(args, capsys)
    lines = [line for line in err.splitlines() if not line.startswith("Warning:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), err
    assert needle in lines[0]


def test_plain_run_is_not_a_sweep_parent(in_store, capsys):
    code, _, err = run_main(["compare", "--parent", in_store["pgd"]], capsys)
    assert code == 2 and "is not a sweep's parent run" in err


def test_missing_local_store_is_not_created(tmp_path, monkeypatch, capsys):
    store = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    code, _, err = run_main(["compare"], capsys)
    assert code == 2 and "no MLflow store at" in err and not store.exists()
