"""The key mapping table: every role in every namespace, round trips, and PEFT's real key names."""

from __future__ import annotations

import pytest

from adapterfmt.errors import UnknownKeyError
from adapterfmt.checkpoint.keys import (
    ROLE_TEMPLATES,
    KeyParts,
    bias_key,
    param_key,
    Role,
    parse_saved,
    parse_wrapped,
    render_base,
    render_saved,
    render_wrapped,
    saved_to_base,
    saved_to_wrapped,
    split_param,
    split_prefix,
    weight_key,
    weight_module,
    wrapped_to_base,
    wrapped_to_saved,
)
from conftest import TINY_PEFT_CONFIGS, tiny_peft_model

P = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"

#: (role, saved key or None, wrapped key with adapter "default", base key, full-copy modules)
TABLE = [
    (Role.LORA_A, f"{P}{Q}.lora_A.weight", f"{P}{Q}.lora_A.default.weight", f"{Q}.weight", ()),
    (Role.LORA_B, f"{P}{Q}.lora_B.weight", f"{P}{Q}.lora_B.default.weight", f"{Q}.weight", ()),
    (Role.LORA_B, f"{P}{Q}.lora_B.bias", f"{P}{Q}.lora_B.default.bias", f"{Q}.bias", ()),
    (Role.LORA_EMBEDDING_A, f"{P}model.embed_tokens.lora_embedding_A", f"{P}model.embed_tokens.lora_embedding_A.default", "model.embed_tokens.weight", ()),
    (Role.LORA_EMBEDDING_B, f"{P}model.embed_tokens.lora_embedding_B", f"{P}model.embed_tokens.lora_embedding_B.default", "model.embed_tokens.weight", ()),
    (Role.DORA_MAGNITUDE, f"{P}{Q}.lora_magnitude_vector", f"{P}{Q}.lora_magnitude_vector.default.weight", f"{Q}.weight", ()),
    (
        Role.TOKENS_DELTA,
        f"{P}model.embed_tokens.token_adapter.trainable_tokens_delta",
        f"{P}model.embed_tokens.token_adapter.trainable_tokens_delta.default",
        "model.embed_tokens.weight",
        (),
    ),
    (Role.FULL_COPY, f"{P}lm_head.weight", f"{P}lm_head.modules_to_save.default.weight", "lm_head.weight", ("lm_head",)),
    (
        Role.FULL_COPY,
        f"{P}classifier.dense.weight",
        f"{P}classifier.modules_to_save.default.dense.weight",
        "classifier.dense.weight",
        ("classifier",),
    ),
    (Role.ORIGINAL, None, f"{P}classifier.original_module.dense.bias", "classifier.dense.bias", ()),
    (Role.BASE_LAYER, f"{P}model.embed_tokens.base_layer.weight", f"{P}model.embed_tokens.base_layer.weight", "model.embed_tokens.weight", ()),
    (Role.TOKENS_BASE, None, f"{P}model.embed_tokens.token_adapter.base_layer.weight", "model.embed_tokens.weight", ()),
    (Role.PLAIN, f"{P}model.norm.weight", f"{P}model.norm.weight", "model.norm.weight", ()),
]


def test_table_covers_every_role():
    assert {row[0] for row in TABLE} == set(Role) == set(ROLE_TEMPLATES)


@pytest.mark.parametrize(("role", "saved", "wrapped", "base", "full"), TABLE, ids=lambda v: getattr(v, "name", None))
def test_each_role_in_each_namespace(role, saved, wrapped, base, full):
    w = parse_wrapped(wrapped)
    assert w.role is role and w.prefix == P and w.adapter in (None, "default")
    assert render_wrapped(w) == wrapped
    assert wrapped_to_base(wrapped) == base == render_base(w)
    if saved is None:
        with pytest.raises(UnknownKeyError, match="no name in the saved namespace"):
            wrapped_to_saved(wrapped)
        return
    s = parse_saved(saved, full_copy_modules=full)
    assert s.role is role
    assert saved_to_base(saved, full_copy_modules=full) == base
    # saved -> wrapped -> saved and wrapped -> saved -> wrapped are identities
    assert saved_to_wrapped(saved, full_copy_modules=full) == wrapped
    assert wrapped_to_saved(saved_to_wrapped(saved, full_copy_modules=full)) == saved
    assert wrapped_to_saved(wrapped) == saved
    assert saved_to_wrapped(wrapped_to_saved(wrapped), full_copy_modules=full) == wrapped
    assert render_saved(s) == saved


@pytest.mark.parametrize(("role", "saved", "wrapped", "base", "full"), [r for r in TABLE if r[1]], ids=lambda v: getattr(v, "name", None))
def test_other_adapter_names_and_no_prefix(role, saved, wrapped, base, full):
    second = saved_to_wrapped(saved, adapter="second", full_copy_modules=full)
    assert parse_wrapped(second).adapter in ("second", None)
    assert wrapped_to_saved(second) == saved
    # keys without the PEFT prefix (transformers/diffusers integrations) map the same way
    bare = split_prefix(saved)[1]
    assert parse_saved(bare, full_copy_modules=full).prefix == ""
    assert saved_to_wrapped(bare, full_copy_modules=full) == split_prefix(wrapped)[1]
    assert saved_to_base(bare, full_copy_modules=full) == base


