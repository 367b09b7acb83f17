"""The Python API (artplug/api.py): artplug.train, artplug.evaluate and docs/python-api.md."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import artplug
from artplug.api import ApiError, overrides_to_set

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python-api.md"
QUICKSTART = ROOT / "recipes" / "quickstart.toml"
# The fenced blocks the doc test executes: exactly "```python" (a "```python no-run" block is
# shown, not run).
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding recipes/quickstart.toml, as the doc's examples expect."""
    (tmp_path / "recipes").mkdir()
    shutil.copy(QUICKSTART, tmp_path / "recipes" / "quickstart.toml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_documented_examples_run(scratch: Path) -> None:
    blocks = BLOCK.findall(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 4, "the doc lost its examples"
    namespace: dict[str, object] = {}
    for index, code in enumerate(blocks):
        try:
            exec(compile(code, f"{DOC.name} block {index + 1}", "exec"), namespace)
        except Exception as exc:  # name the block in the failure
            raise AssertionError(f"{DOC.name}: python block {index + 1} failed: {exc!r}") from exc
    result = namespace["result"]
    assert isinstance(result, artplug.TrainResult)
    # The result is the run: eval.json holds the same accuracies, and the model is in eval mode.
    report = json.loads((result.run_dir / "eval.json").read_text(encoding="utf-8"))
    assert report["accuracy"] == result.metrics
    assert report["training_complete"] is False
    assert not result.model.training
    assert result.threat == artplug.Threat("linf", 0.2)


# ------------------------------------------------------------------------------------------
# overrides -> --set


def test_overrides_become_the_set_strings_of_the_command_line() -> None:
    assert overrides_to_set(
        {
            "optim.lr": 0.05,
            "run.epochs": 3,
            "data.dataset": "cifar10",
            "eval.sanity": False,
            "eval.final_attacks": ("clean", "pgd-20"),
            "perturbation": {"use": "none"},
            "data.root": Path("/data/x"),
            "loss.0.beta": np.float32(6.0),
        }
    ) == [
        "optim.lr=0.05",
        "run.epochs=3",
        'data.dataset="cifar10"',
        "eval.sanity=false",
        'eval.final_attacks=["clean", "pgd-20"]',
        'perturbation={ use = "none" }',
        'data.root="/data/x"',
        "loss.0.beta=6.0",
    ]
    assert overrides_to_set(None) == []
    with pytest.raises(ApiError, match="NoneType has no TOML form"):
        overrides_to_set({"eval.test_examples": None})
    with pytest.raises(ApiError, match="not a dotted recipe key"):
        overrides_to_set({"optim.lr=1": 1})


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from artplug.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip()


def test_a_bad_override_raises_the_error_the_command_prints(
    scratch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = {"optim.lr": -1.0, "run.epochz": 2, "eval.final_attacks": ["pgd20"]}
    with pytest.raises(artplug.RecipeError) as raised:
        artplug.train("recipes/quickstart.toml", overrides=overrides, track=False)
    assert len(raised.value.problems) == 3
    argv = ["run", "recipes/quickstart.toml", "--no-track"]
    for setting in overrides_to_set(overrides):
        argv += ["--set", setting]
    assert _cli_error(argv, capsys) == f"Error: {raised.value.one_line()}"
    assert not (scratch / "runs").exists()  # nothing was started


def test_bad_arguments_raise_api_errors_not_system_exit(scratch: Path) -> None:
    with pytest.raises(ApiError, match="max_steps must be >= 1"):
        artplug.train("recipes/quickstart.toml", max_steps=0, track=False)
    with pytest.raises(ApiError, match="threads must be an integer"):
        artplug.train("recipes/quickstart.toml", threads=1.5, track=False)  # type: ignore[arg-type]
    with pytest.raises(artplug.ArtplugError):
        artplug.train("recipes/no-such-recipe.toml", track=False)


def test_a_tracked_run_has_its_id_and_description(scratch: Path) -> None:
    import mlflow

    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    result = artplug.train(
        "recipes/quickstart.toml",
        overrides={
            "run.out_dir": "runs",
            "eval.test_examples": 30,
            "eval.final_attacks": ["clean", "fgsm"],
            "eval.sanity": False,
            "tracking.log_model": False,
            "tracking.experiment": "api-test",
        },
        max_steps=5,
        threads=1,
        quiet=True,
        tracking_uri=uri,
    )
    assert result.run_id is not None
    run = mlflow.MlflowClient(uri).get_run(result.run_id)
    assert run.data.metrics["test/clean_acc"] == pytest.approx(result.metrics["clean"])
    note = run.data.tags["mlflow.note.content"]
    clean, fgsm = (f"{100 * result.metrics[k]:.1f}%" for k in ("clean", "fgsm"))
    assert note.startswith("pgd + cross-entropy · digits (small-cnn) · linf eps=0.2 · 60 epochs")
    assert f"test, 30 examples: clean {clean}, fgsm {fgsm}" in note
    assert "training cut short (max_steps)" in note


# ------------------------------------------------------------------------------------------
# evaluate


class Constant(nn.Module):
    """Always predicts ``label``: no attack can change its output."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label
        self.scale = nn.Parameter(torch.ones(()))  # ART needs a parameter to find the device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 10, device=x.device)
        logits[:, self.label] = 1.0
        return logits * self.scale + 0.0 * x.flatten(1).sum(1, keepdim=True)


def _digits(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=generator)
    y = torch.arange(n) % 10
    return x, y


def test_evaluate_scores_a_model_it_cannot_fool_by_its_clean_accuracy() -> None:
    x, y = _digits(40)
    evaluation = artplug.evaluate(
        Constant(3), x, y, attacks=["clean", "fgsm", "pgd-20"], threat=("linf", 0.3)
    )
    # y cycles through 0..9: a constant prediction of 3 is right on a tenth of the examples,
    # and an output that does not depend on the input is exactly as right under attack.
    assert dict(evaluation) == {"clean": 0.1, "fgsm": 0.1, "pgd-20": 0.1, "worst": 0.1}
    assert isinstance(evaluation, artplug.Evaluation) and evaluation.n_examples == 40
    assert "pgd-20 |   10.00%" in str(evaluation)


def test_evaluate_attacks_a_model_that_depends_on_its_input() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = _digits(40)
    y = model(x).argmax(1).detach()  # every clean example right
    one = artplug.evaluate(model, x, y, attacks=["clean", "pgd-20"], threat=("linf", 0.5))
    assert one["clean"] == 1.0 and one["pgd-20"] < 0.5  # a linear model falls at eps 0.5
    assert "worst" not in one  # one attack: nothing to take the worst of
    # Every form of the threat means the same; eps 0 needs no attack.
    for threat in (artplug.Threat("linf", 0.0), ("linf", 0), {"norm": "linf", "eps": 0.0}):
        assert artplug.evaluate(model, x, y, attacks=["fgsm"], threat=threat)["fgsm"] == 1.0
    # numpy inputs and n_examples (the first N, in order)
    first = artplug.evaluate(
        model, x.numpy(), y.numpy(), attacks=["clean"], threat=("l2", 0.5), n_examples=7
    )
    assert first.n_examples == 7 and first["clean"] == 1.0
    assert model.training  # the model's mode is restored


def test_evaluate_refuses_bad_input_before_attacking() -> None:
    x, y = _digits(8)
    model = Constant(0)
    bad: list[tuple[dict[str, object], str]] = [
        ({"attacks": ["pgd20"]}, "unknown attack 'pgd20' \\(did you mean 'pgd-20'"),
        ({"attacks": []}, "name at least one"),
        ({"threat": ("linf2", 0.1)}, "norm 'linf2' is not one of linf, l2"),
        ({"threat": ("linf", -0.1)}, "eps must be finite and >= 0"),
        ({"threat": {"eps": 0.1}}, "expected keys 'norm' and 'eps'"),
        ({"n_examples": 0}, "n_examples must be an integer >= 1"),
    ]
    for kwargs, message in bad:
        arguments: dict[str, object] = {"attacks": ["clean"], "threat": ("linf", 0.1), **kwargs}
        with pytest.raises(ApiError, match=message):
            artplug.evaluate(model, x, y, **arguments)  # type: ignore[arg-type]
    with pytest.raises(ApiError, match="uint8 pixels"):
        artplug.evaluate(model, (x * 255).to(torch.uint8), y, threat=("linf", 0.1))
    # Outside [0, 1]: the evaluation module's own check, as an ApiError that is a ValueError.
    with pytest.raises(ValueError, match="pixel space"):
        artplug.evaluate(model, x * 2, y, threat=("linf", 0.1))
    with pytest.raises(ApiError, match=r"expected a torch\.nn\.Module"):
        artplug.evaluate("model", x, y, threat=("linf", 0.1))  # type: ignore[arg-type]


def test_the_evaluation_module_keeps_working_and_is_callable() -> None:
    import artplug.evaluate as ev
    from artplug.api import evaluate

    assert ev is artplug.evaluate and callable(artplug.evaluate)
    assert "pgd-20" in ev.ATTACKS
    x, y = _digits(20)
    # The old function: positional threat and attacks, a plain dict without "worst".
    assert ev.evaluate(Constant(1), x, y, artplug.Threat("linf", 0.1), ["clean", "fgsm"]) == {
        "clean": 0.1,
        "fgsm": 0.1,
    }
    assert dict(artplug.evaluate(Constant(1), x, y, threat=("linf", 0.1))) == dict(
        evaluate(Constant(1), x, y, threat=("linf", 0.1))
    )
