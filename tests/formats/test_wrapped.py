"""Wrapped checkpoints (``adapterfmt/formats/wrapped/reading.py``, ``adapterfmt/convert/wrapped.py``) against real PEFT.

We test:
* recognition of every layout (one file, shards + index, no prefix, pickle) and of what is not wrapped;
* the description: one adapter record per name, equal to what ``read_adapter`` says of PEFT's own
  ``save_pretrained`` output; the base tensors; ``full-copy-unchanged`` for a copy that never trained;
* ``wrapped_names``: exactly the keys (and values) of ``PeftModel.state_dict()``;
* conversion: the adapter files equal PEFT's ``save_pretrained`` byte for byte, PEFT loads them with
  the same outputs as the wrapped model, ``base_out`` equals the original base bit for bit;
* refusals: no alpha, non-empty or nested output, partial DoRA; nothing left behind on failure.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_PEFT_CONFIGS, tiny_peft_model, tiny_torch_model
from _wrapped_helpers import custom_peft, llama_two_adapters, logits, save_wrapped, state_dict_of
from adapterfmt import read_adapter
from adapterfmt.convert.wrapped import convert_wrapped, wrapped_names
from adapterfmt.errors import (
    CheckpointNotFoundError,
    InconsistentAdapterError,
    InvalidConfigError,
    OutputPathError,
    UnsafeFileError,
    UnsupportedFeatureError,
)
from adapterfmt.formats.wrapped.reading import exact_pattern, is_wrapped_checkpoint, read_wrapped, rebuild_config

ALPHAS = {"default": 8, "other": 6}
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Two-adapter tiny Llama saved every way, plus PEFT's own save_pretrained of it."""
    root = tmp_path_factory.mktemp("llama")
    pm, base_sd = llama_two_adapters(0)
    cfg = pm.base_model.model.config.to_dict()
    save_wrapped(pm, root / "file", model_config=cfg)
    save_wrapped(pm, root / "sharded", shards=True, model_config=cfg)
    save_wrapped(pm, root / "noprefix", prefix=False)
    save_wrapped(pm, root / "pickle", pickle=True)
    pm.save_pretrained(root / "peft")
    return pm, base_sd, root


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    pm, base_sd = custom_peft(0)
    save_wrapped(pm, root / "file")
    pm.save_pretrained(root / "peft")
    return pm, base_sd, root


def _tensors_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# recognition and description
# ---------------------------------------------------------------------------------------------


def test_recognises_wrapped_layouts_and_nothing_else(llama, testdata):
    _, _, root = llama
    for p in ("file", "file/model.safetensors", "sharded", "sharded/model.safetensors.index.json", "noprefix", "pickle",
              "pickle/pytorch_model.bin"):
        assert is_wrapped_checkpoint(root / p), p
    for p in (testdata / "tiny-llama", testdata / "tiny-llama-lora", testdata / "tiny-llama-lora/adapter_model.safetensors",
              root / "peft", root / "missing"):
        assert not is_wrapped_checkpoint(p), p


def test_description_matches_peft_saved_adapters(llama):
    pm, base_sd, root = llama
    w = read_wrapped(root / "file", alpha=ALPHAS)
    assert (w.layout, w.storage, w.prefix) == ("wrapped", "safetensors", PREFIX)
    assert list(w.adapters) == ["default", "other"] and w.alpha_known == {"default": True, "other": True}
    for name, sub in (("default", None), ("other", "other")):
        ours, peft = w.adapters[name], read_adapter(root / "peft", subfolder=sub)
        assert ours.lora.keys() == peft.lora.keys()
        for path, m in ours.lora.items():
            p = peft.lora[path]
            assert (m.rank, m.config_rank, m.use_dora, m.layer_kind, m.scaling) == (p.rank, p.config_rank, p.use_dora, p.layer_kind, p.scaling)
            assert m.keys == p.keys
        assert {c: set(x.keys.values()) for c, x in ours.full_copies.items()} == {
            c: set(x.keys.values()) for c, x in peft.full_copies.items()
        }
        assert [f.code for f in ours.findings] == []
    # the base the file carries is exactly the model before wrapping (names, dtypes, shapes)
    assert {k: (i.dtype, i.shape) for k, i in w.base.items()} == {
        k: ("F32", tuple(v.shape)) for k, v in base_sd.items()
    }
    assert w.base_keys["lm_head.weight"] == PREFIX + "lm_head.original_module.weight"
    assert w.copy_changed == {"default": {"lm_head": True}, "other": {"lm_head": True}}


def test_alpha_unknown_is_none_not_guessed(llama):
    _, _, root = llama
    w = read_wrapped(root / "file")
    a = w.adapters["default"]
    assert w.alpha_known == {"default": False, "other": False}
    assert a.config.lora_alpha is None and all(m.alpha is None and m.scaling is None for m in a.lora.values())
    assert a.config.raw["lora_alpha"] is None


