"""Mixed precision on CPU: the bf16 and fp16 autocast paths of the engine and the plugins.

``run.amp = "bf16"`` / ``"fp16"`` work on CPU (``"auto"`` stays fp32 there), so the dtype
contracts of docs/precision.md are checked without a GPU: a few optimizer steps of digits twins
(one per built-in perturbation, with their loss terms and transforms) under each autocast dtype,
checking that the model's outputs inside autocast are the low-precision dtype, every loss term
returns a finite fp32 scalar, the adversarial batch stays fp32 inside the ball and the box, and
the parameters (and their gradients) stay fp32 and finite. fp16 adds a GradScaler, as on CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import artplug
from artplug.engine import Components, LossSlot, _amp_dtype, build, train_step
from artplug.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Digits twins, one per built-in perturbation (and the loss terms / transforms they bring).
TWINS = {
    "pgd_at": "pgd + cross-entropy",
    "trades": "trades-kl + trades",
    "he_pgd": "pgd + hypersphere + he-margin",
    "alp": "pgd + logit-pairing",
    "free_at": "free (after_backward on the scaled gradient)",
    "fast_at": "fgsm + cyclic-lr",
    "slat": "slat + latent-sites",
    "spat_like_pgd": "spat",
}


class RecordingTerm:
    """A loss term wrapper that keeps the dtypes it saw and the value it returned."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.needs = inner.needs
        self.calls: list[dict[str, Any]] = []

    def __call__(self, out: artplug.Outputs, state: artplug.StepState) -> Tensor:
        value = self.inner(out, state)
        self.calls.append(
            {
                "autocast": torch.is_autocast_enabled("cpu"),
                "clean": None if out.logits_clean is None else out.logits_clean.dtype,
                "adv": None if out.logits_adv is None else out.logits_adv.dtype,
                "x_adv": None if out.x_adv is None else out.x_adv.detach().clone(),
                "value": value.detach().clone(),
            }
        )
        return value


def twin(name: str, amp: str, run_tmp: Path, plugin_set: Any) -> Components:
    recipe = load_recipe(
        ROOT / "recipes" / "digits" / f"{name}.toml",
        plugin_set.registries,
        [
            f'run.amp="{amp}"',
            'run.device="cpu"',
            f'run.out_dir="{run_tmp}"',
            'tracking.backend="none"',
        ],
    )
    return build(recipe)


def backbone_outputs(model: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
    """The model's outputs under CPU autocast (no grad)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        return model(x)


def test_cpu_autocast_supports_both_dtypes_and_a_cpu_grad_scaler() -> None:
    # The premise of this file: torch's CPU autocast runs matmuls/convs in bf16 and fp16, and a
    # GradScaler works on CPU.
    layer = nn.Linear(4, 3)
    for dtype in DTYPES.values():
        with torch.autocast("cpu", dtype=dtype):
            assert layer(torch.randn(2, 4)).dtype == dtype
    scaler = torch.amp.GradScaler("cpu")
    assert scaler.is_enabled()


def test_amp_setting_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert _amp_dtype("auto", cpu) is None  # fp32 on CPU unless asked explicitly
    assert _amp_dtype("off", cpu) is None
    assert _amp_dtype("bf16", cpu) == torch.bfloat16
    assert _amp_dtype("fp16", cpu) == torch.float16


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", list(TWINS), ids=list(TWINS))
def test_twin_trains_under_cpu_autocast(name: str, amp: str, run_tmp: Path, plugin_set) -> None:
    dtype = DTYPES[amp]
    c = twin(name, amp, run_tmp, plugin_set)
    assert c.amp_dtype == dtype
    # Loss scaling exactly for fp16 (bf16 has fp32's exponent range).
    assert (c.scaler is not None) == (amp == "fp16")
    c.losses = [LossSlot(s.id, RecordingTerm(s.term), s.weight) for s in c.losses]  # type: ignore[arg-type]
    before = [p.detach().clone() for p in c.model.parameters()]
    steps = 2
    batches = iter(c.train_loader)
    for step in range(steps):
        x, y = next(batches)
        progress = artplug.Progress(
            epoch=0, step=step, steps_per_epoch=len(c.train_loader), total_steps=100
        )
        train_step(c, x, y, progress)
        for p in c.model.parameters():
            assert p.dtype == torch.float32, "autocast must not change the parameters' dtype"
            assert torch.isfinite(p).all()
            assert p.grad is None or (p.grad.dtype == torch.float32)
    changed = any(not torch.equal(a, b) for a, b in zip(c.model.parameters(), before, strict=True))
    if c.scaler is None:
        assert changed
    else:
        # The scaler skips a step whose scaled gradients overflow (and lowers the scale);
        # two steps with no update at all would mean every gradient overflowed.
        assert changed or c.scaler.get_scale() < 65536.0
    for slot in c.losses:
        term = slot.term
        assert isinstance(term, RecordingTerm)
        assert len(term.calls) >= steps
        for call in term.calls:
            assert call["autocast"]
            value = call["value"]
            assert value.dtype == torch.float32, f"{slot.id} returned {value.dtype}"
            assert value.dim() == 0 and torch.isfinite(value)
            x_adv = call["x_adv"]
            if x_adv is not None:
                # The perturbation's output is an input: fp32, finite, in the box, in the ball
                # (FreeAT: around the replayed batch, checked by the plugin's own tests).
                assert x_adv.dtype == torch.float32 and torch.isfinite(x_adv).all()
                assert x_adv.min() >= 0 and x_adv.max() <= 1
            for key in ("clean", "adv"):
                if call[key] is not None:
                    # Plain heads give the autocast dtype; the hypersphere head computes its
                    # cosines in fp32 on purpose (plugins/hypersphere.py).
                    assert call[key] in (dtype, torch.float32)
    x, y = next(batches)
    outputs = backbone_outputs(c.model.eval(), x, dtype)
    assert torch.isfinite(outputs.float()).all()
    if not any(spec.use == "hypersphere" for spec in c.recipe.transforms):
        assert outputs.dtype == dtype, "the model's logits inside autocast are low precision"


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_adversarial_batch_stays_in_the_ball_under_autocast(amp: str, run_tmp, plugin_set) -> None:
    c = twin("pgd_at", amp, run_tmp, plugin_set)
    x, y = next(iter(c.train_loader))
    state = artplug.StepState(
        artplug.Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=1),
        {},
        c.model,
        c.threat,
    )
    c.model.eval()
    with torch.autocast("cpu", dtype=DTYPES[amp]):
        x_adv = c.perturbation.generate(c.model, x, y, state)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= c.threat.eps + 1e-6
    with torch.no_grad():
        clean = (c.model(x).argmax(1) == y).float().mean()
        adv = (c.model(x_adv).argmax(1) == y).float().mean()
    # The attack does something under low precision (an untrained model: any drop will do).
    assert adv <= clean
