"""Recipes: presets, TOML files and lists of pass configs resolve to configured passes; every key is
checked and an unknown one is refused with a message naming it (and the file)."""
from __future__ import annotations

from pathlib import Path

import pytest

from nnforge.ir import IntQuant, run_graph
from nnforge.passes import PASSES, PRESETS, DeadCodeElimination, PassContext, PassError, PassManager, QuantizeRTN, \
    resolve_recipe
from nnforge.passes.recipes import load_recipe_file
from tests.passes.graphs import cosine, inputs, mlp_graph, weight_bytes


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_resolves_and_runs(preset):
    description, configs = PRESETS[preset]
    assert isinstance(description, str) and description
    name, passes = resolve_recipe(preset)
    assert name == preset and len(passes) == len(configs)
    for cfg, p in zip(configs, passes):
        assert cfg["pass"] in PASSES and isinstance(p, PASSES[cfg["pass"]])
        for key, value in cfg.items():
            if key != "pass":
                assert getattr(p, key) == value, (preset, key)
    g = mlp_graph()
    x = inputs(32, seed=2)
    ctx = PassContext(calibration=[(inputs(8, seed=s),) for s in range(4)])
    if preset.startswith("kv"):           # KV-cache encodings: decoders only (tests/passes/test_kvcache.py)
        with pytest.raises(PassError, match="has no KV cache"):
            PassManager(passes).run(g, ctx)
        return
    if preset in ("rec", "distill"):      # recovery alone: nothing before it compressed the model
        with pytest.raises(PassError, match="nothing to recover"):
            PassManager(passes).run(g, ctx)
        return
    if preset == "w4-gptq+eora":          # rank 32 is for real layers; this MLP's are 16 wide
        with pytest.raises(PassError, match="rank 32 exceeds the rank of layer fc1"):
            PassManager(passes).run(g, ctx)
        return
    out = PassManager(passes).run(g, ctx)
    # half the weights of a random MLP go with 2:4 sparsity: a looser floor there
    floor = 0.85 if preset.startswith("sparse") else 0.97
    assert cosine(run_graph(out, [x])[0], run_graph(g, [x])[0]) > floor
    if preset == "rot":                  # the same function on rotated weights: nothing stored smaller
        assert cosine(run_graph(out, [x])[0], run_graph(g, [x])[0]) > 0.99999
        assert weight_bytes(out) == weight_bytes(g)
    elif passes:
        assert weight_bytes(out) < weight_bytes(g)


def test_fp32_and_none_mean_no_passes():
    assert resolve_recipe(None) == ("fp32", [])
    assert resolve_recipe("fp32") == ("fp32", [])


def test_presets_are_fresh_objects():
    a = resolve_recipe(next(p for p in PRESETS if PRESETS[p][1]))[1]
    b = resolve_recipe(next(p for p in PRESETS if PRESETS[p][1]))[1]
    assert a[0] is not b[0]


RECIPE = '''
description = "4-bit weights, the head kept at 8 bits"

[[passes]]
pass = "quantize_rtn"
bits = 4
group_size = 8
exclude = ["fc2"]

[[passes]]
pass = "quantize_rtn"
bits = 8
layers = ["fc2"]

[[passes]]
pass = "dce"
'''


