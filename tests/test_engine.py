"""The engine: step order, knobs, no host sync in the step, checkpoints, device and AMP choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

import artplug
from artplug import checkpoint as ckpt
from artplug.engine import (
    CHECKPOINT_NAME,
    _amp_dtype,
    _Meter,
    apply_knobs,
    build,
    restore,
    select_device,
    train_step,
)
from artplug.errors import ArtplugError, CheckpointError
from artplug.kinds import Progress
from artplug.plugins import load_plugins
from artplug.recipe import resolve
from artplug.testing import digits_recipe
from artplug.workflows import train_and_evaluate

CALLS: list[tuple] = []


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    size: float = 0.01


class RecordingPerturbation:
    """Records generate/after_backward; replays twice like FreeAT."""

    name = "rec-perturbation"
    Params = _Params
    replays = 2

    def __init__(self, params):
        self.params = params

    def generate(self, model, x, y, state):
        CALLS.append(("generate", state.replay, model.training, state.threat.eps, self.params.size))
        return (x + self.params.size).clamp(0, 1).detach()

    def after_backward(self, input_grad, state):
        CALLS.append(("after_backward", state.replay, input_grad is not None))


class RecordingLoss:
    """Cross-entropy on both logits, recording what it was given."""

    name = "rec-loss"
    Params = _Params
    needs = frozenset({"clean", "adv"})

    def __init__(self, params):
        self.params = params

    def __call__(self, out, state):
        CALLS.append(
            ("loss", state.replay, out.logits_clean is not None, out.logits_adv is not None)
        )
        return F.cross_entropy(out.logits_adv, out.y) + 0 * out.logits_clean.sum()


class RecordingSchedule:
    """Sets every kind of knob."""

    name = "rec-schedule"
    Params = _Params

    def __init__(self, params):
        self.params = params

    def knobs(self):
        return frozenset(
            {"lr_scale", "threat.eps_scale", "perturbation.size", "loss.rec-loss.weight"}
        )

    def values(self, progress):
        CALLS.append(("schedule", progress.step))
        return {
            "lr_scale": 0.5,
            "threat.eps_scale": 0.25,
            "perturbation.size": 0.02,
            "loss.rec-loss.weight": 3.0,
        }


class RecordingPlugin:
    @staticmethod
    @artplug.hookimpl
    def register_perturbations(register):
        register(RecordingPerturbation)

    @staticmethod
    @artplug.hookimpl
    def register_loss_terms(register):
        register(RecordingLoss)

    @staticmethod
    @artplug.hookimpl
    def register_schedules(register):
        register(RecordingSchedule)


@pytest.fixture(scope="module")
def recording_registries():
    return load_plugins(disabled=(), extra=[("rec", RecordingPlugin())], strict=True).registries


def recording_components(registries):
    raw = digits_recipe(
        perturbation={"use": "rec-perturbation", "model_mode": "eval"},
        loss=[{"use": "rec-loss"}],
        schedule=[{"use": "rec-schedule"}],
    )
    return build(resolve(raw, registries))


def test_step_order_is_exact(recording_registries):
    c = recording_components(recording_registries)
    x, y = next(iter(c.train_loader))
    CALLS.clear()
    train_step(c, x, y, Progress(0, 7, 10, 100))
    eps = 0.1 * 0.25
    assert CALLS == [
        ("schedule", 7),
        ("generate", 0, False, eps, 0.02),
        ("loss", 0, True, True),
        ("after_backward", 0, True),
        ("generate", 1, False, eps, 0.02),
        ("loss", 1, True, True),
        ("after_backward", 1, True),
    ]
    assert c.model.training  # back in train mode after the attack
    assert c.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5)
    assert c.losses[0].weight == 3.0


def test_attack_in_train_mode_when_recipe_says_so(recording_registries):
    raw = digits_recipe(
        perturbation={"use": "rec-perturbation", "model_mode": "train"},
        loss=[{"use": "rec-loss"}],
    )
    c = build(resolve(raw, recording_registries))
    x, y = next(iter(c.train_loader))
    CALLS.clear()
    train_step(c, x, y, Progress(0, 0, 10, 100))
    assert CALLS[0] == ("generate", 0, True, 0.1, 0.01)


def test_knobs_coerce_integer_params(plugin_set):
    c = build(resolve(digits_recipe(), plugin_set.registries))
    threat = apply_knobs(c, {"perturbation.steps": 3.6, "threat.eps_scale": 0.5})
    assert c.perturbation.params.steps == 4 and isinstance(c.perturbation.params.steps, int)
    assert threat.eps == pytest.approx(0.05)
    assert c.threat.eps == 0.1  # evaluation keeps the recipe's eps


def test_no_host_sync_inside_the_step(plugin_set, monkeypatch):
    c = build(resolve(digits_recipe(), plugin_set.registries))
    x, y = next(iter(c.train_loader))
    meter = _Meter(c.device, [s.id for s in c.losses])

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside the training step")

    for name in ("item", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    train_step(c, x, y, Progress(0, 0, 10, 100), meter)
    monkeypatch.undo()
    metrics = meter.read()
    assert 0.0 <= metrics["train/adv_acc"] <= 1.0 and metrics["train/loss"] > 0


def test_fit_writes_checkpoint_every_epoch_and_resume_restores(plugin_set, tmp_path):
    recipe = resolve(
        digits_recipe(run={"name": "t", "epochs": 2, "log_every": 5}), plugin_set.registries
    )
    c = build(recipe)
    result = train_and_evaluate(c, run_dir=tmp_path / "run")
    assert result.epochs_done == 2 and len(result.history) == 2
    assert "val/clean_acc" in result.history[0]  # validated after epoch 1 (not the last)
    payload = ckpt.load(tmp_path / "run" / CHECKPOINT_NAME)
    assert payload["epoch"] == 2 and payload["step"] == 2 * len(c.train_loader)
    assert payload["recipe"] == recipe.to_dict()
    for name in ("recipe.resolved.toml", "metrics.jsonl", "eval.json"):
        assert (tmp_path / "run" / name).is_file()
    assert not list((tmp_path / "run").glob("*.tmp"))

    fresh = build(recipe)
    epoch, step = restore(fresh, payload, "ckpt")
    assert (epoch, step) == (2, payload["step"])
    for a, b in zip(fresh.model.state_dict().values(), c.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_restore_rejects_a_checkpoint_of_another_model(plugin_set, tmp_path):
    c = build(resolve(digits_recipe(), plugin_set.registries))
    payload = {
        "model": {"bogus": torch.zeros(1)},
        "optimizer": {},
        "rng": ckpt.rng_states(),
        "epoch": 1,
        "step": 1,
    }
    with pytest.raises(CheckpointError, match="does not match"):
        restore(c, payload, "x.pt")


def test_checkpoint_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        ckpt.load(junk)


def test_device_and_amp_selection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto").type == "cpu"
    with pytest.raises(ArtplugError, match="no CUDA device"):
        select_device("cuda")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _amp_dtype("auto", cpu) is None
    assert _amp_dtype("auto", cuda) == torch.bfloat16
    assert _amp_dtype("fp16", cuda) == torch.float16
    assert _amp_dtype("off", cuda) is None
    # Explicit bf16/fp16 run on CPU too (CPU autocast; tests/test_precision.py trains with them).
    assert _amp_dtype("bf16", cpu) == torch.bfloat16
    assert _amp_dtype("fp16", cpu) == torch.float16
    with pytest.raises(ArtplugError, match="needs a CUDA or CPU device"):
        _amp_dtype("bf16", torch.device("mps"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto").type == "cuda"


def test_channels_last_switch_runs_on_cpu(plugin_set, tmp_path):
    recipe = resolve(
        digits_recipe(run={"name": "cl", "epochs": 1}),
        plugin_set.registries,
        overrides=['run.channels_last="on"'],
    )
    c = build(recipe)
    assert c.channels_last
    result = train_and_evaluate(c, run_dir=tmp_path / "cl", max_steps=2)
    assert set(result.final) == {"clean"}


@pytest.mark.gpu
def test_cuda_step_with_amp_and_channels_last(plugin_set, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    recipe = resolve(
        digits_recipe(run={"name": "gpu", "epochs": 1, "device": "cuda"}), plugin_set.registries
    )
    c = build(recipe)
    assert c.amp_dtype == torch.bfloat16 and c.channels_last
    assert c.train_loader is not None and next(c.model.parameters()).is_cuda
    result = train_and_evaluate(c, run_dir=tmp_path / "gpu", max_steps=3)
    assert 0.0 <= result.final["clean"] <= 1.0


def _fake_evaluate(sequence):
    """An evaluate() stand-in that returns the next scripted accuracies for the overfit check."""
    calls = iter(sequence)

    def fake(model, x, y, threat, attacks, **kwargs):
        if tuple(attacks) == ("fgsm", "pgd-20"):
            fgsm, pgd = next(calls)
            return {"fgsm": fgsm, "pgd-20": pgd}
        return {name: 0.5 for name in attacks}

    return fake


@pytest.mark.parametrize("action", ["log", "stop"])
def test_catastrophic_overfitting_is_detected(plugin_set, tmp_path, monkeypatch, action):
    import json

    import artplug.evaluate

    # Epoch 3: PGD accuracy collapses 0.40 -> 0.05 while FGSM rises 0.50 -> 0.80.
    scripted = [(0.45, 0.35), (0.50, 0.40), (0.80, 0.05), (0.85, 0.02)]
    monkeypatch.setattr(artplug.evaluate, "evaluate", _fake_evaluate(scripted))
    raw = digits_recipe(run={"name": "co", "epochs": 4, "log_every": 50})
    raw["eval"] = {
        "every_epochs": 0,
        "final_attacks": ["clean"],
        "overfit_check": action,
        "sanity": False,
    }
    c = build(resolve(raw, plugin_set.registries))
    result = train_and_evaluate(c, run_dir=tmp_path / "co")
    report = json.loads((tmp_path / "co" / "eval.json").read_text())
    assert report["catastrophic_overfitting"].startswith("catastrophic overfitting at epoch 3")
    good = ckpt.load(tmp_path / "co" / "checkpoint-good.pt")
    assert good["epoch"] == 2  # the last epoch that passed the check
    if action == "stop":
        assert result.epochs_done == 3 and report["checkpoint"] == "checkpoint-good.pt"
        for name, tensor in c.model.state_dict().items():
            assert torch.equal(tensor, good["model"][name])
    else:
        assert result.epochs_done == 4 and report["checkpoint"] == "checkpoint-last.pt"


def test_overfit_check_stays_quiet_on_a_healthy_run(plugin_set, tmp_path, monkeypatch):
    import artplug.evaluate

    scripted = [(0.45, 0.35), (0.50, 0.30), (0.55, 0.42)]  # a 0.05 dip is not a collapse
    monkeypatch.setattr(artplug.evaluate, "evaluate", _fake_evaluate(scripted))
    raw = digits_recipe(run={"name": "ok", "epochs": 3, "log_every": 50})
    raw["eval"] = {
        "every_epochs": 0,
        "final_attacks": ["clean"],
        "overfit_check": "stop",
        "sanity": False,
    }
    result = train_and_evaluate(build(resolve(raw, plugin_set.registries)), run_dir=tmp_path / "ok")
    assert result.epochs_done == 3


def test_flagged_parameters_get_no_weight_decay(plugin_set):
    raw = digits_recipe()
    raw["optim"] = {"name": "sgd", "lr": 0.1, "weight_decay": 0.01}
    raw["transform"] = [{"use": "smooth-activation", "activation": "smoothrelu"}]
    components = build(resolve(raw, plugin_set.registries))
    groups = components.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    exempt = {id(p) for p in groups[1]["params"]}
    b_params = {id(m.b) for m in components.model.modules() if hasattr(m, "b")}
    assert exempt == b_params and b_params
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(
        [p for p in components.model.parameters() if p.requires_grad]
    )
