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


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The expected tables below are the full layout: a terminal wide enough not to cut it
    (test_plain_table_fits_the_width_by_cutting_long_text_cells checks the cutting)."""
    monkeypatch.setenv("COLUMNS", "250")


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
    # The sanity gate's verdicts, as artplug logs them (tags), and from the metric alone.
    gated_id = client.create_experiment("gated", artifact_location=str(root / "artifacts"))
    for name, clean, pgd, tags, metrics in (
        ("masked", 0.95, 0.9, {"artplug.sanity": "FAILED: black_box_vs_white_box, large_eps"}, {}),
        ("honest", 0.9, 0.5, {"artplug.sanity": "passed"}, {"sanity/passed": 1.0}),
        ("ungated", 0.92, 0.4, {}, {}),
        ("legacy", 0.93, 0.7, {"sanity.large_eps": "fail"}, {"sanity/passed": 0.0}),
    ):
        ids[name] = log_run(
            client,
            gated_id,
            name,
            digits_params(),
            {"test/clean_acc": clean, "test/pgd-20_acc": pgd, **metrics},
            tags={"artplug.techniques": "pgd + cross-entropy", **tags},
        )
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
    # No run has a sanity gate: the column is the same for all, said once above the table.
    assert lines[2] == "same for all runs: gate=not run"
    assert "\n".join(lines[3:8]) == EXPECTED_LAB_TABLE
    chart = tmp_path / "compare-lab.png"
    assert lines[8] == f"chart: {chart.name}"
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
    # The two runs share everything but the grid value: said once, not in every row.
    assert lines[2] == (
        "same for all runs: techniques=pgd + cross-entropy, data/model=digits/small-cnn, "
        "threat=linf 0.2, epochs=30, gate=not run"
    )
    header = [cell.strip() for cell in lines[3].split("|")]
    assert header == ["name", "optim.lr", "clean", "pgd-20"]
    first, second = ([cell.strip() for cell in line.split("|")] for line in lines[5:7])
    # Sorted by the lowest robust column (no worst_acc): lr 0.1 (50 %) before lr 0.05 (40 %).
    assert first[0] == "quick optim.lr=0.1" and first[1] == "0.1" and first[3] == "50.00%"
    assert second[0] == "quick optim.lr=0.05" and second[1] == "0.05"
    charts = list(tmp_path.glob("compare-sweep-quick-sweep-*.png"))
    assert len(charts) == 1
    # --parent says the same.
    code, again, _ = run_main(["compare", "--parent", in_store["parent"], "--no-chart"], capsys)
    assert code == 0 and again.splitlines()[:7] == lines[:7]


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
    names = [line.split("|")[0].strip() for line in out.splitlines()[5:]]
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


# ------------------------------------------------------------------------------------------
# The sanity gate's verdict


GATED_NOTE = (
    "2 runs failed the sanity gate and are ranked last: their robust accuracy may be "
    "overstated (gradient masking)"
)


def table_cells(out: str, header: str) -> list[list[str]]:
    """The rows of the text table in ``out`` that starts with ``header``, as stripped cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if " | " not in line:
            break
        rows.append([cell.strip() for cell in line.split("|")])
    return rows


def test_gate_column_ranks_failed_runs_last_and_says_why(in_store, capsys):
    code, out, err = run_main(["compare", "gated", "--no-chart"], capsys)
    assert code == 0, err
    assert "same for all runs: techniques=pgd + cross-entropy, data/model=digits/small-cnn" in out
    rows = table_cells(out, "name ")
    assert [(row[0], row[-1]) for row in rows] == [
        ("honest", "passed"),
        ("ungated", "not run"),
        ("masked", "FAILED: black_box_vs_white_box, large_eps"),
        ("legacy", "FAILED: large_eps"),  # from sanity/passed and the sanity.<check> tags
    ]
    assert out.splitlines()[-1] == GATED_NOTE
    # --rank accuracy: the accuracy alone; the failures are still marked and noted.
    code, out, err = run_main(["compare", "gated", "--no-chart", "--rank", "accuracy"], capsys)
    assert code == 0, err
    rows = table_cells(out, "name ")
    assert [row[0] for row in rows] == ["masked", "legacy", "honest", "ungated"]
    assert out.splitlines()[-1] == (
        "2 runs failed the sanity gate (gate column): their robust accuracy may be overstated "
        "(gradient masking)"
    )