def test_every_layout_gives_the_same_description(llama):
    _, _, root = llama
    ref = read_wrapped(root / "file")

    def facts(w):
        strip = lambda k: k[len(PREFIX):] if k.startswith(PREFIX) else k  # noqa: E731
        return (
            {n: sorted(strip(k) for m in a.lora.values() for k in m.keys.values()) for n, a in w.adapters.items()},
            {k: (i.dtype, i.shape) for k, i in w.base.items()},
            w.copy_changed,
        )

    for p in ("sharded", "noprefix", "file/model.safetensors"):
        assert facts(read_wrapped(root / p)) == facts(ref), p
    sharded = read_wrapped(root / "sharded")
    assert sharded.storage == "safetensors-sharded" and len(sharded.weight_files) > 1
    assert read_wrapped(root / "noprefix").prefix == ""
    with pytest.raises(UnsafeFileError, match="allow-pickle"):
        read_wrapped(root / "pickle")
    pickled = read_wrapped(root / "pickle", allow_pickle=True)
    assert facts(pickled) == facts(ref) and pickled.storage == "pickle"


@pytest.mark.parametrize("pickle", [False, True])
def test_copy_that_never_trained_is_flagged(tmp_path, pickle):
    pm, _ = llama_two_adapters(3, freeze_copy="other")
    path = save_wrapped(pm, tmp_path, pickle=pickle)
    w = read_wrapped(path, allow_pickle=pickle)
    assert w.copy_changed == {"default": {"lm_head": True}, "other": {"lm_head": False}}
    found = [f for f in w.all_findings() if f.code == "full-copy-unchanged"]
    assert len(found) == 1 and found[0].keys == ["lm_head"] and "adapter 'other'" in found[0].message
    assert found[0] in w.adapters["other"].findings


# ---------------------------------------------------------------------------------------------
# the reverse mapping
# ---------------------------------------------------------------------------------------------


def _check_names(pm, base_sd, adapters, prefix=PREFIX):
    saved = {n: load_file(a.weights_file) for n, a in adapters.items()}
    names = wrapped_names(adapters, list(base_sd), prefix=prefix)
    live = {(k[len(PREFIX):] if not prefix else k): v for k, v in pm.state_dict().items()}
    assert set(names) == set(live), sorted(set(names) ^ set(live))
    for key, src in names.items():
        value = base_sd[src.key] if src.kind == "base" else saved[src.adapter][src.key]
        assert torch.equal(value, live[key]), key


def test_wrapped_names_are_peft_state_dict_names(llama, custom):
    pm, base_sd, root = llama
    adapters = {"default": read_adapter(root / "peft"), "other": read_adapter(root / "peft", subfolder="other")}
    _check_names(pm, base_sd, adapters)
    _check_names(pm, base_sd, adapters, prefix="")
    pm, base_sd, root = custom
    names = wrapped_names(read_adapter(root / "peft"), list(base_sd))
    assert PREFIX + "head.modules_to_save.default.2.bias" in names and PREFIX + "emb.lora_embedding_A.default" in names
    _check_names(pm, base_sd, {"default": read_adapter(root / "peft")})


# ---------------------------------------------------------------------------------------------
# the rebuilt config
# ---------------------------------------------------------------------------------------------


def test_rebuilt_config_resolves_exactly_under_peft_rules():
    from peft.utils.other import get_pattern_key

    from adapterfmt.checkpoint.matching import matches_spec

    ranks = {"layers.1.x": 2, "model.layers.1.x": 4, "model.layers.2.x": 4}
    base_modules = list(ranks) + ["model", "model.layers", "extra.model.layers.2.x", "prelayers.1.x"]
    doc = rebuild_config(ranks, full_copies=["head"], use_dora=False, lora_bias=False, fan_in_fan_out=False,
                         base_modules=base_modules, alpha=16)
    assert doc["r"] == 4 and doc["rank_pattern"] == {exact_pattern("layers.1.x"): 2} and doc["lora_alpha"] == 16
    for module, rank in ranks.items():
        key = get_pattern_key(doc["rank_pattern"].keys(), module)
        assert doc["rank_pattern"].get(key, doc["r"]) == rank, module
    # "model.layers.2.x" is the dotted tail of "extra.model.layers.2.x": a list would catch both
    assert isinstance(doc["target_modules"], str)
    assert sorted(n for n in base_modules if re.fullmatch(doc["target_modules"], n)) == sorted(ranks)
    assert all(matches_spec(m, doc["target_modules"]) for m in ranks)
    with pytest.raises(InvalidConfigError, match="not both"):
        rebuild_config(ranks, full_copies=[], use_dora=False, lora_bias=False, fan_in_fan_out=False, alpha=1,
                       config=read_adapter("testdata/tiny-llama-lora").config)


