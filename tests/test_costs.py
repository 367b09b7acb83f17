"""Cost accounting: network passes counted from outside the step, per-epoch metrics, run totals.

The expected counts are worked out by hand from what each technique runs per minibatch:

- ``pgd`` with k steps + cross-entropy on x_adv: k attack forwards, each followed by an input
  gradient (k backwards), then one update forward and its backward: k + 1 of each;
- ``trades-kl`` with k steps + ``trades``: one no-grad forward of x (the fixed clean
  distribution, no backward), k attack forwards with input gradients, then the clean and the
  adversarial update forwards, both reached by the loss's backward: k + 3 forwards, k + 2
  backwards, k + 1 of the forwards inside the attack;
- ``free`` with m replays + cross-entropy: no attack forward at all; each replay is one update
  forward and backward on the same minibatch: m of each per example drawn;
- ``pgd`` k + ALP (clean CE, adversarial CE, logit pairing): k + 2 of each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

import artplug
from artplug import checkpoint as ckpt
from artplug import phase
from artplug.costs import CostLedger, PassCounter, peak_memory_mb
from artplug.engine import build, train_step
from artplug.kinds import Progress
from artplug.plugins import load_plugins
from artplug.recipe import resolve
from artplug.selection import CHECKPOINT_NAME
from artplug.testing import digits_recipe
from artplug.workflows import train_and_evaluate

BATCH = 64  # digits_recipe's batch size


def counted_steps(c, steps: int = 1) -> PassCounter:
    """Run ``steps`` training steps on the first minibatch with a counter attached."""
    counter = PassCounter()
    x, y = next(iter(c.train_loader))
    assert x.shape[0] == BATCH
    with counter.watching(c.model):
        for step in range(steps):
            counter.examples += x.shape[0]
            train_step(c, x, y, Progress(0, step, 10, 100))
    return counter


@pytest.mark.parametrize(
    ("perturbation", "loss", "forwards", "backwards", "attack"),
    [
        ({"use": "none"}, [{"use": "cross-entropy"}], 1, 1, 0),
        ({"use": "pgd", "steps": 3}, [{"use": "cross-entropy"}], 4, 4, 3),
        ({"use": "pgd", "steps": 1}, [{"use": "cross-entropy"}], 2, 2, 1),
        ({"use": "trades-kl", "steps": 2}, [{"use": "trades"}], 5, 4, 3),
        ({"use": "free", "replays": 3}, [{"use": "cross-entropy"}], 3, 3, 0),
        (
            {"use": "pgd", "steps": 2},
            [
                {"use": "cross-entropy", "id": "ce-clean", "on": "clean", "weight": 0.5},
                {"use": "cross-entropy", "id": "ce-adv", "weight": 0.5},
                {"use": "logit-pairing", "weight": 0.5},
            ],
            4,
            4,
            2,
        ),
    ],
    ids=["standard", "pgd-3", "pgd-1", "trades-2", "free-3", "alp-pgd-2"],
)
def test_passes_per_example_match_the_hand_count(
    plugin_set, perturbation, loss, forwards, backwards, attack
):
    raw = digits_recipe(perturbation=perturbation, loss=loss)
    c = build(resolve(raw, plugin_set.registries))
    counter = counted_steps(c, steps=2)
    assert counter.examples == 2 * BATCH
    assert counter.forward_rows == forwards * 2 * BATCH
    assert counter.backward_rows == backwards * 2 * BATCH
    assert counter.attack_rows == attack * 2 * BATCH


def test_counting_needs_no_host_sync(plugin_set, monkeypatch):
    c = build(resolve(digits_recipe(), plugin_set.registries))
    x, y = next(iter(c.train_loader))

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync while counting passes")

    for name in ("item", "tolist", "cpu", "numpy", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    counter = PassCounter()
    with counter.watching(c.model):
        train_step(c, x, y, Progress(0, 0, 10, 100))
    monkeypatch.undo()
    assert counter.forward_rows == 3 * BATCH  # pgd-2 + cross-entropy


def test_only_training_phases_count_and_every_gradient_through_the_output_does():
    model = nn.Linear(3, 2)
    x = torch.rand(5, 3, requires_grad=True)
    counter = PassCounter()
    with counter.watching(model):
        model(x).sum().backward()  # phase "eval": evaluation, user code
        with phase.running("attack"):
            out = model(x)
            torch.autograd.grad(out.sum(), x, retain_graph=True)
            torch.autograd.grad(out.square().sum(), x)  # a second backward through one forward
            with torch.no_grad():
                model(x)  # a forward without a graph: no backward can follow
        with phase.running("update-adv"):
            model(x[:2]).sum().backward()
        with phase.running("update-clean"):
            model(x[:4])  # a forward no loss uses: no backward
    assert counter.forward_rows == 5 + 5 + 2 + 4
    assert counter.attack_rows == 5 + 5
    assert counter.backward_rows == 5 + 5 + 2
    model(x)  # the hook is gone after the block
    with phase.running("update"):
        model(x).sum().backward()
    assert counter.forward_rows == 16 and counter.backward_rows == 12


def test_in_place_changes_of_the_output_still_count_once():
    # Module full-backward hooks raise on this ("a view ... being modified inplace").
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.rand(6, 3)
    counter = PassCounter()
    with counter.watching(model), phase.running("update-adv"):
        out = model(x)
        out.mul_(2.0).add_(1.0)
        out.sum().backward()
    assert counter.forward_rows == 6 and counter.backward_rows == 6
    assert model[0].weight.grad is not None


class _InPlaceParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InPlaceLoss:
    """Cross-entropy on the adversarial logits after scaling them in place."""

    name = "in-place-ce"
    Params = _InPlaceParams
    needs = frozenset({"adv"})

    def __init__(self, params):
        self.params = params

    def __call__(self, out, state):
        return F.cross_entropy(out.logits_adv.mul_(1.5), out.y)


class InPlacePlugin:
    @staticmethod
    @artplug.hookimpl
    def register_loss_terms(register):
        register(InPlaceLoss)


def test_a_loss_that_changes_the_logits_in_place_trains_and_counts():
    registries = load_plugins(disabled=(), extra=[("inplace", InPlacePlugin())]).registries
    raw = digits_recipe(perturbation={"use": "pgd", "steps": 2}, loss=[{"use": "in-place-ce"}])
    counter = counted_steps(build(resolve(raw, registries)))
    assert (counter.forward_rows, counter.backward_rows) == (3 * BATCH, 3 * BATCH)


def filled_counter(examples: int, forward: int, backward: int, attack: int) -> PassCounter:
    counter = PassCounter()
    counter.examples, counter.forward_rows = examples, forward
    counter.backward_rows, counter.attack_rows = backward, attack
    return counter


def test_ledger_metrics_totals_and_resume():
    ledger = CostLedger(torch.device("cpu"))
    first = ledger.record_epoch(1, filled_counter(100, 450, 300, 250), 2.0, 512.0)
    assert first == {
        "cost/forward_per_example": 4.5,
        "cost/backward_per_example": 3.0,
        "cost/attack_steps": 2.5,
        "cost/examples_per_s": 50.0,
        "cost/epoch_s": 2.0,
        "cost/peak_memory_mb": 512.0,
    }
    ledger.record_epoch(2, filled_counter(80, 80, 40, 0), 4.0, None)
    assert ledger.totals() == {
        "cost/total_forward_per_example": 5.5,
        "cost/total_backward_per_example": 3.5,
        "cost/train_s": 6.0,
    }
    # A resumed run re-trains epoch 2 from the checkpoint after epoch 1: the new record wins.
    resumed = CostLedger(torch.device("cpu"))
    resumed.load_state_dict(ledger.state_dict()[:1])
    resumed.record_epoch(2, filled_counter(80, 160, 160, 80), 1.0, 600.0)
    report = resumed.report()
    assert report["total_forward_per_example"] == 6.5
    assert report["total_backward_per_example"] == 5.0
    assert report["train_s"] == 3.0
    assert report["peak_memory_mb"] == 600.0
    assert [e["epoch"] for e in report["epochs"]] == [1.0, 2.0]
    assert report["epochs"][1]["attack_steps"] == 1.0
    empty = CostLedger(torch.device("cpu"))
    empty.load_state_dict(None)  # a checkpoint from before cost accounting
    assert empty.totals()["cost/train_s"] == 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_cpu_peak_memory_is_the_process_high_water_mark():
    reading = peak_memory_mb(torch.device("cpu"))
    status = Path("/proc/self/status").read_text()
    (line,) = [line for line in status.splitlines() if line.startswith("VmHWM:")]
    high_water_mb = int(line.split()[1]) / 1024  # kB
    assert reading is not None and reading > 10
    # Read just before /proc: the peak can only have grown (a little) in between.
    assert high_water_mb - 8 <= reading <= high_water_mb


def cost_recipe(**run):
    raw = digits_recipe(
        run={"name": "cost", "epochs": 2, "log_every": 50, **run},
        data={"dataset": "digits", "batch_size": 256},
        perturbation={"use": "pgd", "steps": 2},
    )
    raw["eval"] = {
        "every_epochs": 0,
        "final_attacks": ["clean"],
        "test_examples": 32,
        "sanity": False,
    }
    return raw


def test_fit_logs_cost_per_epoch_and_totals_and_resume_keeps_them(plugin_set, tmp_path):
    recipe = resolve(cost_recipe(), plugin_set.registries)
    c = build(recipe)
    steps = len(c.train_loader)
    examples = steps * 256  # drop_last: full batches only
    run_dir = tmp_path / "run"
    # Stop after the first epoch, then resume: the totals must cover both epochs.
    train_and_evaluate(c, run_dir=run_dir, max_steps=steps)
    payload = ckpt.load(run_dir / CHECKPOINT_NAME)
    assert [e["epoch"] for e in payload["cost"]] == [1.0]
    result = train_and_evaluate(build(recipe), run_dir=run_dir, resume_from=payload)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "epoch" in r]
    assert [r["step"] for r in epochs] == [steps, 2 * steps]  # the epoch's last global step
    for record in epochs:
        assert record["cost/forward_per_example"] == 3.0
        assert record["cost/backward_per_example"] == 3.0
        assert record["cost/attack_steps"] == 2.0
        assert record["cost/epoch_s"] == record["time/epoch_s"]
        assert record["cost/examples_per_s"] * record["cost/epoch_s"] == pytest.approx(examples)
        assert record["cost/peak_memory_mb"] > 0
    # The first fit ended (and was evaluated) after epoch 1; the resumed one after epoch 2.
    stopped, final = [r for r in records if "cost/train_s" in r]
    assert stopped["cost/total_forward_per_example"] == 3.0
    assert final["step"] == 2 * steps and "test/clean_acc" in final
    assert final["cost/total_forward_per_example"] == 6.0
    assert final["cost/total_backward_per_example"] == 6.0
    assert final["cost/train_s"] == pytest.approx(sum(r["cost/epoch_s"] for r in epochs))

    report = json.loads((run_dir / "eval.json").read_text())["cost"]
    assert report == result.cost
    assert report["total_forward_per_example"] == 6.0
    assert [e["examples"] for e in report["epochs"]] == [examples, examples]
    assert report["peak_memory_mb"] == max(r["cost/peak_memory_mb"] for r in epochs)
    assert "process" in report["peak_memory_source"]
    assert result.history[-1]["cost/backward_per_example"] == 3.0


@pytest.mark.gpu
def test_cuda_peak_memory_and_counts_under_amp(plugin_set, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    recipe = resolve(cost_recipe(device="cuda", epochs=1), plugin_set.registries)
    c = build(recipe)
    assert c.amp_dtype == torch.bfloat16 and c.channels_last
    result = train_and_evaluate(c, run_dir=tmp_path / "gpu")
    (epoch,) = result.cost["epochs"]
    assert epoch["forward_per_example"] == 3.0 and epoch["backward_per_example"] == 3.0
    # The small CNN and a 256-image batch need a few MiB, far below the device's memory.
    total_mb = torch.cuda.get_device_properties(c.device).total_memory / 2**20
    assert 0 < epoch["peak_memory_mb"] < total_mb
    assert "max_memory_allocated" in result.cost["peak_memory_source"]
