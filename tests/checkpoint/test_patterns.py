"""Untrusted patterns: real ones match exactly as PEFT matches them; hostile ones are refused in one line.

The oracle is PEFT itself (``check_target_module_exists``, ``get_pattern_key``) over the module
names of real transformers architectures built from tiny configs.
"""

from __future__ import annotations

import functools
import itertools
import re

import pytest

from _hardening_helpers import HANG_SECONDS, deadline
from adapterfmt.checkpoint import patterns
from adapterfmt.checkpoint.config import parse_config
from adapterfmt.errors import InvalidConfigError
from adapterfmt.checkpoint.matching import PatternKeyIndex, is_lora_target, layer_index, select_targets
from adapterfmt.checkpoint.patterns import FULL, PATTERN_KEY, bounded, literal_tail

UNSLOTH = (
    r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense).*?"
    r"(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj).*?)|(?:\bmodel\.layers\.[\d]{1,}\."
    r"(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense)\.(?:(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)))"
)

#: target_modules regexes as people write them (PEFT docs and issues, unsloth, trainers' presets).
REAL_TARGET_REGEXES = [
    r".*\.(q_proj|v_proj)",
    r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$",
    r"^(?!.*vision).*\.(q_proj|k_proj|v_proj|o_proj)$",
    r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    r"model.layers.\d+.self_attn.(q|k|v|o)_proj",
    UNSLOTH,
    r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",
    r"^(?:language_model\.)?model\.layers\.[0-9]+\.(self_attn|mlp)\.\w+_proj$",
    r".*\.h\.\d+\.attn\.c_attn",
    r".*(attn|mlp)\.c_(attn|proj|fc)",
    r"(.*attn.*|.*mlp.*)",
    r".*encoder.*\.(query|key|value)$",
    r"encoder\.layer\.[0-5]\.attention\.self\.(query|value)",
    r".*[qkv]_proj",
    r".*\.layers\.([0-9]|1[0-5])\.mlp\.(gate|up|down)_proj",
    r"(.*\.q_proj)|(.*\.v_proj)",
    r"(?:.*\.(?:q|v)_proj|^model\.embed_tokens$)",
    r".*(SelfAttention|EncDecAttention)\.(q|k|v|o)",
    r"^.*\.(?:q|k|v|o)$",
    r"(?i).*Q_PROJ",
    r".*\.(?!1\.)\d+\.mlp\.\w+",
    r".*\.mlp\.\w+(?<!down_proj)",
    r"^transformer\.h\.(0|1)\.(attn\.c_attn|mlp\.c_fc)$",
    r".*(to_q|to_k|to_v|to_out\.0)",
    r".*lm_head",
    r"[a-z_.0-9]*proj",
    r".*\.[0-9]{1,2}\..*\.(dense|query)",
    r".*(?:self_attn|attention)\.(?:q|k|v|query|key|value)(?:_proj)?$",
]

REAL_PATTERN_KEYS = [
    "q_proj",
    "self_attn.q_proj",
    r"^model.layers.0.self_attn.q_proj",
    "^" + re.escape("model.layers.1.self_attn.k_proj"),
    re.escape("mlp.down_proj"),
    r"layers\.1\d*\..*",
    r"model.layers.0.mlp.down_proj",
    "^q",
    r".*\.v_proj",
    r"mlp\..*_proj",
    r"c_attn",
    r"h\.[01]\.attn\.c_attn",
    "query|value",
    "(?i:Q_PROJ)",
    r"dense$",
    r"^transformer.h.1.mlp.c_fc",
]


def _names(model_factory) -> list[str]:
    import torch

    with torch.device("meta"):
        model = model_factory()
    return [n for n, _ in model.named_modules() if n]


@functools.lru_cache(maxsize=1)
def real_module_names() -> list[str]:
    """Module names of tiny Llama, GPT-2, BERT and T5 models (built on the meta device)."""
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    names = _names(lambda: LlamaForCausalLM(LlamaConfig(num_hidden_layers=12, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, vocab_size=32)))
    names += _names(lambda: GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=32)))
    names += _names(lambda: BertModel(BertConfig(num_hidden_layers=7, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=32)))
    names += _names(lambda: T5ForConditionalGeneration(T5Config(num_layers=2, d_model=16, d_ff=32, num_heads=2, d_kv=8, vocab_size=32)))
    names += ["model.language_model.layers.0.self_attn.q_proj", "model.vision_tower.layers.0.self_attn.q_proj", "text_model.layers.3.mlp.up_proj"]
    return names


