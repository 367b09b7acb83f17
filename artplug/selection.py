"""Checkpoint selection: the best validated epoch, early stopping, catastrophic overfitting.

:class:`CheckpointPolicy` scores validations and says when to stop early; :class:`OverfitWatch`
detects catastrophic overfitting after every epoch; :func:`choose_checkpoint` loads the
checkpoint that the final evaluation uses (``eval.select``, the overfitting stop).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from artplug import checkpoint as ckpt

if TYPE_CHECKING:
    from artplug.engine import Components

CHECKPOINT_NAME = "checkpoint-last.pt"
GOOD_CHECKPOINT_NAME = "checkpoint-good.pt"
BEST_CHECKPOINT_NAME = "checkpoint-best.pt"


class OverfitWatch:
    """Catastrophic-overfitting detection (Wong et al. 2020, FastAT), after every epoch.

    ``eval.overfit_rule`` picks the rule; both compare with the last *healthy* epoch (a
    collapsed epoch never becomes the reference) and a drop must exceed ``eval.overfit_drop``
    (absolute accuracy; 0.2 by default, as in FastAT):

    ``"artplug"`` (default, the stricter rule)
        attack ``eval.overfit_examples`` fixed training examples with ``fgsm`` and ``pgd-20``
        from the attack table (eval mode). A collapse is PGD accuracy dropping by more than
        ``overfit_drop`` while FGSM accuracy does not fall: the model has learnt to defeat the
        single-step attack only. A PGD drop with FGSM falling too (a plain bad epoch) is not
        flagged. :meth:`artplug_collapse`.
    ``"fast-at"``
        what FastAT's ``train_fgsm.py --early-stop`` does: PGD-5 (step eps/4 = 2/255 at 8/255,
        one random start) on one training batch with the model in train mode
        (:func:`artplug.sanity.fast_at_pgd_accuracy`), and a collapse is that accuracy dropping
        by more than ``overfit_drop`` from the previous epoch's, which starts at 0 (so the first
        epoch never collapses). :meth:`fast_at_collapse`. The reference redraws its batch every
        epoch (the first batch of the shuffled, augmented loader) and lets the check move the
        BatchNorm running statistics; here the batch is fixed (``data.batch_size`` training
        examples from a seeded draw, not augmented), so epochs compare the same examples, and
        the check attacks a copy of the model, so training is not changed by it.
    """

    ATTACKS = ("fgsm", "pgd-20")
    FAST_AT_KEY = "pgd-5-train"
    """Metric key of the ``fast-at`` rule: ``overfit/pgd-5-train_acc``."""

    def __init__(self, c: Components) -> None:
        self.c = c
        settings = c.recipe.eval
        self.rule = settings.overfit_rule
        self.drop = settings.overfit_drop
        from artplug.engine import _subset  # engine imports this module

        x, y = c.data.train
        # A fixed seeded subset, the same every epoch, so the accuracies are comparable.
        size = c.recipe.data.batch_size if self.rule == "fast-at" else settings.overfit_examples
        self.x, self.y = _subset(x, y, size, c.recipe.run.seed + 1)
        self.previous: dict[str, float] | None = None

    @staticmethod
    def artplug_collapse(
        before: Mapping[str, float] | None, now: Mapping[str, float], drop: float
    ) -> bool:
        """The ``artplug`` rule on ``{"fgsm": ..., "pgd-20": ...}`` accuracies.

        True when PGD-20 accuracy fell by more than ``drop`` from ``before`` (the last healthy
        epoch; ``None`` before the first) while FGSM accuracy did not fall.
        """
        if before is None:
            return False
        return now["pgd-20"] < before["pgd-20"] - drop and now["fgsm"] >= before["fgsm"]

    @staticmethod
    def fast_at_collapse(previous: float, now: float, drop: float) -> bool:
        """The ``fast-at`` rule: ``robust_acc - prev_robust_acc < -drop``, as FastAT writes it.

        ``previous`` is the last healthy epoch's PGD accuracy, 0 before the first epoch.
        """
        return now - previous < -drop

    def _measure(self) -> dict[str, float]:
        c = self.c
        if self.rule == "fast-at":
            from artplug.sanity import fast_at_pgd_accuracy

            pgd = fast_at_pgd_accuracy(
                c.model, self.x, self.y, c.threat, seed=c.recipe.run.seed, device=c.device
            )
            return {self.FAST_AT_KEY: pgd}
        from artplug.evaluate import evaluate

        return evaluate(
            c.model,
            self.x,
            self.y,
            c.threat,
            self.ATTACKS,
            batch_size=c.recipe.eval.batch_size,
            seed=c.recipe.run.seed,
            device=c.device,
        )

    def check(self, epoch: int) -> tuple[dict[str, float], str | None]:
        """Return the epoch's metrics and, on a collapse, a one-line description of it."""
        accuracy = self._measure()
        metrics = {f"overfit/{name}_acc": value for name, value in accuracy.items()}
        before = self.previous
        event = None
        if self.rule == "fast-at":
            previous = before[self.FAST_AT_KEY] if before is not None else 0.0
            pgd = accuracy[self.FAST_AT_KEY]
            if self.fast_at_collapse(previous, pgd, self.drop):
                event = (
                    f"catastrophic overfitting at epoch {epoch} (fast-at rule): PGD-5 accuracy "
                    f"on a fixed training batch of {len(self.x)} in train mode fell "
                    f"{100 * previous:.1f}% -> {100 * pgd:.1f}%"
                )
        elif before is not None and self.artplug_collapse(before, accuracy, self.drop):
            pgd, fgsm = accuracy["pgd-20"], accuracy["fgsm"]
            event = (
                f"catastrophic overfitting at epoch {epoch}: PGD-20 accuracy on "
                f"{len(self.x)} training examples fell {100 * before['pgd-20']:.1f}% -> "
                f"{100 * pgd:.1f}% while FGSM accuracy went {100 * before['fgsm']:.1f}% -> "
                f"{100 * fgsm:.1f}%"
            )
        if event is not None:
            metrics["overfit/detected"] = 1.0
        else:
            # Only a healthy epoch becomes the reference for the next comparison.
            self.previous = accuracy
        return metrics, event


