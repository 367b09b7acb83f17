"""The ``synthetic`` dataset: generated from the seed on the device, configurable, refused where
a recipe claims paper parity."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
from clitools import run_main, write_recipe

from artplug.data import SyntheticSpec, dataset_shape, load_dataset, make_synthetic
from artplug.errors import DataError, RecipeError
from artplug.recipe import resolve
from artplug.testing import digits_recipe

ROOT = Path(__file__).resolve().parents[1]
SMALL = SyntheticSpec(shape=(3, 16, 16), num_classes=4, train_size=400, test_size=120)


def test_defaults_are_cifar_shaped():
    assert dataset_shape("synthetic") == ((3, 32, 32), 10)
    assert SyntheticSpec() == SyntheticSpec((3, 32, 32), 10, 50_000, 10_000)
    assert dataset_shape("synthetic", SMALL) == ((3, 16, 16), 4)


def test_splits_shapes_range_and_statistics():
    data = make_synthetic(SMALL, seed=3)
    x_train, y_train = data.train
    assert data.name == "synthetic" and data.num_classes == 4 and data.input_shape == (3, 16, 16)
    # val defaults to a tenth of train (at most 1000), taken out of train.
    assert len(data.val[0]) == 40 and len(x_train) == 360 and len(data.test[0]) == 120
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert x_train.shape == (360, 3, 16, 16)
    everything = torch.cat([x_train, data.val[0], data.test[0]])
    assert everything.min() >= 0.0 and everything.max() <= 1.0
    labels = torch.cat([y_train, data.val[1], data.test[1]])
    assert torch.bincount(labels).tolist() == [130, 130, 130, 130]  # balanced overall
    assert not torch.equal(labels, torch.arange(len(labels)) % 4)  # shuffled
    mean = x_train.transpose(0, 1).reshape(3, -1).double().mean(dim=1)
    assert data.mean == pytest.approx(mean.tolist()) and len(data.std) == 3
    assert 0.1 < min(data.std) < max(data.std) < 0.4  # templates (0.15) and noise (0.2)


def test_same_seed_same_data_other_seed_other_data():
    a, b = make_synthetic(SMALL, seed=1), make_synthetic(SMALL, seed=1)
    c = make_synthetic(SMALL, seed=2)
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[1], b.test[1])
    assert not torch.equal(a.train[0], c.train[0])


def test_it_is_learnable_from_the_class_means():
    """Nearest class mean (estimated on train) classifies the test split almost perfectly,
    while the same rule with the training labels shuffled is at chance."""
    data = make_synthetic(SMALL, seed=0)
    x, y = data.train
    x_test, y_test = data.test

    def accuracy(labels: torch.Tensor) -> float:
        means = torch.stack([x[labels == k].mean(dim=0) for k in range(4)])
        distance = torch.cdist(x_test.flatten(1), means.flatten(1))
        return (distance.argmin(dim=1) == y_test).float().mean().item()

    assert accuracy(y) > 0.95
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert accuracy(shuffled) < 0.5


def test_val_size_and_bad_specs():
    assert len(make_synthetic(SMALL, val_size=1).val[0]) == 1
    assert len(load_dataset("synthetic", synthetic=SMALL, val_size=100).train[0]) == 300
    with pytest.raises(DataError, match="val_size for synthetic must be between 0 and 399"):
        make_synthetic(SMALL, val_size=400)
    with pytest.raises(DataError, match="num_classes 1"):
        make_synthetic(SyntheticSpec(num_classes=1, train_size=10, test_size=10))


def test_recipe_fills_in_the_table_and_checks_it(plugin_set):
    recipe = resolve(digits_recipe(data={"dataset": "synthetic"}), plugin_set.registries)
    assert recipe.data.synthetic_spec() == SyntheticSpec()
    assert recipe.to_dict()["data"]["synthetic"] == {
        "shape": [3, 32, 32],
        "num_classes": 10,
        "train_size": 50_000,
        "test_size": 10_000,
    }
    # The resolved recipe re-reads to the same recipe.
    again = tomllib.loads(recipe.to_toml())
    assert again["data"]["synthetic"]["shape"] == [3, 32, 32]
    plain = resolve(digits_recipe(), plugin_set.registries)
    assert plain.data.synthetic_spec() is None and plain.to_dict()["data"]["synthetic"] is None
    bad = digits_recipe(data={"dataset": "digits", "synthetic": {"num_classes": 3}})
    with pytest.raises(RecipeError, match="applies to dataset 'synthetic' only"):
        resolve(bad, plugin_set.registries)
    shape = digits_recipe(data={"dataset": "synthetic", "synthetic": {"shape": [3, 32]}})
    with pytest.raises(RecipeError, match=r"data.synthetic.shape: .*\[channels, height, width\]"):
        resolve(shape, plugin_set.registries)


def test_paper_parity_refuses_synthetic_in_one_line(capsys):
    recipe = ROOT / "recipes" / "pgd_at.toml"
    code, _, err = run_main(["validate", str(recipe), "--set", "data.dataset=synthetic"], capsys)
    lines = [line for line in err.splitlines() if not line.startswith("Warning:")]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"Error: {recipe}: data: ") and "claims paper parity" in lines[0]
    # Explicitly giving up the claim is allowed (a throughput measurement of the recipe).
    args = ["validate", str(recipe), "--set", "data.dataset=synthetic"]
    code, out, err = run_main([*args, "--set", "data.paper_parity=false"], capsys)
    assert code == 0, err
    assert "[data.synthetic]" in out or "synthetic = {" in out


def test_the_cifar_recipes_with_published_targets_claim_parity():
    claims = {
        path.stem
        for path in sorted((ROOT / "recipes").glob("*.toml"))
        if tomllib.loads(path.read_text()).get("data", {}).get("paper_parity")
    }
    assert claims == {"pgd_at", "trades", "fast_at", "free_at", "he_pgd", "he_trades", "slat"}
    # The readings (not the paper's method) do not.
    assert not claims & {"aalp_like", "spat_like_pgd", "spat_like_he", "spat_like_trades"}


def test_a_run_trains_on_it_and_validate_builds_its_shape(tmp_path, run_tmp, capsys):
    data = {
        "dataset": "synthetic",
        "batch_size": 32,
        "synthetic": {"shape": [1, 12, 12], "num_classes": 3, "train_size": 96, "test_size": 24},
    }
    recipe = write_recipe(tmp_path / "syn.toml", data=data)
    code, _, err = run_main(["validate", str(recipe)], capsys)
    assert code == 0, err
    code, _, err = run_main(["run", str(recipe), "--no-track", "--max-steps", "2", "-q"], capsys)
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["test_split_size"] == 24


@pytest.mark.gpu
def test_generated_on_the_cuda_device():
    data = load_dataset("synthetic", synthetic=SMALL, device="cuda", seed=0)
    assert data.train[0].device.type == "cuda" and data.test[1].device.type == "cuda"
    again = load_dataset("synthetic", synthetic=SMALL, device="cuda", seed=0)
    assert torch.equal(data.train[0], again.train[0])