def test_gate_in_markdown_and_csv(in_store, capsys):
    code, out, err = run_main(["compare", "gated", "--format", "markdown", "--no-chart"], capsys)
    assert code == 0, err
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0] == "| name | clean | pgd-20 | gate |"
    assert table[-1] == "| legacy | 93.00% | 70.00% | FAILED: large_eps |"
    assert out.splitlines()[-1] == GATED_NOTE
    code, out, err = run_main(["compare", "gated", "--format", "csv", "--no-chart"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))  # every column, the note on stderr
    assert [(r["name"], r["gate"]) for r in rows] == [
        ("honest", "passed"),
        ("ungated", "not run"),
        ("masked", "FAILED: black_box_vs_white_box, large_eps"),
        ("legacy", "FAILED: large_eps"),
    ]
    assert {r["techniques"] for r in rows} == {"pgd + cross-entropy"}
    assert {r["experiment"] for r in rows} == {"gated"}
    assert GATED_NOTE in err and "same for all runs" not in err + out


def test_chart_marks_the_runs_that_failed_the_gate(in_store):
    from matplotlib.colors import to_rgba

    client, uri = lab.open_store(in_store["uri"])
    figure = lab.chart_figure(lab.collect(client, uri, "gated"))
    (axes,) = figure.axes
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend == ["passed the sanity gate", "sanity gate not run", "FAILED the sanity gate"]
    colours = [tuple(points.get_facecolor()[0]) for points in axes.collections]
    # honest, ungated, masked, legacy: in the table's order.
    assert colours == [to_rgba(c) for c in ("tab:blue", "tab:gray", "tab:red", "tab:red")]
    # Without any gate there is nothing to tell apart: no legend.
    plain = lab.chart_figure(lab.collect(client, uri, "lab"))
    assert plain.axes[0].get_legend() is None


@pytest.mark.parametrize(
    ("tags", "metrics", "gate"),
    [
        ({"artplug.sanity": "passed"}, {}, "passed"),
        ({"artplug.sanity": "FAILED: ce_vs_cw"}, {"sanity/passed": 0.0}, "FAILED: ce_vs_cw"),
        ({"artplug.sanity": "ERROR: RuntimeError: boom"}, {}, "error"),
        ({}, {"sanity/passed": 1.0}, "passed"),
        (
            {"sanity.ce_vs_cw": "fail", "sanity.large_eps": "warn"},
            {"sanity/passed": 0.0},
            "FAILED: ce_vs_cw",
        ),
        ({}, {"sanity/passed": 0.0}, "FAILED"),
        ({}, {}, "not run"),
    ],
)
def test_gate_of(tags, metrics, gate):
    assert lab.gate_of(tags, metrics) == gate


def test_constant_columns_stay_for_a_single_run(in_store, capsys):
    code, out, err = run_main(["compare", "--run", in_store["honest"], "--no-chart"], capsys)
    assert code == 0, err
    assert "same for all runs" not in out
    assert out.splitlines()[2].split(" | ")[:2] == ["name  ", "techniques         "]


# ------------------------------------------------------------------------------------------
# A bare `artplug compare`


def fresh_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty SQLite store as MLFLOW_TRACKING_URI, the working folder in tmp_path."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.search_experiments()  # creates the tables (and MLflow's 'Default' experiment)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return client, uri


def test_recipe_experiments_are_those_of_the_shipped_recipes():
    import tomllib

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    used = set()
    for path in recipes.rglob("*.toml"):
        tracking = tomllib.loads(path.read_text()).get("tracking", {})
        if "experiment" in tracking:
            used.add(tracking["experiment"])
    assert used and used <= set(lab.RECIPE_EXPERIMENTS)