def test_exact_mapping_never_confuses_model_with_img_model():
    full = ("model.layers.0.x",)
    ours = parse_saved(f"{P}model.layers.0.x.weight", full_copy_modules=full)
    theirs = parse_saved(f"{P}img_model.layers.0.x.weight", full_copy_modules=full)
    assert (ours.module, ours.role) == ("model.layers.0.x", Role.FULL_COPY)
    assert (theirs.module, theirs.role) == ("img_model.layers.0.x", Role.PLAIN)
    assert saved_to_wrapped(f"{P}img_model.layers.0.x.weight", full_copy_modules=full) == f"{P}img_model.layers.0.x.weight"
    both = ("model.layers.0.x", "img_model.layers.0.x")
    for module in both:
        key = f"{P}{module}.weight"
        wrapped = saved_to_wrapped(key, full_copy_modules=both)
        assert wrapped == f"{P}{module}.modules_to_save.default.weight"
        assert parse_wrapped(wrapped).module == module
        assert wrapped_to_saved(wrapped) == key


def test_container_full_copy_takes_the_longest_module():
    parts = parse_saved(f"{P}classifier.dense.weight", full_copy_modules=("classifier", "classifier.dense"))
    assert (parts.module, parts.param) == ("classifier.dense", "weight")


def test_module_names_that_look_like_roles():
    """Path segments equal to role words or the adapter name are not mistaken for them."""
    for module in ("model.default.q", "base_layer_proj", "mha.base_layer.out_proj", "lora_A_proj.default"):
        key = f"{P}{module}.lora_A.weight"
        wrapped = saved_to_wrapped(key)
        assert wrapped == f"{P}{module}.lora_A.default.weight"
        assert parse_wrapped(wrapped).module == module
        assert wrapped_to_saved(wrapped) == key


def test_bias_all_leftovers_are_typed():
    parts = parse_saved(f"{P}classifier.original_module.bias")
    assert (parts.module, parts.role, parts.param) == ("classifier", Role.ORIGINAL, "bias")
    parts = parse_saved(f"{P}classifier.modules_to_save.default.dense.bias")
    assert (parts.module, parts.role) == ("classifier", Role.FULL_COPY)


@pytest.mark.parametrize("key", ["", "a..b", ".a", "a."])
def test_malformed_keys(key):
    with pytest.raises(UnknownKeyError):
        parse_saved(key)
    with pytest.raises(UnknownKeyError):
        parse_wrapped(key)


@pytest.mark.parametrize("key", [f"{P}q.lora_A.default", f"{P}q.lora_embedding_A.default.weight"])
def test_wrapped_role_without_required_parts(key):
    with pytest.raises(UnknownKeyError, match="must be followed by an adapter name"):
        parse_wrapped(key)


def test_keyparts_is_the_only_record():
    parts = KeyParts("q", Role.LORA_A, "weight", "default", P)
    assert render_saved(parts.with_adapter("other")) == f"{P}q.lora_A.weight"
    assert render_wrapped(parts.with_adapter("other")) == f"{P}q.lora_A.other.weight"


# ---------------------------------------------------------------------------------------------
# PEFT's real names: state_dict() of a PeftModel vs get_peft_model_state_dict
# ---------------------------------------------------------------------------------------------

#: Roles whose tensors get_peft_model_state_dict writes (with bias="none").
SAVED_ROLES = {Role.LORA_A, Role.LORA_B, Role.LORA_EMBEDDING_A, Role.LORA_EMBEDDING_B, Role.DORA_MAGNITUDE, Role.TOKENS_DELTA, Role.FULL_COPY}


@pytest.mark.filterwarnings("ignore:.*have invalid shape")  # PEFT's ZeRO-3 hint about 1-D lora_B.bias
@pytest.mark.parametrize("config", [c for c in TINY_PEFT_CONFIGS if c != "bias-all"])
@pytest.mark.parametrize("adapter_name", ["default", "other"])
def test_peft_state_dict_maps_exactly_to_saved_keys(config, adapter_name):
    from peft import get_peft_model_state_dict

    model = tiny_peft_model(config, adapter_name=adapter_name)
    wrapped_keys = list(model.state_dict())
    saved_keys = set(get_peft_model_state_dict(model, adapter_name=adapter_name))

    parsed = {k: parse_wrapped(k) for k in wrapped_keys}
    for key, parts in parsed.items():
        assert render_wrapped(parts) == key, key
    adapter_owned = {k: p for k, p in parsed.items() if p.role in SAVED_ROLES}
    assert {p.adapter for p in adapter_owned.values()} == {adapter_name}
    assert {render_saved(p) for p in adapter_owned.values()} == saved_keys

    # and back: every saved key names exactly the wrapped tensor PEFT loads it into
    full = {p.module for p in adapter_owned.values() if p.role is Role.FULL_COPY}
    back = {saved_to_wrapped(k, adapter=adapter_name, full_copy_modules=full) for k in saved_keys}
    assert back == set(adapter_owned)


def test_base_parameter_keys():
    assert weight_key("model.layers.0.q") == "model.layers.0.q.weight" and bias_key("q") == "q.bias"
    assert param_key("classifier", "dense.bias") == "classifier.dense.bias"
    assert weight_key("") == "weight" and param_key("", "bias") == "bias"  # a module at the root
    for module, param in (("a.b", "weight"), ("", "bias"), ("c", "dense.weight")):
        key = param_key(module, param)
        assert param_key(*split_param(key)) == key
    assert split_param("a.b.weight") == ("a.b", "weight") and split_param("weight") == ("", "weight")
    assert weight_module("a.b.weight") == "a.b" and weight_module("a.b.bias") is None
    # the base column of the key table agrees with the helper
    assert saved_to_base("base_model.model.a.b.lora_A.weight") == weight_key("a.b")