# ---------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------


def test_convert_equals_save_pretrained_and_loads_in_peft(llama, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    pm, base_sd, root = llama
    res = convert_wrapped(root / "file", tmp_path / "out", alpha=ALPHAS, base_out=tmp_path / "base")
    assert res.adapters == {"default": str(tmp_path / "out"), "other": str(tmp_path / "out" / "other")}
    for sub in ("", "other"):
        _tensors_equal(load_file(tmp_path / "out" / sub / "adapter_model.safetensors"),
                       load_file(root / "peft" / sub / "adapter_model.safetensors"))
    _tensors_equal(load_file(tmp_path / "base" / "model.safetensors"), base_sd)
    assert sorted(os.listdir(tmp_path)) == ["base", "out"]  # no staging leftovers

    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    loaded = PeftModel.from_pretrained(base, tmp_path / "out")
    loaded.load_adapter(tmp_path / "out" / "other", adapter_name="other")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    for name in ("default", "other"):
        pm.set_adapter(name)
        loaded.set_adapter(name)
        assert torch.equal(logits(loaded, ids), logits(pm, ids)), name
    pm.set_adapter("default")


def test_convert_from_every_layout_and_with_a_known_config(llama, tmp_path):
    pm, base_sd, root = llama
    peft_default = load_file(root / "peft" / "adapter_model.safetensors")
    for p, kw in (("sharded", {}), ("noprefix", {}), ("pickle", {"allow_pickle": True})):
        convert_wrapped(root / p, tmp_path / p, adapter_name="default", alpha=8, base_out=tmp_path / f"{p}-base",
                        max_shard_size=20000, **kw)
        _tensors_equal(load_file(tmp_path / p / "adapter_model.safetensors"), peft_default)
        index = json.loads((tmp_path / f"{p}-base" / "model.safetensors.index.json").read_text())
        base = {}
        for shard in set(index["weight_map"].values()):
            base.update(load_file(tmp_path / f"{p}-base" / shard))
        _tensors_equal(base, base_sd)
    # a known config supplies alpha (and the rest); r / targets still come from the tensors
    convert_wrapped(root / "file", tmp_path / "cfg", config={"default": root / "peft", "other": root / "peft" / "other"})
    for sub, alpha in (("", 8), ("other", 6)):
        doc = json.loads((tmp_path / "cfg" / sub / "adapter_config.json").read_text())
        assert doc["lora_alpha"] == alpha and doc["layers_to_transform"] is None
    assert json.loads((tmp_path / "cfg" / "other" / "adapter_config.json").read_text())["use_dora"] is True


def test_convert_custom_module_loads_in_peft(custom, tmp_path):
    from peft import PeftModel

    from _wrapped_helpers import Custom

    pm, base_sd, root = custom
    convert_wrapped(root / "file", tmp_path / "out", alpha=5, base_out=tmp_path / "base")
    _tensors_equal(load_file(tmp_path / "out" / "adapter_model.safetensors"), load_file(root / "peft" / "adapter_model.safetensors"))
    base_out = load_file(tmp_path / "base" / "model.safetensors")
    _tensors_equal(base_out, base_sd)
    model = Custom().eval()
    model.load_state_dict(base_out)
    loaded = PeftModel.from_pretrained(model, tmp_path / "out")
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(loaded, ids), logits(pm, ids))


def test_convert_refuses_and_leaves_nothing(llama, tmp_path, monkeypatch):
    _, _, root = llama
    with pytest.raises(InvalidConfigError) as e:
        convert_wrapped(root / "file", tmp_path / "out")
    assert e.value.key == "lora_alpha" and "--alpha" in str(e.value)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(OutputPathError, match="exists and is not empty"):
        convert_wrapped(root / "file", tmp_path / "busy", alpha=8)
    with pytest.raises(OutputPathError, match="inside the input"):
        convert_wrapped(root / "sharded", root / "sharded" / "out", alpha=8)
    with pytest.raises(CheckpointNotFoundError, match="'default', 'other'"):
        convert_wrapped(root / "file", tmp_path / "out", adapter_name="nope", alpha=8)

    import adapterfmt.convert.wrapped as convert

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(convert, "write_base", boom)
    with pytest.raises(OSError, match="disk full"):
        convert_wrapped(root / "file", tmp_path / "out", alpha=8, base_out=tmp_path / "base")
    assert sorted(os.listdir(tmp_path)) == ["busy"] and os.listdir(tmp_path / "busy") == ["x"]