def test_bare_compare_shows_the_shipped_recipes_experiments(tmp_path, monkeypatch, capsys):
    client, uri = fresh_store(tmp_path, monkeypatch)
    digits = client.create_experiment("artplug-digits")
    quick = client.create_experiment("artplug-quickstart")
    other = client.create_experiment("scratch")
    log_run(client, digits, "pgd", digits_params(), {"test/clean_acc": 0.9, "test/pgd-20_acc": 0.5})
    log_run(client, digits, "trades", digits_params(), {"test/clean_acc": 0.8})
    log_run(client, quick, "quick", digits_params(), {"test/clean_acc": 0.7})
    log_run(client, other, "elsewhere", digits_params(), {"test/clean_acc": 0.6})
    code, out, err = run_main(["compare", "--no-chart"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (
        f"experiments 'artplug-quickstart': 1 run, 'artplug-digits': 2 runs at {uri}"
    )
    rows = table_cells(out, "name ")
    # Runs of two experiments: a column says which; runs of other experiments are not shown.
    assert [(row[0], row[1]) for row in rows] == [
        ("pgd", "artplug-digits"),
        ("trades", "artplug-digits"),
        ("quick", "artplug-quickstart"),
    ]
    code, out, err = run_main(["compare"], capsys)
    assert code == 0 and "chart: compare-artplug-quickstart_artplug-digits.png" in out


def test_bare_compare_falls_back_to_the_latest_experiment(tmp_path, monkeypatch, capsys):
    client, uri = fresh_store(tmp_path, monkeypatch)
    for name, start in (("older", 1_000), ("newer", 2_000), ("oldest", 500)):
        run = client.create_run(client.create_experiment(name), start_time=start, run_name=name)
        client.log_metric(run.info.run_id, "test/clean_acc", 0.5)
    code, out, err = run_main(["compare", "--no-chart"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"experiment 'newer': 1 run at {uri}"
    assert lines[1].startswith("the experiments of plain runs and of the shipped recipes (")
    assert lines[1].endswith("have no runs here; showing 'newer', the one with the latest run")


def test_bare_compare_on_an_empty_store_lists_its_experiments(tmp_path, monkeypatch, capsys):
    client, uri = fresh_store(tmp_path, monkeypatch)
    client.create_experiment("artplug-digits")
    code, out, err = run_main(["compare"], capsys)
    assert code == 0, err
    assert out.splitlines() == [
        f"no runs to compare at {uri}; its experiments:",
        "  artplug-digits: no runs",
        "  Default: no runs",
        "artplug run RECIPE logs a run here; --tracking-uri (or MLFLOW_TRACKING_URI) reads "
        "another store",
    ]
    assert not list(tmp_path.glob("*.png"))
    # The Python side gets an error it can catch.
    with pytest.raises(lab.NoRunsYet, match="no runs to compare"):
        lab.collect(client, uri)


def test_unknown_experiment_names_the_existing_ones(in_store, capsys):
    code, _, err = run_main(["compare", "labb"], capsys)
    lines = [line for line in err.splitlines() if not line.startswith("Warning:")]
    assert code == 2 and len(lines) == 1, err
    assert "MLflow experiment 'labb' does not exist" in lines[0]
    assert "(did you mean 'lab'?)" in lines[0] and "'grid'" in lines[0]


def test_plain_table_fits_the_width_by_cutting_long_text_cells() -> None:
    from artplug.lab import _plain_table

    headers = ["name", "techniques", "data/model", "clean", "pgd-20", "gate"]
    numeric = [False, False, False, True, True, False]
    cells = [
        [
            "a-very-long-run-name-that-stays-whole",
            "trades-kl + hypersphere + he-margin + trades + logit-pairing",
            "cifar10/wide-resnet-34-10",
            "84.4%",
            "52.9%",
            "FAILED: black_box_vs_white_box, ce_vs_cw",
        ],
        ["b", "pgd + cross-entropy", "digits/small-cnn", "99.4%", "71.3%", "passed"],
    ]
    wide = _plain_table(headers, cells, numeric)
    assert max(len(line) for line in wide.splitlines()) > 100
    text = _plain_table(headers, cells, numeric, width=100)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    # Numbers and the name are never cut; cut cells end in an ellipsis.
    assert "a-very-long-run-name-that-stays-whole" in lines[2] and "84.4%" in lines[2]
    assert "52.9%" in lines[2] and "…" in lines[2]
    # A cell within its column's new width stays whole.
    assert lines[3].rstrip().endswith("| passed")
    # A table that fits is left alone.
    assert _plain_table(headers, cells, numeric, width=400) == wide
