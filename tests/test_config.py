from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from signalrl.config import RecipeError, dump_recipe, load_recipe, recipe_from_dict
from signalrl.quickstart import DEFAULT

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    data = yaml.safe_load(path.read_text())
    if path.name == "quickstart.yaml":
        for stage in ("sft", "grpo"):
            recipe_from_dict(data[stage], f"{path}[{stage}]")
    elif data.get("trainer") == "compare":  # a comparison file: every run's recipe validates
        from signalrl.compare import load_compare

        load_compare(path)
    else:
        load_recipe(path)


def test_quickstart_recipe_file_is_the_builtin_default():
    path = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
    assert yaml.safe_load(path.read_text()) == DEFAULT


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert "unknown key 'train.lrr'" in str(e.value) and str(p) in str(e.value)


def test_unknown_task_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("task:\n  name: arithmetic\n  digitz: 3\n")
    with pytest.raises(RecipeError, match=r"unknown key 'task.digitz'.*valid: digits"):
        load_recipe(p)


def test_bad_values_and_files(tmp_path):
    with pytest.raises(RecipeError, match="train.lr"):
        recipe_from_dict({"train": {"lr": -1}}, "x.yaml")
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(notmap)
    with pytest.raises(RecipeError, match="unknown task"):
        recipe_from_dict({"task": {"name": "chess"}}, "x.yaml")


def test_overrides_and_dump_round_trip(tmp_path):
    r = recipe_from_dict(
        {"trainer": "online_rl"},
        "x",
        ["train.lr=0.5", "rl.kl_coef=0.1", "task.digits=3", 'sampling.stop_strings=["\\n"]'],
    )
    assert r.train.lr == 0.5 and r.rl.kl_coef == 0.1 and r.task.kwargs()["digits"] == 3
    assert r.sampling.stop_strings == ["\n"]
    p = tmp_path / "dump.yaml"
    p.write_text(dump_recipe(r))
    assert load_recipe(p) == r
    with pytest.raises(RecipeError, match="unknown key 'train.nope'"):
        recipe_from_dict({}, "x", ["train.nope=1"])
    with pytest.raises(RecipeError, match="section.key=value"):
        recipe_from_dict({}, "x", ["train.lr"])
