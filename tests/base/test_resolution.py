"""resolution.resolve / suggest_prefix / delta_numel, directly: adapters bound to bases from headers.

Shipped PEFT checkpoints for the real layouts, tiny header-only directories for each rule
(layouts, tied heads, prefix rewrites, shape errors), so a failure here names the resolver.
"""

from __future__ import annotations

from pathlib import Path

from adapterfmt.base.reading import read_base
from adapterfmt.formats.peft.reading import read_adapter
from adapterfmt.checkpoint.keys import weight_key
from adapterfmt.base.resolution import Resolution, delta_numel, resolve, suggest_prefix
from conftest import TESTDATA, write_adapter, write_base

P = "base_model.model."


def _lora(module: str, a: tuple[int, ...], b: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {f"{P}{module}.lora_A.weight": ("F32", a), f"{P}{module}.lora_B.weight": ("F32", b)}


def _resolve(tmp_path: Path, base: dict, adapter: dict, config: dict, base_config: "dict | None" = None, **kw) -> Resolution:
    b = write_base(tmp_path / "base", base, base_config)
    a = write_adapter(tmp_path / "adapter", adapter, {"r": 2, "lora_alpha": 2, **config})
    return resolve(read_adapter(a), read_base(b), **kw)


# ---------------------------------------------------------------------------------------------
# shipped PEFT checkpoints
# ---------------------------------------------------------------------------------------------


def test_llama_lora_binds_every_module_to_its_weight():
    res = resolve(read_adapter(TESTDATA / "tiny-llama-lora"), read_base(TESTDATA / "tiny-llama"))
    assert res.ok and res.summary() == "14/14 LoRA targets and 1/1 full copies resolved"
    assert set(res.lora) == set(res.adapter.lora)
    for path, rl in res.lora.items():
        assert rl.base_key == weight_key(path) and rl.layout == "linear" and rl.bias_key is None
    assert res.full_copies == {"lm_head": {"weight": "lm_head.weight"}}
    assert res.unresolved == [] and res.shape_errors == [] and res.suggestion is None
    assert [f.code for f in res.findings] == []
    q = res.lora["model.layers.0.self_attn.q_proj"].module
    assert delta_numel(q) == 64 * 64


def test_tied_head_full_copy_binds_through_the_embedding():
    res = resolve(read_adapter(TESTDATA / "tiny-llama-tied-lora"), read_base(TESTDATA / "tiny-llama-tied"))
    assert res.ok
    assert res.full_copies == {"lm_head": {"weight": "lm_head.weight"}}  # bound by name, shape from the tie
    tied = [f for f in res.findings if f.code == "tied-full-copy"]
    assert len(tied) == 1 and tied[0].keys == ["lm_head"]


def test_lora_bias_binds_the_base_bias():
    res = resolve(read_adapter(TESTDATA / "tiny-bert-lorabias"), read_base(TESTDATA / "tiny-bert"))
    assert res.ok and res.lora
    for path, rl in res.lora.items():
        assert rl.bias_key == f"{path}.bias" and rl.base_key == f"{path}.weight"


def test_wrong_base_leaves_everything_unresolved_without_raising():
    adapter = read_adapter(TESTDATA / "tiny-llama-lora")
    res = resolve(adapter, read_base(TESTDATA / "tiny-bert"))
    assert not res.ok and res.lora == {} and res.full_copies == {}
    assert sorted(res.unresolved) == sorted(list(adapter.lora) + ["lm_head.weight"])
    assert res.summary() == "0/14 LoRA targets and 0/1 full copies resolved"


# ---------------------------------------------------------------------------------------------
# layouts from shapes
# ---------------------------------------------------------------------------------------------


def test_conv1d_base_is_transposed_and_square_modules_follow_the_vote(tmp_path):
    # GPT-2 style Conv1D weights are (in, out); the square one cannot tell and follows the others
    base = {"h.c_attn.weight": ("F32", (4, 12)), "h.c_proj.weight": ("F32", (4, 4))}
    adapter = {**_lora("h.c_attn", (2, 4), (12, 2)), **_lora("h.c_proj", (2, 4), (4, 2))}
    res = _resolve(tmp_path, base, adapter, {"target_modules": ["c_attn", "c_proj"]})
    assert res.ok
    assert {p: r.layout for p, r in res.lora.items()} == {"h.c_attn": "conv1d-transposed", "h.c_proj": "conv1d-transposed"}


def test_square_alone_follows_fan_in_fan_out(tmp_path):
    base = {"q.weight": ("F32", (4, 4))}
    for flag, layout in ((False, "linear"), (True, "conv1d-transposed")):
        res = _resolve(tmp_path / str(flag), base, _lora("q", (2, 4), (4, 2)), {"target_modules": ["q"], "fan_in_fan_out": flag})
        assert res.lora["q"].layout == layout


def test_conv_and_embedding_layouts(tmp_path):
    base = {"conv.weight": ("F32", (8, 3, 3, 3)), "emb.weight": ("F32", (10, 6))}
    adapter = {
        **_lora("conv", (2, 3, 3, 3), (8, 2, 1, 1)),
        f"{P}emb.lora_embedding_A": ("F32", (2, 10)),
        f"{P}emb.lora_embedding_B": ("F32", (6, 2)),
    }
    res = _resolve(tmp_path, base, adapter, {"target_modules": ["conv", "emb"]})
    assert res.ok
    assert {p: r.layout for p, r in res.lora.items()} == {"conv": "conv", "emb": "embedding"}


def test_shape_disagreement_is_an_error_naming_the_module(tmp_path):
    res = _resolve(tmp_path, {"q.weight": ("F32", (4, 6))}, _lora("q", (2, 5), (4, 2)), {"target_modules": ["q"]})
    assert not res.ok and res.lora == {}
    assert len(res.shape_errors) == 1 and res.shape_errors[0].startswith("'q': ") and "[4, 6]" in res.shape_errors[0]


def test_lora_bias_without_a_base_bias_is_an_error(tmp_path):
    adapter = {**_lora("q", (2, 4), (4, 2)), f"{P}q.lora_B.bias": ("F32", (4,))}
    res = _resolve(tmp_path, {"q.weight": ("F32", (4, 4))}, adapter, {"target_modules": ["q"], "lora_bias": True})
    assert res.lora["q"].bias_key == "q.bias"
    assert res.shape_errors == ["'q': lora_bias is set but the base module has no bias 'q.bias' to add it to"]


# ---------------------------------------------------------------------------------------------
# names: prefix rewrites, full copies, overrides
# ---------------------------------------------------------------------------------------------


def test_prefix_is_suggested_and_prefix_map_applies_it(tmp_path):
    base = {f"language_model.model.layers.{i}.q.weight": ("F32", (4, 4)) for i in range(2)}
    adapter = {k: v for i in range(2) for k, v in _lora(f"model.layers.{i}.q", (2, 4), (4, 2)).items()}
    res = _resolve(tmp_path, base, adapter, {"target_modules": ["q"]})
    assert sorted(res.unresolved) == ["model.layers.0.q", "model.layers.1.q"]
    assert res.suggestion == ("", "language_model.")
    fixed = resolve(res.adapter, read_base(tmp_path / "base"), prefix_map={"": "language_model."})
    assert fixed.ok and fixed.lora["model.layers.1.q"].base_key == "language_model.model.layers.1.q.weight"


def test_suggest_prefix_needs_half_the_names():
    adapter = read_adapter(TESTDATA / "tiny-llama-lora")
    names = list(adapter.lora)
    moved = ["x." + weight_key(p) for p in names] + ["x.lm_head.weight"]
    assert suggest_prefix(names, moved, adapter) == ("", "x.")
    # lm_head binds today and "" -> "x." would unbind it: the narrower rewrite wins
    assert suggest_prefix(names, moved[:-1], adapter) == ("model.", "x.model.")
    strays = [f"stray{i}.w" for i in range(len(names) + 1)]
    assert suggest_prefix(names + strays, moved, adapter) is None  # fixes fewer than half


def test_full_copy_missing_a_base_param_is_incomplete(tmp_path):
    base = {"q.weight": ("F32", (4, 4)), "head.weight": ("F32", (3, 4)), "head.bias": ("F32", (3,))}
    adapter = {**_lora("q", (2, 4), (4, 2)), f"{P}head.weight": ("F32", (3, 4))}
    res = _resolve(tmp_path, base, adapter, {"target_modules": ["q"], "modules_to_save": ["head"]})
    assert res.ok and res.full_copies == {"head": {"weight": "head.weight"}}
    incomplete = [f for f in res.findings if f.code == "full-copy-incomplete"]
    assert len(incomplete) == 1 and incomplete[0].keys == ["head.bias"]


def test_full_copy_with_wrong_shape_is_an_error(tmp_path):
    base = {"q.weight": ("F32", (4, 4)), "head.weight": ("F32", (3, 4))}
    adapter = {**_lora("q", (2, 4), (4, 2)), f"{P}head.weight": ("F32", (5, 4))}
    res = _resolve(tmp_path, base, adapter, {"target_modules": ["q"], "modules_to_save": ["head"]})
    assert not res.ok and res.full_copies == {}
    assert res.shape_errors == ["'head.weight': full copy has shape [5, 4] but the base tensor 'head.weight' has [3, 4]"]


def test_saved_base_biases_bind_as_overrides(tmp_path):
    base = {"q.weight": ("F32", (4, 4)), "q.bias": ("F32", (4,)), "k.weight": ("F32", (4, 4))}
    adapter = {**_lora("q", (2, 4), (4, 2)), f"{P}q.bias": ("F32", (4,)), f"{P}k.bias": ("F32", (4,))}
    res = _resolve(tmp_path, base, adapter, {"target_modules": ["q"], "bias": "all"})
    assert res.overrides == {"q.bias": f"{P}q.bias"}
    assert res.unresolved == ["k.bias"] and not res.ok


def test_endswith_collision_names_both_bindings(tmp_path):
    base = {"model.x.weight": ("F32", (4, 4)), "img_model.x.weight": ("F32", (4, 4)), "model.q.weight": ("F32", (4, 4))}
    adapter = {**_lora("model.q", (2, 4), (4, 2)), f"{P}model.x.weight": ("F32", (4, 4))}
    res = _resolve(tmp_path, base, adapter, {"target_modules": ["q"], "modules_to_save": ["model.x"]})
    assert res.ok and res.full_copies == {"model.x": {"weight": "model.x.weight"}}
    suffix = [f for f in res.findings if f.code == "full-copy-suffix"]
    assert len(suffix) == 1 and sorted(suffix[0].keys) == ["img_model.x", "model.x"]
    assert "img_model.x" in suffix[0].message.split("under PEFT's plain endswith")[0]
    assert "but model.x under exact matching" in suffix[0].message
