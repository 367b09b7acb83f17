"""How much lower is the default final evaluation's worst case than PGD-20 alone, at what cost?

For each recipe (default: the quickstart and the two hypersphere-embedding digits twins), trains
the recipe once with ``artplug run`` (or takes a finished run folder given with ``--run-dir``),
then evaluates the same checkpoint twice with ``artplug eval``:

1. ``pgd-20`` suite: ``--attack clean --attack pgd-20``, the old habit of quoting PGD alone;
2. default suite: the entries of ``[eval] final_attacks``'s default
   (:data:`artplug.recipe.DEFAULT_FINAL_ATTACKS`: ``clean``, ``pgd-20``, ``apgd-ce``,
   ``apgd-dlr``), scored as the per-example worst case over them (``worst`` in ``eval.json``).

and, with ``--autoattack`` (needs ``pip install 'artplug[autoattack]'``), a third time with the
standard AutoAttack (``--attack clean --attack autoattack``) as the reference the default suite
approximates; then prints a markdown table: the accuracies, the gap ``pgd-20 - worst`` in
points, and the wall time of each ``artplug eval`` process (model rebuild and data loading
included; they are the same in both, so the difference is the time the stronger suite adds).

Training is run with ``--set eval.sanity=false --set 'eval.final_attacks=["clean"]'`` (the
measurement is the two ``artplug eval`` calls, not the run's own final evaluation) and
``--no-track``; run folders go under ``--out-root`` (a temporary folder by default, deleted at
the end unless ``--keep``).

Usage::

    python benchmarks/eval_suite.py [--recipe PATH]... [--run-dir DIR]... [--threads T]
        [--out-root DIR] [--keep] [--autoattack]

``--threads`` is passed to every ``artplug`` call (default 1: on a shared 2-core machine one
thread per process is the fastest and the least noisy). The exit code is 0 whatever the numbers
(this is a measurement, not a test); 2 when a run or an evaluation fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import load_average

from artplug.recipe import DEFAULT_FINAL_ATTACKS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPES = (
    "recipes/quickstart.toml",
    "recipes/digits/he_pgd.toml",
    "recipes/digits/he_trades.toml",
)
PGD_SUITE = ("clean", "pgd-20")


@dataclass
class Measured:
    """The two evaluations of one checkpoint."""

    label: str
    pgd: dict[str, float]
    full: dict[str, float]
    pgd_s: float
    full_s: float
    n_examples: int
    autoattack: float | None = None
    autoattack_s: float | None = None


def _artplug(args: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``python -m artplug ARGS`` from the repository root; ``(seconds, process)``."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "artplug", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(2)
    return elapsed, proc


def train(recipe: str, out_root: Path, threads: int) -> Path:
    """Train ``recipe`` once (no tracking, no sanity gate, clean-only final evaluation)."""
    out_dir = out_root / Path(recipe).stem
    seconds, _ = _artplug(
        [
            "run",
            recipe,
            "--threads",
            str(threads),
            "--no-track",
            "-q",
            "--set",
            f"run.out_dir={json.dumps(str(out_dir))}",
            "--set",
            "eval.sanity=false",
            "--set",
            'eval.final_attacks=["clean"]',
        ]
    )
    (run_dir,) = [p for p in out_dir.iterdir() if p.is_dir()]
    print(f"trained {recipe} in {seconds:.0f}s: {run_dir}", file=sys.stderr)
    return run_dir


def evaluate(
    run_dir: Path, attacks: tuple[str, ...], out: Path, threads: int
) -> tuple[float, dict[str, Any]]:
    """``artplug eval RUN_DIR --attack ...``; ``(wall seconds, eval.json)``."""
    args = ["eval", str(run_dir), "--no-track", "-q", "--threads", str(threads), "--out", str(out)]
    for name in attacks:
        args += ["--attack", name]
    seconds, _ = _artplug(args)
    return seconds, json.loads((out / "eval.json").read_text("utf-8"))


def measure(
    label: str, run_dir: Path, scratch: Path, threads: int, autoattack: bool = False
) -> Measured:
    """Evaluate ``run_dir`` with the PGD-20 suite, the default suite and maybe AutoAttack."""
    pgd_s, pgd = evaluate(run_dir, PGD_SUITE, scratch / f"{label}-pgd", threads)
    suite = tuple(DEFAULT_FINAL_ATTACKS)
    full_s, full = evaluate(run_dir, suite, scratch / f"{label}-full", threads)
    measured = Measured(
        label, pgd["accuracy"], full["accuracy"], pgd_s, full_s, int(full["n_examples"])
    )
    if autoattack:
        aa_s, aa = evaluate(run_dir, ("clean", "autoattack"), scratch / f"{label}-aa", threads)
        measured.autoattack, measured.autoattack_s = aa["accuracy"]["autoattack"], aa_s
    return measured


def table(rows: list[Measured]) -> str:
    """The markdown table of the measurements."""
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    with_aa = any(m.autoattack is not None for m in rows)
    lines = [
        "| recipe | n | clean | pgd-20 | apgd-ce | apgd-dlr | worst (default suite) "
        "| gap (points) | time pgd-20 suite | time default suite | added |"
        + (" AutoAttack (standard) | time AutoAttack |" if with_aa else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if with_aa else ""),
    ]
    for m in rows:
        worst = m.full.get("worst", min(v for k, v in m.full.items() if k != "clean"))
        gap = 100 * (m.pgd["pgd-20"] - worst)
        lines.append(
            f"| {m.label} | {m.n_examples} | {pct(m.full['clean'])} | {pct(m.pgd['pgd-20'])} "
            f"| {pct(m.full['apgd-ce'])} | {pct(m.full['apgd-dlr'])} | {pct(worst)} "
            f"| {gap:.2f} | {m.pgd_s:.1f}s | {m.full_s:.1f}s | +{m.full_s - m.pgd_s:.1f}s |"
            + (
                f" {pct(m.autoattack)} | {m.autoattack_s:.1f}s |"
                if m.autoattack is not None and m.autoattack_s is not None
                else (" n/a | n/a |" if with_aa else "")
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the options, train or take the run folders, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", default=None, help="recipe to train")
    parser.add_argument("--run-dir", action="append", default=[], help="finished run folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-root", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    parser.add_argument(
        "--autoattack", action="store_true", help="also run the standard AutoAttack (reference)"
    )
    options = parser.parse_args(argv)
    recipes = options.recipe if options.recipe is not None else []
    if options.recipe is None and not options.run_dir:
        recipes = list(DEFAULT_RECIPES)
    out_root = options.out_root or Path(tempfile.mkdtemp(prefix="artplug-eval-suite-"))
    out_root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(options.threads))
    try:
        targets = [(r, train(r, out_root, options.threads)) for r in recipes]
        targets += [(Path(d).name, Path(d)) for d in options.run_dir]
        scratch = out_root / "evals"
        rows = [
            measure(label, run_dir, scratch, options.threads, options.autoattack)
            for label, run_dir in targets
        ]
    finally:
        if not options.keep:
            shutil.rmtree(out_root, ignore_errors=True)
    print(
        f"default suite = {', '.join(DEFAULT_FINAL_ATTACKS)}; worst = per-example worst case "
        f"over them; gap = pgd-20 - worst. artplug eval --threads {options.threads}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load_average()} at the end; times are whole `artplug eval` processes."
    )
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