def write(tmp_path: Path, text: str, name: str = "recipe.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_toml_recipe(tmp_path):
    path = write(tmp_path, RECIPE, "mixed.toml")
    name, passes = resolve_recipe(path)
    assert name == "mixed"
    assert [type(p) for p in passes] == [QuantizeRTN, QuantizeRTN, DeadCodeElimination]
    assert passes[0].bits == 4 and passes[0].group_size == 8 and passes[0].exclude == ["fc2"]
    assert passes[1].layers == ["fc2"]
    assert resolve_recipe(str(path))[0] == "mixed"
    out = PassManager(passes).run(mlp_graph())
    fc1, fc2 = out.weights["fc1.weight"].encoding, out.weights["fc2.weight"].encoding
    assert isinstance(fc1, IntQuant) and fc1.bits == 4 and fc1.group_size == 8
    assert isinstance(fc2, IntQuant) and fc2.bits == 8 and fc2.granularity == "channel"


def test_recipe_without_passes_is_an_error(tmp_path):
    """A TOML recipe without passes used to compile with nothing applied."""
    with pytest.raises(PassError, match=r"recipe .*none.toml has no passes: add at least one \[\[passes\]\] table"):
        resolve_recipe(write(tmp_path, 'description = "nothing"\n', "none.toml"))
    with pytest.raises(PassError, match="recipe has no passes"):
        resolve_recipe([])


@pytest.mark.parametrize("text, message", [
    ('colour = "red"\n' + RECIPE, "unknown key\\(s\\) colour; allowed: description, passes"),
    ('[[passes]]\npass = "quantise_rtn"\nbits = 4\n',
     "pass 0: unknown pass 'quantise_rtn'; known passes: .*quantize_rtn"),
    ('[[passes]]\npass = "dce"\n[[passes]]\npass = "quantize_rtn"\nbitz = 4\n',
     "pass 1 \\(quantize_rtn\\): unknown option\\(s\\) bitz for pass quantize_rtn; valid options: .*bits"),
    ('[[passes]]\nbits = 4\n', "pass 0: missing the 'pass' key"),
    ('passes = "quantize_rtn"\n', "'passes' must be an array of tables"),
    ('passes = [1, 2]\n', "pass 0: a pass config must be a table/dict with a 'pass' key, got 1"),
    ('[[passes]]\npass = "quantize_rtn"\nbits = 12\n', "pass 0 \\(quantize_rtn\\): .*bits must be an integer in 2..8"),
    ('[[passes]]\npass = "quantize_rtn"\nops = ["relu"]\n', "pass 0 \\(quantize_rtn\\): .*carry no weights"),
    ('[[passes]\npass = 3', "is not valid TOML"),
])
def test_bad_toml_recipes_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(PassError, match=f"recipe {path}.*{message}"):
        resolve_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(PassError, match="cannot read recipe .*missing.toml"):
        resolve_recipe(tmp_path / "missing.toml")
    with pytest.raises(PassError, match="cannot read recipe"):
        load_recipe_file(tmp_path / "missing.toml")


@pytest.mark.parametrize("name, pass_name, option, value", [
    ("mixed-4.5", "mixed_precision", "bits", 4.5),
    ("block-sparse-80", "prune_sparsegpt", "sparsity", 0.8),
    ("lowrank-50", "lowrank_asvd", "param_budget", 0.5),
    ("prune-mlp-25", "prune_mlp", "fraction", 0.25),
    ("prune-heads-25", "prune_heads", "fraction", 0.25),
])
def test_parametric_presets(name, pass_name, option, value):
    got, passes = resolve_recipe(name)
    assert got == name and passes[0].name == pass_name and getattr(passes[0], option) == value


def test_unknown_preset():
    with pytest.raises(PassError, match="unknown recipe 'w3-magic': not a preset \\(fp32, .*\\) nor a .toml file"):
        resolve_recipe("w3-magic")


def test_list_recipes():
    name, passes = resolve_recipe([{"pass": "quantize_rtn", "bits": 8}, DeadCodeElimination()])
    assert name == "custom" and isinstance(passes[0], QuantizeRTN) and passes[0].bits == 8
    assert isinstance(passes[1], DeadCodeElimination)
    with pytest.raises(PassError, match="recipe entry 1 \\(quantize_rtn\\): unknown option\\(s\\) colour"):
        resolve_recipe([{"pass": "dce"}, {"pass": "quantize_rtn", "colour": 1}])
    with pytest.raises(PassError, match="recipe entry 0: unknown pass 'nope'"):
        resolve_recipe(({"pass": "nope"},))


def test_single_pass_recipe():
    p = QuantizeRTN(bits=4)
    assert resolve_recipe(p) == ("quantize_rtn", [p])


@pytest.mark.parametrize("bad", [42, {"pass": "dce"}, 1.5])
def test_recipe_of_wrong_type(bad):
    with pytest.raises(PassError, match="a recipe is a preset name, a .toml path or a list of pass configs"):
        resolve_recipe(bad)


def test_target_pass_defaults_fill_only_unset_options_of_passes_that_have_them():
    defaults = {"scale_dtype": "float16"}
    _, (rtn,) = resolve_recipe("w8", defaults)
    assert rtn.scale_dtype == "float16" and rtn.weight_format.scale_format.name == "float16"
    _, (own,) = resolve_recipe([{"pass": "quantize_rtn", "format": "int8", "scale_dtype": "float32"}], defaults)
    assert own.scale_dtype == "float32"                    # the recipe's own setting wins
    _, passes = resolve_recipe("sparse24-w4", defaults)
    assert passes[0].weight_format.scale_format.name == "float16"
    _, passes = resolve_recipe("palettize-4", defaults)     # no scale_dtype option: untouched, no error
    assert not hasattr(passes[0], "scale_dtype")


def test_core_ml_targets_quantise_with_fp16_scales():
    from nnforge.targets import get_target
    for name in ("apple-a17", "apple-m2"):
        assert get_target(name).options["pass_defaults"] == {"scale_dtype": "float16"}


def test_a_preset_entry_sets_damp_on_the_passes_that_take_it(tmp_path):
    _, (gptq,) = resolve_recipe([{"preset": "w4-gptq", "damp": 0.1}])
    assert gptq.name == "quantize_gptq" and gptq.damp == 0.1
    assert gptq.static_groups and gptq.group_size == 128             # the rest of the preset is kept
    _, (sparse,) = resolve_recipe('[{"preset": "block-sparse-50", "damp": 0.05}]')
    assert sparse.name == "prune_sparsegpt" and sparse.damp == 0.05 and sparse.sparsity == 0.5
    _, (eora,) = resolve_recipe([{"preset": "w4-gptq+eora", "damp": 0.2}])
    assert eora.name == "quantize_eora" and eora.damp == 0.2
    path = tmp_path / "damped.toml"
    path.write_text('[[passes]]\npreset = "sparse24"\ndamp = 0.1\n\n[[passes]]\npass = "dce"\n')
    name, (p, dce) = resolve_recipe(str(path))
    assert name == "damped" and p.name == "prune_sparsegpt" and p.damp == 0.1 and dce.name == "dce"


def test_a_preset_entry_reaches_the_pass_record_and_the_run():
    _, passes = resolve_recipe([{"preset": "w4-gptq", "damp": 0.0}])
    pm = PassManager(passes)
    pm.run(mlp_graph(), PassContext(calibration=[(inputs(4),)]))  # 4 rows: singular Hessians without damping
    assert pm.records[0].figures["damp_raised"] == {"fc1": 0.001, "fc2": 0.001}


@pytest.mark.parametrize("entry, message", [
    ({"preset": "w4-gptq", "dmap": 0.1}, "unknown option\\(s\\) dmap for preset w4-gptq \\(passes quantize_gptq\\); "
                                         "valid options: act_order"),
    ({"preset": "w8", "damp": 0.1}, "unknown option\\(s\\) damp for preset w8 \\(passes quantize_rtn\\)"),
    ({"preset": "w4-gptq", "damp": 2.0}, "preset w4-gptq\\) \\(quantize_gptq\\): quantize_gptq: damp must be in"),
    ({"preset": "w4-gtpq"}, "unknown preset 'w4-gtpq'"),
    ({"preset": "fp32", "damp": 0.1}, "preset 'fp32' runs no pass"),
    ({"preset": "w4-gptq", "pass": "quantize_gptq"}, "give 'pass' or 'preset', not both"),
])
def test_bad_preset_entries_name_the_option(entry, message):
    with pytest.raises(PassError, match=message):
        resolve_recipe([entry])


def test_presets_joined_by_plus_run_in_order():
    name, passes = resolve_recipe("w4-gptq+kv4")
    assert name == "w4-gptq+kv4" and [p.name for p in passes] == ["quantize_gptq", "kv_cache"]
    assert passes[1].encoding == "kv4" and (passes[1].group_size, passes[1].residual) == (64, 64)
    assert [p.name for p in resolve_recipe("w8+kv-fp8")[1]] == ["quantize_rtn", "kv_cache"]
    name, passes = resolve_recipe("w8+kv-f16")
    assert [p.name for p in passes] == ["quantize_rtn", "kv_cache"] and passes[1].encoding == "kv-f16"
    assert resolve_recipe("w4-gptq+eora")[1][0].name == "quantize_eora"        # a preset of its own


@pytest.mark.parametrize("recipe,message", [
    ("kv4+w4-gptq", "a KV-cache preset goes after the weight presets"),
    ("w4-gptq+kv9", "unknown recipe 'w4-gptq\+kv9'.*joined by '\+'"),
    ("w8+", "unknown recipe"),
])
def test_bad_plus_combinations(recipe, message):
    with pytest.raises(PassError, match=message):
        resolve_recipe(recipe)


def test_the_head_format_joins_weight_passes_only():
    from nnforge.passes.recipes import with_head_format
    _, kv = resolve_recipe("kv8")
    assert with_head_format(kv, "w8", "lm_head") == kv                        # the head stays float
    _, both = resolve_recipe("w8+kv8")
    out = with_head_format(both, "w8", "lm_head")
    assert [p.name for p in out] == ["quantize_rtn", "kv_cache", "quantize_rtn"]
    assert out[0].exclude == ["lm_head"] and out[1].exclude == [] and out[2].layers == ["lm_head"]
