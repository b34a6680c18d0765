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
    elif data.get("trainer") == "pipeline":  # a pipeline: every stage resolves and validates
        from signalrl.pipeline import load_pipeline

        load_pipeline(path)
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


def test_duplicate_keys_are_refused_naming_key_and_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: a\ntrain:\n  steps: 3\nseed: 1\ntrain:\n  steps: 9\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and "duplicate key 'train'" in msg, msg
    assert "line 5" in msg and "first at line 2" in msg, msg
    p.write_text("train:\n  steps: 3\n  lr: 0.1\n  steps: 9\n")
    with pytest.raises(RecipeError, match=r"line 4: duplicate key 'train.steps' \(first at line 2"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="duplicate key 'a'"):
        recipe_from_dict({}, "x", ["sampling.stop_strings={a: 1, a: 2}"])
    # a merge key's values may still be overridden, as YAML intends
    from signalrl.config.recipe import load_yaml

    assert load_yaml("d: &d {a: 1, b: 2}\nx:\n  <<: *d\n  a: 5\n")["x"] == {"a": 5, "b": 2}


def test_duplicate_keys_in_a_comparison_file(tmp_path):
    from signalrl.compare import load_compare

    p = tmp_path / "c.yaml"
    p.write_text(
        "trainer: compare\nname: c\nruns:\n  - {name: a, recipe: recipes/sft-arithmetic.yaml}\n"
        "name: d\n"
    )
    with pytest.raises(RecipeError, match=r"line 5: duplicate key 'name' \(first at line 2"):
        load_compare(p)


def test_task_value_of_the_wrong_type_names_the_key():
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({}, "x.yaml", ["task.digits=abc"])
    msg = str(e.value)
    assert "task.digits" in msg and "'abc'" in msg and "int" in msg, msg
    with pytest.raises(RecipeError, match="task.ops"):
        recipe_from_dict({"task": {"name": "arithmetic", "ops": 1}}, "x.yaml")
    with pytest.raises(RecipeError, match="task.exact_digits"):
        recipe_from_dict({}, "x.yaml", ["task.exact_digits=maybe"])
    # a number written as a string is the number, as for every other section
    assert recipe_from_dict({}, "x.yaml", ["task.digits='3'"]).task.kwargs()["digits"] == 3


@pytest.mark.parametrize("name", [".", "..", "a/b", "", "  ", "/abs", "..\\x", ".hidden"])
def test_run_name_must_be_one_plain_directory_name(name):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"name": name}, "x.yaml")
    assert "name" in str(e.value)


def test_run_name_plain_names_are_accepted():
    for name in ("run", "dpo-arithmetic", "sweep-beta0.1", "a.b_c"):
        assert recipe_from_dict({"name": name}, "x.yaml").run_dir.name == name


def test_cross_section_checks_are_one_clear_line():
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"trainer": "distill"}, "x.yaml")
    lines = str(e.value).splitlines()
    assert lines == [
        "x.yaml: invalid recipe",
        "  trainer 'distill' needs distill.teacher (a checkpoint directory or preset)",
    ]


def test_model_device_and_train_pairs_fields():
    with pytest.raises(RecipeError, match="model.device"):
        recipe_from_dict({"model": {"device": "gpu"}}, "x.yaml")
    for dev in ("auto", "cpu", "cuda", "cuda:1"):
        assert recipe_from_dict({"model": {"device": dev}}, "x.yaml").model.device == dev
    assert recipe_from_dict({}, "x.yaml").eval.train_pairs == 512
    with pytest.raises(RecipeError, match="eval.train_pairs"):
        recipe_from_dict({"eval": {"train_pairs": -1}}, "x.yaml")