def test_convert_refuses_dora_on_some_modules_only(llama, tmp_path):
    pm, _, _ = llama
    sd = state_dict_of(pm)
    del sd[PREFIX + "model.layers.0.self_attn.o_proj.lora_magnitude_vector.other.weight"]
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(InconsistentAdapterError, match="use_dora holds for some LoRA modules only"):
        convert_wrapped(tmp_path / "w.safetensors", tmp_path / "out", adapter_name="other", alpha=6)
    assert not (tmp_path / "out").exists()


def test_two_wrapped_names_for_one_base_tensor_are_refused(tmp_path):
    sd = {"model.norm.weight": torch.ones(16), "model.norm.base_layer.weight": torch.ones(16),
          "lm_head.lora_A.default.weight": torch.ones(2, 16)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(InconsistentAdapterError, match="same base tensor 'model.norm.weight'"):
        read_wrapped(tmp_path / "w.safetensors")


@pytest.mark.parametrize("name", sorted(TINY_PEFT_CONFIGS))
def test_round_trip_every_saved_key_kind(name, tmp_path):
    """Each config of conftest's key-kind zoo (embedding, conv, container copy, DoRA, lora_bias,
    trainable tokens, the ``model.layers.0.x`` suffix trap, ``bias="all"``): the wrapped state
    dict converts (with the run's config) and PEFT rebuilds exactly the same wrapped state dict."""
    from peft import PeftModel

    pm = tiny_peft_model(name)
    base_keys = list(tiny_torch_model().state_dict())
    path = save_wrapped(pm, tmp_path / "w")
    pm.save_pretrained(tmp_path / "peft")
    names = wrapped_names(read_adapter(tmp_path / "peft"), base_keys)
    assert set(names) == set(pm.state_dict()), sorted(set(names) ^ set(pm.state_dict()))

    convert_wrapped(path, tmp_path / "out", config=tmp_path / "peft", base_out=tmp_path / "base")
    model = tiny_torch_model()
    model.load_state_dict(load_file(tmp_path / "base" / "model.safetensors"))
    loaded = PeftModel.from_pretrained(model, tmp_path / "out")
    _tensors_equal(state_dict_of(loaded), state_dict_of(pm))


def test_token_rows_need_the_runs_config_and_nested_wrappers_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    path = save_wrapped(tiny_peft_model("lora-bias-tokens"), tmp_path / "w")
    with pytest.raises(UnsupportedFeatureError, match="trainable-token rows without their indices"):
        convert_wrapped(path, tmp_path / "out", alpha=4)

    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2)

    path = save_wrapped(get_peft_model(Attention(), LoraConfig(r=2, target_modules=["attn"])), tmp_path / "mha")
    assert set(read_wrapped(path).adapters["default"].lora) == {"attn", "attn.base_layer.out_proj"}
    with pytest.raises(UnsupportedFeatureError, match="MultiheadAttention") as e:
        convert_wrapped(path, tmp_path / "out", alpha=4)
    assert e.value.key == "attn.base_layer.out_proj" and not (tmp_path / "out").exists()


def test_conv1d_model_gets_fan_in_fan_out_from_the_base_shapes(tmp_path):
    """GPT-2's ``Conv1D`` stores ``(in, out)``: the rebuilt config says so, and PEFT reloads exactly."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from _wrapped_helpers import randomize

    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    pm = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    randomize(pm, 1)
    path = save_wrapped(pm, tmp_path / "w", model_config=cfg.to_dict())
    convert_wrapped(path, tmp_path / "out", alpha=4, base_out=tmp_path / "base")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "out")
    _tensors_equal(state_dict_of(loaded), state_dict_of(pm))


@pytest.mark.parametrize("name", ["default", "other"])
def test_merge_wrapped_equals_peft_merge_and_unload(llama, tmp_path, name):
    from adapterfmt.convert.wrapped import merge_wrapped

    _, _, root = llama
    summary = merge_wrapped(root / "sharded", tmp_path / "merged", adapter_name=name, alpha=ALPHAS)
    assert summary.adapters == [f"{root / 'sharded'} [{name}]"] and summary.tensors_replaced == 1
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # the scratch copy is gone
    pm, _ = llama_two_adapters(0)  # merge_and_unload changes the model: use a fresh, identical one
    pm.set_adapter(name)
    _tensors_equal(load_file(tmp_path / "merged" / "model.safetensors"), state_dict_of(pm.merge_and_unload()))


def test_adapter_names_from_the_file_cannot_escape_the_output(tmp_path):
    sd = {"q.weight": torch.ones(4, 4), "q.lora_A./tmp/evil.weight": torch.ones(2, 4), "q.lora_B./tmp/evil.weight": torch.ones(4, 2)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    assert list(read_wrapped(tmp_path / "w.safetensors").adapters) == ["/tmp/evil"]
    with pytest.raises(UnsafeFileError, match="adapter name"):
        convert_wrapped(tmp_path / "w.safetensors", tmp_path / "out", alpha=2)
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"] and not os.path.exists("/tmp/evil")
