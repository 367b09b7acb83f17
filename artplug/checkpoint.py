"""Checkpoints: written atomically after every epoch, read without running code.

A checkpoint is a ``torch.save`` file holding only tensors and plain data (dicts, lists,
tuples, strings, numbers, ``None``), so :func:`load` reads it with ``torch.load(...,
weights_only=True)``: a crafted file cannot run code when it is evaluated or resumed, even one
downloaded from a shared MLflow server. The random generator states, which Python and NumPy
give as objects, are stored as plain data (:func:`rng_states`) and converted back exactly.

Format history (``format_version`` in every file):

1. RNG states pickled as Python/NumPy objects; readable only with ``allow_unsafe_pickle``
   (``--allow-unsafe-pickle`` on the command line), which runs the pickle's code.
2. Only tensors and plain data; always read with the safe loader.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from collections import Counter, OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from artplug.errors import CheckpointError

FORMAT_VERSION = 2

#: What to check a loaded payload for: ``"eval"`` (a recipe and model weights) or ``"resume"``
#: (also the epoch, step, optimizer and random generator states to continue training).
Purpose = Literal["eval", "resume"]

UNSAFE_FLAG = "--allow-unsafe-pickle"

# Before torch 2.6 the weights-only unpickler could be made to run code (CVE-2025-32434), so
# there "safe" loading is not safe: refuse instead (the opt-in flag still works).
SAFE_LOADER = bool(torch.__version__ >= "2.6")
_FIX = "pass a checkpoint-*.pt file written by artplug"

# The Mersenne Twister state: 624 32-bit words plus a position (Python keeps it as word 625).
_MT_WORDS = 624
_WORD = 2**32

# Exactly the types the weights-only unpickler rebuilds without code (see its allowlist in
# torch/_weights_only_unpickler.py); a subclass (a defaultdict, a str enum) would need its class.
_PLAIN = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    torch.dtype,
    torch.device,
)
_CONTAINERS = (dict, OrderedDict, Counter, list, tuple, set, torch.Size)


def rng_states() -> dict[str, Any]:
    """The state of every random generator a run uses (Python, NumPy, torch CPU and CUDA).

    Plain data only (format 2): Python's ``random.getstate()`` tuple and NumPy's legacy
    ``get_state()`` tuple become dicts of ints, lists of ints and floats, which the safe loader
    accepts; :func:`restore_rng_states` rebuilds the exact original states.
    """
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(name),
            # uint32 words as Python ints: exact, and no NumPy object in the pickle.
            "key": [int(word) for word in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Undo :func:`rng_states`; CUDA states are restored only when CUDA is present.

    Also accepts the format-1 form (the tuples of ``random.getstate()`` and
    ``np.random.get_state()``) that an opted-in unsafe load of an old checkpoint gives.
    """
    python = states["python"]
    if isinstance(python, Mapping):
        python = (int(python["version"]), tuple(python["state"]), python["gauss_next"])
    random.setstate(python)
    numpy_state = states["numpy"]
    if isinstance(numpy_state, Mapping):
        numpy_state = (
            numpy_state["bit_generator"],
            np.array(numpy_state["key"], dtype=np.uint32),
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _plain_rng(states: Mapping[str, Any]) -> Mapping[str, Any]:
    """Format-1 RNG states (tuples with a NumPy array) as format-2 plain data; else unchanged."""
    python, numpy_state = states.get("python"), states.get("numpy")
    if not isinstance(python, tuple) and not isinstance(numpy_state, tuple):
        return states
    out = dict(states)
    if isinstance(python, tuple):
        out["python"] = {"version": python[0], "state": list(python[1]), "gauss_next": python[2]}
    if isinstance(numpy_state, tuple):
        name, key, pos, has_gauss, cached = numpy_state
        out["numpy"] = {
            "bit_generator": str(name),
            "key": [int(word) for word in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return out


def _check_plain(value: Any, where: str) -> None:
    """TypeError naming ``where`` when ``value`` holds anything but tensors and plain data."""
    kind = type(value)
    if kind in _PLAIN or kind in (torch.Tensor, torch.nn.Parameter):
        return
    if kind in _CONTAINERS:
        if isinstance(value, dict):
            for key, item in value.items():
                _check_plain(key, f"{where} key {key!r}")
                _check_plain(item, f"{where}.{key}")
        else:
            for index, item in enumerate(value):
                _check_plain(item, f"{where}[{index}]")
        return
    raise TypeError(
        f"checkpoint entry {where} is a {kind.__module__}.{kind.__qualname__}; checkpoints hold "
        "only tensors and plain data (dict, list, tuple, str, int, float, bool, None) so that "
        "they load without running code (a technique's state_dict() must return such data)"
    )


def save_atomic(payload: Mapping[str, Any], path: Path) -> None:
    """Write ``payload`` with ``torch.save`` so that ``path`` is never half-written.

    The file is stamped with the current :data:`FORMAT_VERSION` (format-1 RNG states in the
    payload are converted to plain data first). Anything but tensors and plain data raises
    TypeError before the file is touched: such a file could only be read by running code.
    The data goes to a temporary file in the same folder, is flushed to disk, and then renamed
    over ``path``; a crash or Ctrl-C at any moment leaves either the old or the new checkpoint.
    """
    body = {**payload, "format_version": FORMAT_VERSION}
    if isinstance(body.get("rng"), Mapping):
        body["rng"] = _plain_rng(body["rng"])
    _check_plain(body, "payload")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(body, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load(
    path: str | Path,
    *,
    purpose: Purpose = "eval",
    allow_unsafe_pickle: bool = False,
    source: str | None = None,
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic` without running code in it.

    The file is read with ``torch.load(..., weights_only=True)``. A file whose pickle needs
    code to be rebuilt (a format-1 checkpoint with NumPy RNG state, or a crafted file) is
    refused with a CheckpointError, unless ``allow_unsafe_pickle`` is set: then, and only
    after the safe load failed, it is read with ``weights_only=False``, which runs whatever
    code the file holds. Under torch < 2.6, whose weights-only loader is not safe, every file
    is refused unless ``allow_unsafe_pickle`` is set. The payload is then checked for
    ``purpose`` (:func:`check_payload`).
    ``source`` names the file in error messages (default: the path). Raises CheckpointError,
    one line, on anything wrong.
    """
    file = Path(path)
    name = source if source is not None else str(file)
    if not file.is_file():
        raise CheckpointError(f"{name}: checkpoint not found")
    if not SAFE_LOADER and not allow_unsafe_pickle:
        raise CheckpointError(
            f"{name}: refused to load: torch {torch.__version__} cannot read files without "
            f"risking code execution (CVE-2025-32434); install torch>=2.6, or rerun with "
            f"{UNSAFE_FLAG} for a checkpoint you wrote yourself"
        )
    if not SAFE_LOADER:
        return check_payload(_load_unsafe(file, name), name, purpose)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler stops at the first global (callable or class) outside its
        # allowlist and names it ("GLOBAL numpy...", "GLOBAL posix.system whose module..."):
        # rebuilding it would mean calling it, i.e. running code from the file.
        found = re.search(r"\bGLOBAL ([\w.]+)", str(exc))
        if found is None:
            raise CheckpointError(
                f"{name}: not a readable checkpoint (UnpicklingError); {_FIX}"
            ) from None
        if not allow_unsafe_pickle:
            raise CheckpointError(
                f"{name}: refused to load: the file needs pickle code execution (it imports "
                f"{found.group(1)}); if it is an artplug format-1 checkpoint you wrote "
                f"yourself, rerun with {UNSAFE_FLAG}"
            ) from None
        payload = _load_unsafe(file, name)
    except Exception as exc:
        raise CheckpointError(
            f"{name}: not a readable checkpoint ({type(exc).__name__}); {_FIX}"
        ) from None
    return check_payload(payload, name, purpose)


def _load_unsafe(file: Path, name: str) -> Any:
    """``torch.load`` with full pickle: runs code from the file; only behind the opt-in flag."""
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"{name}: not a readable checkpoint ({type(exc).__name__}); {_FIX}"
        ) from None


def _describe(value: Any) -> str:
    """``value``'s type in words for an error message (``a str``, ``an int``, ``None``)."""
    if value is None:
        return "None"
    kind = type(value).__name__
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_words(value: Any, length: int, bound: int) -> bool:
    """A list of ``length`` ints in ``[0, bound)``."""
    return (
        isinstance(value, list)
        and len(value) == length
        and all(_is_int(word) and 0 <= word < bound for word in value)
    )


def _rng_problem(states: Any, format_version: int) -> str | None:
    """What is wrong with a checkpoint's ``rng`` entry, or None when it can be restored."""
    if not isinstance(states, dict):
        return f"is {_describe(states)}, expected a dict of generator states"
    missing = [key for key in ("python", "numpy", "torch") if key not in states]
    if missing:
        return f"has no {', '.join(map(repr, missing))} state"
    python, numpy_state, torch_state = states["python"], states["numpy"], states["torch"]
    if format_version < 2 and isinstance(python, tuple) and isinstance(numpy_state, tuple):
        pass  # the format-1 objects, read through the opt-in unsafe load
    else:
        if not (
            isinstance(python, dict)
            and _is_int(python.get("version"))
            and _is_words(python.get("state"), _MT_WORDS + 1, _WORD)
            and isinstance(python.get("gauss_next"), float | None)
        ):
            return "has a malformed 'python' state (expected version, 625 state words, gauss_next)"
        if not (
            isinstance(numpy_state, dict)
            and numpy_state.get("bit_generator") == "MT19937"
            and _is_words(numpy_state.get("key"), _MT_WORDS, _WORD)
            and _is_int(numpy_state.get("pos"))
            and 0 <= numpy_state["pos"] <= _MT_WORDS
            and _is_int(numpy_state.get("has_gauss"))
            and isinstance(numpy_state.get("cached_gaussian"), float)
        ):
            return "has a malformed 'numpy' state (expected MT19937 key, pos, has_gauss, gauss)"
    if not (isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8):
        return f"has a 'torch' state that is {_describe(torch_state)}, expected a uint8 tensor"
    cuda = states.get("cuda")
    if cuda is not None and not (
        isinstance(cuda, list | tuple)
        and all(isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in cuda)
    ):
        return "has a 'cuda' state that is not a list of uint8 tensors"
    return None


def check_payload(payload: Any, source: str, purpose: Purpose = "eval") -> dict[str, Any]:
    """``payload`` if it has the keys and types ``purpose`` needs; else a one-line CheckpointError.

    Every purpose needs ``format_version`` (an int this artplug can read), ``recipe`` (a
    table) and ``model`` (a dict of tensors); ``epoch`` and ``step`` must be ints >= 0 where
    present and ``tracking_run_id`` a string or None. ``"resume"`` also needs ``epoch``,
    ``step``, ``optimizer`` (a state dict) and ``rng`` (the generator states), and checks the
    optional ``scaler``, ``perturbation``, ``selection`` (dicts or None) and ``cost`` (a list
    or None). The message names the file, the key, what was found and the fix.
    """

    def fail(key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{source}: '{key}' {problem}; {_FIX}")

    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{source}: not an artplug checkpoint (it holds {_describe(payload)}, not a dict); "
            f"{_FIX}"
        )
    if "format_version" not in payload:
        raise CheckpointError(f"{source}: not an artplug checkpoint (no 'format_version'); {_FIX}")
    version = payload["format_version"]
    if not _is_int(version) or version < 1:
        raise fail("format_version", f"is {version!r}, expected an int >= 1")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: written by a newer artplug (format {version}, this one reads up to "
            f"{FORMAT_VERSION}); upgrade artplug"
        )
    required = ["recipe", "model"]
    if purpose == "resume":
        required += ["epoch", "step", "optimizer", "rng"]
    for key in required:
        if key not in payload:
            raise CheckpointError(f"{source}: no '{key}' entry ({purpose} needs it); {_FIX}")
    if not isinstance(payload["recipe"], dict):
        raise fail("recipe", f"is {_describe(payload['recipe'])}, expected a table (dict)")
    model = payload["model"]
    if not isinstance(model, dict) or not model:
        found = "an empty dict" if isinstance(model, dict) else _describe(model)
        raise fail("model", f"is {found}, expected a dict of tensors (a model state_dict)")
    for name, value in model.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise fail(
                "model", f"entry {name!r} is {_describe(value)}, expected a tensor (a state_dict)"
            )
    for key in ("epoch", "step"):
        if key in payload and not (_is_int(payload[key]) and payload[key] >= 0):
            raise fail(key, f"is {payload[key]!r}, expected an int >= 0")
    run_id = payload.get("tracking_run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise fail("tracking_run_id", f"is {_describe(run_id)}, expected a string or None")
    if purpose == "resume":
        optimizer = payload["optimizer"]
        if not (
            isinstance(optimizer, dict)
            and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)
        ):
            raise fail(
                "optimizer",
                f"is {_describe(optimizer)} without 'state' and 'param_groups', expected an "
                "optimizer state_dict",
            )
        problem = _rng_problem(payload["rng"], version)
        if problem is not None:
            raise fail("rng", problem)
        for key in ("scaler", "perturbation", "selection"):
            if payload.get(key) is not None and not isinstance(payload[key], dict):
                raise fail(key, f"is {_describe(payload[key])}, expected a dict or None")
        cost = payload.get("cost")
        if cost is not None and not (
            isinstance(cost, list) and all(isinstance(e, dict) for e in cost)
        ):
            raise fail("cost", f"is {_describe(cost)}, expected a list of dicts or None")
    return payload
