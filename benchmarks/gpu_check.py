"""Check artplug on a CUDA machine, once: GPU tests, training speed per precision, overhead, DDP.

Run it on a machine with one or more NVIDIA GPUs, from the repository root::

    python benchmarks/gpu_check.py                 # everything; the report goes to gpu_check.md
    python benchmarks/gpu_check.py --out report.md --skip overhead

Steps (each one a subprocess, so that a crash in one does not end the check):

1. ``tests``: ``pytest -m gpu`` (the tests that need a CUDA device);
2. ``speed``: one epoch of PreAct ResNet-18 with FastAT (``recipes/fast_at.toml``) and with
   PGD-AT (``recipes/pgd_at.toml``, PGD-10) on synthetic CIFAR-shaped data (49,000 training
   examples, no dataset files needed) at batch 512, in fp32, bf16 and fp16: examples per second
   and peak GPU memory of each, read from the run's ``metrics.jsonl``;
3. ``overhead``: ``benchmarks/overhead.py --device cuda``: artplug's engine against a
   hand-written PyTorch loop (and ART) on the same work;
4. ``ddp``: the PGD-AT bf16 epoch with ``artplug run --nproc K`` on all K visible GPUs against
   one GPU (skipped with one GPU, or when this artplug has no ``--nproc``).

The report is a markdown document (a table per step), printed and written to ``--out``.

Exit status: 0 when every step that ran passed; 1 when a step failed (its row says why);
2 when the check cannot run: no CUDA device (the message says how to exercise the script on
a CPU), or bad options.

``--dry-run`` (the same as ``--device cpu --tiny``) runs the speed step on the CPU with a tiny
synthetic dataset (3x8x8) and a small CNN, and reports the other steps as skipped: it
exercises the script's code, it measures nothing. Each configuration is one ``artplug run``
(seconds); ``--technique`` and ``--precision`` narrow the speed step to some of them
(``tests/test_gpu_check.py`` runs one).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "speed", "overhead", "ddp")
TECHNIQUES = {"FastAT": "fast_at.toml", "PGD-AT": "pgd_at.toml"}
PRECISIONS = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}
BATCH = 512
NO_CUDA_EXIT = 2


@dataclass
class Settings:
    """What to run and where (from the command line)."""

    device: str
    tiny: bool
    out: Path
    skip: frozenset[str]
    timeout_s: float
    techniques: tuple[str, ...] = tuple(TECHNIQUES)
    precisions: tuple[str, ...] = tuple(PRECISIONS)


@dataclass
class Section:
    """One step of the report: a title, a markdown table (or a note) and whether it passed."""

    title: str
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ok: bool = True

    def markdown(self) -> str:
        """The section as markdown."""
        lines = [f"## {self.title}", ""]
        if self.headers:
            lines.append("| " + " | ".join(self.headers) + " |")
            lines.append("|" + "|".join("---" for _ in self.headers) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in self.rows]
            lines.append("")
        lines += [*self.notes, ""] if self.notes else []
        return "\n".join(lines)


def skipped(title: str, why: str) -> Section:
    """A section for a step that did not run."""
    return Section(title, notes=[f"Skipped: {why}."])


# ------------------------------------------------------------------------------------------
# Subprocesses


@dataclass
class Done:
    """A finished subprocess: exit code (None after a timeout), output and wall time."""

    code: int | None
    output: str
    seconds: float

    def tail(self, lines: int = 1) -> str:
        """The last non-empty lines of the output, joined (for a table cell)."""
        found = [line.strip() for line in self.output.splitlines() if line.strip()]
        return " / ".join(found[-lines:]).replace("|", "\\|") if found else "(no output)"

    def error(self) -> str:
        """Why it failed, in one line: its ``Error:`` line, else its last line."""
        if self.code is None:
            return f"timed out after {self.seconds:.0f} s"
        for line in reversed(self.output.splitlines()):
            if line.startswith("Error: "):
                return line.removeprefix("Error: ").replace("|", "\\|")
        return f"exit status {self.code}: {self.tail()}"


def run(command: Sequence[str], timeout_s: float, env: dict[str, str] | None = None) -> Done:
    """Run ``command`` from the repository root, output captured, within ``timeout_s``."""
    print(f"$ {shlex.join(command)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    environment = {**os.environ, "ARTPLUG_NO_BUSY_HINT": "1", **(env or {})}
    try:
        done = subprocess.run(
            list(command),
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout if isinstance(exc.stdout, str) else ""
        return Done(None, output, time.perf_counter() - started)
    return Done(done.returncode, done.stdout + done.stderr, time.perf_counter() - started)


def artplug_help_has(option: str) -> bool:
    """Whether ``artplug run --help`` lists ``option`` (``--nproc`` comes from a later change)."""
    done = run([sys.executable, "-m", "artplug", "run", "--help"], 120)
    return done.code == 0 and option in done.output


# ------------------------------------------------------------------------------------------
# Step 1: the gpu-marked tests


def step_tests(s: Settings) -> Section:
    """``pytest -m gpu``: passed, failed and skipped counts."""
    title = "GPU tests (`pytest -m gpu`)"
    if s.tiny:
        return skipped(title, "--tiny / --dry-run")
    done = run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], s.timeout_s
    )
    summary = done.tail()
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    section = Section(title, ["passed", "failed", "skipped", "errors", "wall", "pytest says"])
    section.rows.append(
        [
            str(counts.get("passed", 0)),
            str(counts.get("failed", 0)),
            str(counts.get("skipped", 0)),
            str(counts.get("error", 0)),
            f"{done.seconds:.0f} s",
            summary,
        ]
    )
    # pytest exits 5 when no test is selected: nothing failed, but say so.
    section.ok = done.code in (0, 5)
    if done.code == 5:
        section.notes.append("No test is marked `gpu` in this checkout.")
    elif not section.ok:
        section.notes.append(f"pytest failed: {done.error()}")
    return section


# ------------------------------------------------------------------------------------------
# Step 2: one epoch per technique and precision


def speed_overrides(s: Settings, amp: str, out_dir: Path) -> list[str]:
    """The ``--set`` overrides of a speed run: synthetic data, batch 512, one epoch, cheap eval."""
    sets = [
        "data.dataset=synthetic",
        "data.paper_parity=false",  # a throughput measurement, not a reproduction
        f"run.amp={amp}",
        "run.epochs=1",
        "run.log_every=50",
        f'run.out_dir="{out_dir}"',
        "eval.every_epochs=0",
        'eval.final_attacks=["clean"]',
        'eval.overfit_check="off"',
        "eval.test_examples=512",
    ]
    if s.tiny:
        # A few seconds on a CPU: the code path, not a measurement.
        return [
            *sets,
            "data.batch_size=32",
            "data.synthetic.train_size=96",
            "data.synthetic.test_size=32",
            "data.synthetic.shape=[3,8,8]",
            'model.arch="small-cnn"',
            f'run.device="{s.device}"',
            "run.threads=1",
            "eval.test_examples=32",
        ]
    return [*sets, f"data.batch_size={BATCH}", 'model.arch="preact-resnet18"', 'run.device="cuda"']


def epoch_metrics(out_dir: Path) -> dict[str, float]:
    """The last epoch's ``cost/*`` line of the one run folder under ``out_dir``."""
    folders = [p for p in out_dir.iterdir() if (p / "metrics.jsonl").is_file()]
    if len(folders) != 1:
        raise RuntimeError(f"expected one run folder in {out_dir}, found {len(folders)}")
    found: dict[str, float] = {}
    for line in (folders[0] / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "cost/epoch_s" in record:
            found = record
    if not found:
        raise RuntimeError(f"no epoch metrics in {folders[0] / 'metrics.jsonl'}")
    return found


@dataclass
class SpeedResult:
    """One epoch of one configuration."""

    examples_per_s: float | None
    epoch_s: float | None
    peak_mb: float | None
    error: str | None = None


def train_one_epoch(
    s: Settings, recipe: str, amp: str, extra_args: Sequence[str] = (), examples: int = 0
) -> SpeedResult:
    """``artplug run`` of one epoch; examples/s over ``examples`` (the epoch's, all ranks)."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        out_dir = Path(scratch)
        command = [sys.executable, "-m", "artplug", "run", str(ROOT / "recipes" / recipe)]
        for override in speed_overrides(s, amp, out_dir):
            command += ["--set", override]
        command += ["--no-track", "-q", *extra_args]
        done = run(command, s.timeout_s)
        if done.code != 0:
            return SpeedResult(None, None, None, done.error())
        try:
            metrics = epoch_metrics(out_dir)
        except (OSError, RuntimeError, ValueError) as exc:
            return SpeedResult(None, None, None, str(exc))
    seconds = float(metrics["cost/epoch_s"])
    rate = examples / seconds if examples else float(metrics["cost/examples_per_s"])
    peak = metrics.get("cost/peak_memory_mb")
    return SpeedResult(rate, seconds, None if peak is None else float(peak))


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} MiB"


def epoch_examples(s: Settings) -> int:
    """Training examples per epoch: full batches of the synthetic train split (drop_last)."""
    train, val, batch = (96, 9, 32) if s.tiny else (50_000, 1_000, BATCH)
    return (train - val) // batch * batch


def step_speed(s: Settings) -> Section:
    """FastAT and PGD-AT, fp32 / bf16 / fp16: examples per second and peak memory."""
    model = "small-cnn, tiny synthetic data" if s.tiny else "PreAct ResNet-18"
    title = f"Training speed: one epoch, {model}, batch {32 if s.tiny else BATCH}"
    section = Section(title, ["technique", "precision", "examples/s", "epoch", "peak memory"])
    examples = epoch_examples(s)
    for technique in s.techniques:
        for precision in s.precisions:
            recipe, amp = TECHNIQUES[technique], PRECISIONS[precision]
            result = train_one_epoch(s, recipe, amp, examples=examples)
            if result.error is not None:
                section.ok = False
                section.rows.append([technique, precision, "failed", result.error, ""])
                continue
            section.rows.append(
                [
                    technique,
                    precision,
                    f"{result.examples_per_s:,.0f}",
                    f"{result.epoch_s:.1f} s",
                    _mib(result.peak_mb),
                ]
            )
    section.notes.append(
        f"{examples:,} training examples per epoch (synthetic, `data.paper_parity=false`); "
        "the first epoch includes cuDNN's autotuning. FastAT: FGSM-RS, BN in train mode for the "
        "attack; PGD-AT: PGD-10. Peak memory: the run's `cost/peak_memory_mb`, on CUDA "
        "`torch.cuda.max_memory_allocated` during the epoch (on a CPU the process's peak RSS)."
    )
    return section


# ------------------------------------------------------------------------------------------
# Step 3: engine overhead


def step_overhead(s: Settings) -> Section:
    """``benchmarks/overhead.py --device cuda``: its ratio line."""
    title = "Engine overhead (`benchmarks/overhead.py --device cuda`)"
    if s.tiny:
        return skipped(title, "--tiny / --dry-run")
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "overhead.py"),
        "--device",
        "cuda",
        "--model",
        "preact-resnet18",
        "--batch-size",
        "128",
    ]
    done = run(command, s.timeout_s)
    section = Section(title, ["artplug / hand-written", "ART / hand-written", "wall"])
    found = re.search(r"artplug/hand-written = ([\d.]+) .*ART/hand-written = ([\d.]+)", done.output)
    if done.code != 0 or found is None:
        section.ok = False
        section.notes.append(f"overhead.py failed: {done.error()}")
        return section
    section.rows.append([found.group(1), found.group(2), f"{done.seconds:.0f} s"])
    section.notes.append(
        "PGD-10 adversarial training of PreAct ResNet-18 on digits, batch 128, fp32, median of "
        "repeated runs; the target for artplug / hand-written is <= 1.05."
    )
    section.notes += [f"    {line}" for line in done.output.splitlines() if "|" in line]
    return section


# ------------------------------------------------------------------------------------------
# Step 4: data-parallel on every GPU


def gpu_count() -> int:
    """Visible CUDA devices (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def step_ddp(s: Settings) -> Section:
    """PGD-AT bf16, one epoch: ``--nproc K`` on every GPU against one GPU."""
    title = "Data-parallel: `artplug run --nproc K` against one GPU"
    if s.tiny:
        return skipped(title, "--tiny / --dry-run")
    count = gpu_count()
    if count < 2:
        return skipped(title, f"{count} GPU visible; DDP needs at least 2")
    if not artplug_help_has("--nproc"):
        return skipped(title, "this artplug's `run` has no --nproc option")
    section = Section(
        title, ["processes", "examples/s", "epoch", "peak memory (rank 0)", "speed-up"]
    )
    examples = epoch_examples(s)
    single = train_one_epoch(s, TECHNIQUES["PGD-AT"], "bf16", examples=examples)
    spread = train_one_epoch(
        s, TECHNIQUES["PGD-AT"], "bf16", ["--nproc", str(count)], examples=examples
    )
    for processes, result in (("1", single), (str(count), spread)):
        if result.error is not None or result.examples_per_s is None:
            section.ok = False
            section.rows.append([processes, "failed", result.error or "", "", ""])
            continue
        speedup = (
            f"{result.examples_per_s / single.examples_per_s:.2f}x"
            if single.examples_per_s
            else "-"
        )
        section.rows.append(
            [
                processes,
                f"{result.examples_per_s:,.0f}",
                f"{result.epoch_s:.1f} s",
                _mib(result.peak_mb),
                speedup,
            ]
        )
    section.notes.append(
        f"PGD-AT (PGD-10), PreAct ResNet-18, bf16, global batch {BATCH}; ideal speed-up {count}x."
    )
    return section


# ------------------------------------------------------------------------------------------
# Main


def environment(s: Settings) -> Section:
    """Versions and devices."""
    import torch

    section = Section("Environment", ["item", "value"])
    section.rows.append(["date", datetime.datetime.now().isoformat(timespec="seconds")])
    section.rows.append(["host", platform.node()])
    section.rows.append(["python", platform.python_version()])
    section.rows.append(["torch", f"{torch.__version__} (CUDA {torch.version.cuda})"])
    if s.device == "cuda":
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            memory = props.total_memory / 2**30
            section.rows.append([f"cuda:{index}", f"{props.name}, {memory:.0f} GiB"])
    else:
        section.rows.append(["device", "cpu (--tiny: the code path only, no measurement)"])
    return section


def parse_args(argv: Sequence[str] | None) -> Settings:
    """The command line as :class:`Settings`."""
    parser = argparse.ArgumentParser(
        description="Check artplug on a CUDA machine: GPU tests, speed per precision, "
        "engine overhead and DDP; writes a markdown report."
    )
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"), help="report file")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny synthetic data and a small CNN (with --device cpu: a few seconds)",
    )
    parser.add_argument("--dry-run", action="store_true", help="the same as --device cpu --tiny")
    parser.add_argument(
        "--skip", action="append", default=[], choices=STEPS, help="leave out a step (repeat)"
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds allowed per subprocess"
    )
    parser.add_argument(
        "--technique",
        action="append",
        choices=tuple(TECHNIQUES),
        help="only this technique in the speed step (repeat; default: all)",
    )
    parser.add_argument(
        "--precision",
        action="append",
        choices=tuple(PRECISIONS),
        help="only this precision in the speed step (repeat; default: all)",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu needs --tiny (a full check on a CPU would take days)")
    return Settings(
        args.device,
        args.tiny,
        args.out,
        frozenset(args.skip),
        args.timeout,
        tuple(args.technique or TECHNIQUES),
        tuple(args.precision or PRECISIONS),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; 0 all passed, 1 a step failed, 2 no CUDA device (or bad options)."""
    s = parse_args(argv)
    import torch

    if s.device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device here (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}); this script checks a GPU machine. To exercise "
            "it on a CPU: python benchmarks/gpu_check.py --dry-run",
            file=sys.stderr,
        )
        return NO_CUDA_EXIT
    steps = {"tests": step_tests, "speed": step_speed, "overhead": step_overhead, "ddp": step_ddp}
    sections = [environment(s)]
    for name, step in steps.items():
        if name in s.skip:
            sections.append(skipped(name, "--skip"))
            continue
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        sections.append(step(s))
    failed = [section.title for section in sections if not section.ok]
    verdict = "all steps passed" if not failed else f"FAILED: {'; '.join(failed)}"
    report = "\n".join(
        [f"# artplug GPU check ({verdict})", "", *(section.markdown() for section in sections)]
    )
    print(report)
    s.out.write_text(report, encoding="utf-8")
    print(f"gpu_check: report written to {s.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