class CheckpointPolicy:
    """Which validated epoch is the best one, and whether validation has stopped improving.

    A validation is scored by ``(robust accuracy, clean accuracy)``, compared in that order:
    robust accuracy under the first non-clean entry of ``eval.attacks`` (the clean accuracy
    when there is none), clean accuracy breaking ties. Only a strictly better score is a new
    best, so among equal scores the earliest epoch wins. ``stale`` counts the validations since
    the last improvement; with ``patience > 0`` the policy is :attr:`exhausted` when it reaches
    ``patience`` (early stopping against robust overfitting, Rice et al. 2020).
    """

    def __init__(self, attacks: list[str], patience: int = 0) -> None:
        robust = [name for name in attacks if name != "clean"]
        self.key = robust[0] if robust else "clean"
        self.patience = patience
        self.best_epoch: int | None = None
        self.best_score: tuple[float, float] | None = None
        self.stale = 0

    def update(self, val: Mapping[str, float], epoch: int) -> bool:
        """Record the validation accuracies of ``epoch``; True when it is the new best."""
        score = (val[self.key], val.get("clean", 0.0))
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch, self.stale = score, epoch, 0
            return True
        self.stale += 1
        return False

    @property
    def exhausted(self) -> bool:
        """True when ``patience`` validations in a row brought no improvement."""
        return self.patience > 0 and self.stale >= self.patience

    def describe(self) -> str:
        """The best score in words, e.g. ``val pgd-20 45.0% (clean 80.1%)``."""
        if self.best_score is None:
            return "no validation yet"
        robust, clean = self.best_score
        if self.key == "clean":
            return f"val clean {100 * robust:.1f}%"
        return f"val {self.key} {100 * robust:.1f}% (clean {100 * clean:.1f}%)"

    def state_dict(self) -> dict[str, Any]:
        """Plain data stored in every checkpoint, so that ``resume`` keeps the best so far."""
        score = list(self.best_score) if self.best_score is not None else None
        return {
            "key": self.key,
            "best_epoch": self.best_epoch,
            "best_score": score,
            "stale": self.stale,
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Undo :meth:`state_dict`; a state scored on another attack is ignored."""
        if not state or state.get("key") != self.key or state.get("best_score") is None:
            return
        robust, clean = state["best_score"]
        self.best_score = (float(robust), float(clean))
        self.best_epoch = int(state["best_epoch"])
        self.stale = int(state.get("stale", 0))


def choose_checkpoint(
    c: Components,
    policy: CheckpointPolicy,
    best_path: Path,
    used: str,
    used_epoch: int,
    epochs_done: int,
) -> tuple[str, int, str]:
    """Load the checkpoint the final evaluation uses into ``c.model``; (file, epoch, reason)."""
    if used == GOOD_CHECKPOINT_NAME:
        # The catastrophic-overfitting stop already restored the last healthy epoch.
        return (
            used,
            used_epoch,
            (
                "the catastrophic-overfitting stop restored the last good checkpoint "
                "(this takes precedence over eval.select)"
            ),
        )
    if c.recipe.eval.select == "last":
        return CHECKPOINT_NAME, epochs_done, "eval.select = 'last'"
    if policy.best_epoch is None:
        return (
            CHECKPOINT_NAME,
            epochs_done,
            (
                "eval.select = 'best' but no validation ran (eval.every_epochs = 0 or an empty "
                "validation split), so the last checkpoint is used"
            ),
        )
    if not best_path.exists():
        return (
            CHECKPOINT_NAME,
            epochs_done,
            (
                f"eval.select = 'best' but {BEST_CHECKPOINT_NAME} is missing from the run folder, "
                "so the last checkpoint is used"
            ),
        )
    if policy.best_epoch != epochs_done:
        c.model.load_state_dict(ckpt.load(best_path)["model"])
    return (
        BEST_CHECKPOINT_NAME,
        policy.best_epoch,
        (f"best robust validation accuracy, {policy.describe()}"),
    )
