"""Recipe validation: every bad value is a RecipeError naming the field path and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from prunequant import Recipe, RecipeError
from prunequant.recipe import IMPORTANCE, ORDERINGS, SCHEDULES, PruneConfig, QuantConfig


def _error(data) -> str:
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def _line(msg: str, path: str) -> str:
    """The message line about ``path`` (exactly one)."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip().startswith(path + ":")]
    assert len(lines) == 1, msg
    return lines[0]


@pytest.mark.parametrize(
    ("data", "path", "allowed", "got"),
    [
        ({"prune": {"sparsity": 1.5}}, "prune.sparsity", "less than 1", "1.5"),
        ({"prune": {"sparsity": 1.0}}, "prune.sparsity", "less than 1", "1.0"),
        ({"prune": {"sparsity": -0.1}}, "prune.sparsity", "greater than or equal to 0", "-0.1"),
        ({"quant": {"weight_bits": 1}}, "quant.weight_bits", "greater than or equal to 2", "1"),
        ({"quant": {"act_bits": 1}}, "quant.act_bits", "greater than or equal to 2", "1"),
        ({"quant": {"act_bits": 17}}, "quant.act_bits", "less than or equal to 16", "17"),
        ({"quant": {"per_layer": {"fc3": {"weight_bits": 1}}}}, "quant.per_layer.fc3.weight_bits",
         "greater than or equal to 2", "1"),
        ({"prune": {"interval": 0}}, "prune.interval", "greater than 0", "0"),
        ({"prune": {"start": -1}}, "prune.start", "greater than or equal to 0", "-1"),
        ({"prune": {"stepwise_steps": 0}}, "prune.stepwise_steps", "greater than or equal to 1", "0"),
        ({"prune": {"seed": -2}}, "prune.seed", "greater than or equal to 0", "-2"),
        ({"quant": {"act_percentile": 100}}, "quant.act_percentile", "less than 100", "100"),
        ({"quant": {"act_percentile": 50}}, "quant.act_percentile", "greater than 50", "50"),
    ],
)
def test_out_of_range_values_name_field_and_bound(data, path, allowed, got):
    line = _line(_error(data), path)
    assert allowed in line
    assert f"(got {got})" in line


@pytest.mark.parametrize(
    ("data", "path", "choices"),
    [
        ({"prune": {"importance": "foo"}}, "prune.importance", IMPORTANCE),
        ({"prune": {"schedule": "gradual"}}, "prune.schedule", SCHEDULES),
        ({"prune": {"unit": "minutes"}}, "prune.unit", ("epochs", "steps")),
        ({"ordering": "both"}, "ordering", ORDERINGS),
        ({"quant": {"weight_clip": "l2"}}, "quant.weight_clip", ("max", "mse")),
    ],
)
def test_bad_choice_lists_allowed_values(data, path, choices):
    line = _line(_error(data), path)
    assert "must be one of" in line
    for c in choices:
        assert repr(c) in line
    bad = next(iter(data.values()))
    bad = next(iter(bad.values())) if isinstance(bad, dict) else bad
    assert f"(got {bad!r})" in line


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"prune": {"sparsty": 0.5}}, "prune.sparsty"),
        ({"quant": {"bits": 4}}, "quant.bits"),
        ({"quant": {"per_layer": {"conv1": {"w_bits": 4}}}}, "quant.per_layer.conv1.w_bits"),
        ({"optimizer": "sgd"}, "optimizer"),
    ],
)
def test_unknown_fields_are_rejected_by_path(data, path):
    assert "unknown field" in _line(_error(data), path)


def test_per_layer_sparsity_range():
    line = _line(_error({"prune": {"per_layer": {"layer1.*": 1.2}}}), "prune.per_layer")
    assert "'layer1.*'" in line and "[0, 1)" in line and "1.2" in line


def test_bits_must_be_integers():
    assert "integer" in _line(_error({"quant": {"weight_bits": 4.5}}), "quant.weight_bits")


def test_all_problems_reported_at_once():
    msg = _error({"prune": {"sparsity": 1.5, "importance": "foo"}, "quant": {"weight_bits": 1}})
    for path in ("prune.sparsity", "prune.importance", "quant.weight_bits"):
        _line(msg, path)
    assert msg.startswith("invalid configuration in recipe:")


def test_valid_recipes_and_defaults():
    r = Recipe.from_dict(None)
    assert isinstance(r.prune, PruneConfig) and isinstance(r.quant, QuantConfig)
    assert (r.prune.sparsity, r.prune.importance, r.prune.schedule) == (0.5, "a_l1", "layerwise")
    assert (r.quant.weight_bits, r.quant.act_bits, r.quant.first_last_bits) == (4, 4, 8)
    assert r.ordering == "prune_then_quantize"
    per_layer = {"fc*": {"weight_bits": None, "act_bits": 8}}
    r = Recipe.from_dict({"prune": None, "quant": {"weight_bits": 2, "act_bits": 16, "per_layer": per_layer}})
    assert r.prune is None and r.quant.per_layer["fc*"].weight_bits is None
    r = Recipe.from_dict({"prune": {"sparsity": 0.0, "per_layer": {"a": 0.999}}, "quant": None,
                          "ordering": "joint"})
    assert r.quant is None and r.prune.per_layer == {"a": 0.999}


# ------------------------------------------------------------------------------------------- YAML
def test_from_yaml_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match=re.escape(f"config file not found: {path}")):
        Recipe.from_yaml(path)


def test_from_yaml_valid_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("prune:\n  sparsity: 0.75\n  importance: w_l1\n  unit: steps\n  start: 3\n"
                    "quant:\n  weight_bits: 4\n  act_bits: 4\nordering: quantize_then_prune\n")
    r = Recipe.from_yaml(path)
    assert (r.prune.sparsity, r.prune.importance, r.prune.unit, r.prune.start) == (0.75, "w_l1", "steps", 3)
    assert (r.quant.weight_bits, r.quant.act_bits, r.ordering) == (4, 4, "quantize_then_prune")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert Recipe.from_yaml(empty) == Recipe.from_dict({})


def test_from_yaml_invalid_values_name_the_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("prune:\n  sparsity: 1.5\n")
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(path)
    assert str(path) in str(info.value)
    assert "less than 1" in _line(str(info.value), "prune.sparsity")


@pytest.mark.parametrize(("text", "match"), [("prune: [1, 2\n", "not valid YAML"),
                                             ("- 1\n- 2\n", "must be a mapping")])
def test_from_yaml_syntax_and_shape_errors(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match):
        Recipe.from_yaml(path)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipe_files_validate(path):
    from prunequant.config import RunConfig

    cfg = RunConfig.from_yaml(path)
    assert cfg.recipe is not None and cfg.recipe.prune is not None and cfg.recipe.quant is not None