def _peft_config(**kw):
    from peft import LoraConfig

    return LoraConfig(**kw)


@pytest.mark.parametrize("pattern", REAL_TARGET_REGEXES)
def test_real_target_regexes_are_accepted_and_match_as_peft(pattern):
    from peft.tuners.tuners_utils import check_target_module_exists

    parse_config({"peft_type": "LORA", "target_modules": pattern, "exclude_modules": pattern})  # accepted
    config = _peft_config(target_modules=pattern)
    for name in real_module_names():
        assert is_lora_target(name, pattern) == bool(check_target_module_exists(config, name)), (pattern, name)


@pytest.mark.parametrize("pattern", REAL_TARGET_REGEXES[:8])
def test_real_exclude_regexes_match_as_peft(pattern):
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    config = _peft_config(target_modules=["q_proj", "c_attn", "query", "q", "up_proj"], exclude_modules=pattern)
    for name in real_module_names():
        theirs = check_target_module_exists(config, name)
        ours = is_lora_target(name, config.target_modules, exclude_modules=pattern)
        assert ours == (bool(theirs) and not isinstance(theirs, _ExcludedModule)), (pattern, name)


@pytest.mark.parametrize("layers_pattern", ["layers", "h", "layer", "block", ["h", "layers"], "lay.rs", "(?:layers|h)"])
def test_layers_pattern_matches_as_peft(layers_pattern):
    from peft.tuners.tuners_utils import check_target_module_exists

    config = _peft_config(target_modules=["q_proj", "c_attn", "query", "q"], layers_to_transform=[0, 1, 11], layers_pattern=layers_pattern)
    for name in real_module_names():
        ours = is_lora_target(name, config.target_modules, layers_to_transform=[0, 1, 11], layers_pattern=layers_pattern)
        assert ours == bool(check_target_module_exists(config, name)), (layers_pattern, name)
    assert layer_index("model.layers.11.mlp.up_proj", layers_pattern if layers_pattern != "h" else "layers") in (11, None)


@pytest.mark.parametrize("order", [REAL_PATTERN_KEYS, sorted(REAL_PATTERN_KEYS), REAL_PATTERN_KEYS[::-1]], ids=["given", "sorted", "reversed"])
def test_pattern_key_index_equals_peft_get_pattern_key(order):
    from peft.utils.other import get_pattern_key

    index = PatternKeyIndex(order)
    names = real_module_names() + ["q", "a\nq", "q\n", "model.layers.0.self_attn.q_proj\n", "x.mlp.down_proj"]
    for name in names:
        theirs = get_pattern_key(order, name)
        assert index.first(name) == (theirs if theirs in order else None), repr(name)
        assert index.matching(name) == [k for k in order if re.match(rf"(.*\.)?({k})$", name)], repr(name)


def test_many_literal_keys_are_looked_up_not_scanned():
    """A converted MoE adapter's rank_pattern: thousands of anchored escaped paths, answered by dict."""
    keys = ["^" + re.escape(f"model.layers.{i}.mlp.experts.{j}.w1") for i in range(30) for j in range(100)]
    index = PatternKeyIndex(keys)
    assert index.first("model.layers.7.mlp.experts.42.w1") == keys[742]
    assert index.first("x.model.layers.7.mlp.experts.42.w1") is None
    assert index._regex_keys == []


def test_literal_tail():
    assert literal_tail(r"^model\.layers\.0\.q_proj$") == "model.layers.0.q_proj"
    assert literal_tail(r".*\.(q|v)_proj") == "_proj"
    assert literal_tail("a|b") == "" and literal_tail("(?i)q") == ""


HOSTILE = [
    ("(a+)+b", "repeats a repetition"),
    ("(a*)*b", "repeats a repetition"),
    (r"(\w+\.)*q_proj", "repeats a repetition"),
    ("(.*a){20}", "repeats a repetition"),
    ("(a?){30}a{30}", "repeats a repetition"),
    ("(a|ab)*c", "alternation"),
    ("(.|a)*!", "alternation"),
    (r"(x)\1", "backreference"),
    (r"(?P<n>x)(?P=n)", "backreference"),
    (r"(x)?(?(1)a|b)", "conditional"),
    (".*.*.*.*.*.*.*.*.*.*.*.*x", "backtracking steps"),
    ("a*" * 40 + "!", "backtracking steps"),
]


