"""The engine marks each pass of a training step with its phase (artplug/phase.py)."""

from __future__ import annotations

import torch
from torch import nn

import artplug
from artplug import phase
from artplug.engine import build
from artplug.recipe import resolve
from artplug.testing import digits_recipe
from artplug.workflows import train_and_evaluate


def test_running_sets_and_restores_the_phase():
    assert artplug.current_phase() == "eval"
    with phase.running("attack"):
        assert artplug.current_phase() == "attack"
        with phase.running("update-adv"):
            assert artplug.current_phase() == "update-adv"
        assert artplug.current_phase() == "attack"
    assert artplug.current_phase() == "eval"
    assert phase.is_update("update-clean") and not phase.is_update("attack")


class PhaseRecorder(nn.Module):
    """Identity that records the phase of every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(artplug.current_phase())
        return x


def test_train_step_marks_attack_clean_and_adv_forwards(plugin_set, tmp_path):
    raw = digits_recipe(
        perturbation={"use": "pgd", "steps": 2},
        loss=[
            {"use": "cross-entropy", "id": "ce-clean", "on": "clean"},
            {"use": "cross-entropy", "id": "ce-adv"},
        ],
    )
    raw["eval"] = {"every_epochs": 0, "final_attacks": ["clean"], "test_examples": 8}
    components = build(resolve(raw, plugin_set.registries))
    recorder = PhaseRecorder()
    components.model.normalize = nn.Sequential(recorder, components.model.normalize)
    train_and_evaluate(components, run_dir=tmp_path / "run", max_steps=1)
    # Two PGD steps, then the clean and the adversarial forward of the update, then evaluation.
    assert recorder.seen[:4] == ["attack", "attack", "update-clean", "update-adv"]
    assert set(recorder.seen[4:]) == {"eval"}
