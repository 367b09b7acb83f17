"""Train and evaluate every digits twin under recipes/digits/ and print the README table.

Each twin runs end to end through artplug's engine (same seed, batch size, eps and epoch
budget; FreeAT's passes are divided by its replays) and is evaluated by artplug's own ART
evaluation on the full digits test split. Wall time covers training and the final evaluation.

    python benchmarks/digits_twins.py [--only he_pgd,pgd_at] [--dir recipes/digits]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from artplug import engine, workflows
from artplug.plugins import load_plugins
from artplug.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
ORDER = [
    "pgd_at",
    "he_pgd",
    "trades",
    "he_trades",
    "alp",
    "he_alp",
    "free_at",
    "he_free",
    "fast_at",
    "he_fast",
    "sat_silu",
    "sat_gelu",
    "sat_softplus",
    "sat_smoothrelu",
    "sat_backward_only",
    "spat_like_pgd",
    "spat_like_trades",
    "spat_like_he",
    "aalp_like",
    "slat",
]


def main() -> None:
    """Run the twins one after another and print one table row each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated twin names (default: all)")
    parser.add_argument("--dir", default=str(ROOT / "recipes" / "digits"))
    args = parser.parse_args()
    folder = Path(args.dir)
    present = {p.stem for p in folder.glob("*.toml")}
    # The known twins in table order, then any other twin in the folder (alphabetically).
    wanted = [n for n in args.only.split(",") if n] or [n for n in ORDER if n in present] + sorted(
        present - set(ORDER)
    )
    plugins = load_plugins(disabled=())
    print(
        f"digits twins: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, device {engine.select_device('auto')}"
    )
    print("| recipe | techniques | clean % | FGSM % | PGD-20 % | PGD-50 % | wall s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for name in wanted:
            recipe = load_recipe(
                folder / f"{name}.toml",
                plugins.registries,
                [f'run.out_dir="{out}"', 'tracking.backend="none"'],
            )
            started = time.perf_counter()
            result = workflows.train_and_evaluate(engine.build(recipe))
            wall = time.perf_counter() - started
            acc = {k: 100 * v for k, v in result.final.items()}
            print(
                f"| `{folder.name}/{name}.toml` | {recipe.summary()} | {acc['clean']:.1f} | "
                f"{acc['fgsm']:.1f} | {acc['pgd-20']:.1f} | {acc['pgd-50']:.1f} | {wall:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