@pytest.mark.parametrize(("pattern", "why"), HOSTILE)
@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "layers_pattern", "modules_to_save"])
def test_hostile_patterns_are_refused_in_one_line(pattern, why, field):
    value = {
        "rank_pattern": {pattern: 4},
        "alpha_pattern": {pattern: 4},
        "modules_to_save": [pattern],
        "layers_pattern": pattern,
    }.get(field, pattern)
    doc = {"peft_type": "LORA", "target_modules": ["q_proj"], field: value}
    names = ["a" * 200, "model.layers.0.self_attn.q_proj", "." * 200, "a" * 200 + "x", "a" * 200 + "!", "b.q_proj.a"]
    with deadline(HANG_SECONDS):
        with pytest.raises(InvalidConfigError) as e:
            cfg = parse_config(doc, path="adp/adapter_config.json")
            for n in names:  # priced refusals come at match time
                cfg.rank_for(n), cfg.alpha_for(n)
                is_lora_target(n, cfg.target_modules, exclude_modules=cfg.exclude_modules, modules_to_save=cfg.modules_to_save, layers_to_transform=[0], layers_pattern=cfg.layers_pattern)
    text = str(e.value)
    assert "\n" not in text and field in text and why in text and "refused" in text, text


@pytest.mark.parametrize(
    "pattern",
    [".*.*x", ".*.*.*x", ".*.*.*.*x", r"\.*\.*\.*x", r"[a.]*[a.]*[a.]*b", "a*a*a*a*a*!", r"(?=.*.*.*x).*", "a{0,60}a{0,60}a{0,60}a{0,60}b"],
)
def test_polynomial_patterns_are_priced_before_they_run(pattern):
    """Under the price they run (quickly, guarded by the hang deadline); just over it they are refused."""
    regex = bounded(pattern, FULL, "target_modules")
    for ch in "a.":
        n = 1
        while regex.price(ch * (n * 2)) <= patterns.MAX_STEPS and n < 10**6:
            n *= 2
        with deadline(HANG_SECONDS):
            regex.fullmatch(ch * n)
        if n < 10**6:  # the price, not the length cap, stopped the doubling
            with pytest.raises(InvalidConfigError, match="backtracking steps"):
                regex.fullmatch(ch * (n * 2))


def test_total_time_of_one_pattern_is_bounded(monkeypatch):
    regex = bounded(r"[a-z]*[a-z]*q", FULL, "target_modules", "cfg.json")
    regex.fullmatch("abc")
    monkeypatch.setattr(patterns, "MAX_SECONDS", -1.0)
    with pytest.raises(InvalidConfigError, match=r"cfg.json: 'target_modules': regex .* has taken more than"):
        regex.fullmatch("abc")


def test_select_targets_cost_is_linear_in_entries():
    """30,000 entries x 30,000 names: set lookups, not 9e8 comparisons (a hang guard, not a timing)."""
    names = [f"model.layers.{i}.mlp.experts.{j}.w{k}" for i in range(100) for j in range(100) for k in (1, 2, 3)]
    with deadline(HANG_SECONDS):
        sel = select_targets(names, target_modules=list(names))
    assert sel.lora_targets == names and sel.unused_targets == []


def test_targets_agree_with_peft_on_combinations():
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    names = real_module_names()
    for target, exclude in itertools.product([["q_proj", "c_attn"], REAL_TARGET_REGEXES[0]], [None, ["model.layers.1.self_attn.q_proj"], r".*\.1\..*"]):
        config = _peft_config(target_modules=target, exclude_modules=exclude)
        for n in names:
            theirs = check_target_module_exists(config, n)
            assert is_lora_target(n, target, exclude_modules=exclude) == (bool(theirs) and not isinstance(theirs, _ExcludedModule))


def test_entry_index_equals_the_plain_rule_on_odd_names():
    """Set lookups of dotted tails give exactly ``name == e or name.endswith("." + e)``."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from adapterfmt.checkpoint.matching import EntryIndex

    part = st.sampled_from(["", "a", "q", "q_proj", "b.q", ".q", "a..b", "x."])

    @settings(max_examples=300, deadline=None)
    @given(st.lists(part, max_size=5), st.lists(st.sampled_from(["", "a", "q", "b", "q_proj", "x"]), max_size=6))
    def check(entries, segments):
        name = ".".join(segments)
        index = EntryIndex(entries)
        expected = [e for e in set(entries) if name == e or name.endswith("." + e)]
        assert index.matches(name) == bool(expected)
        assert sorted(set(index.hits(name))) == sorted(expected)

    check()
