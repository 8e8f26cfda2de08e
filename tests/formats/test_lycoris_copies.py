"""PEFT LoHa / LoKr adapters with ``modules_to_save`` (full copies), against PEFT.

Two real transformers models from tiny configs: a DistilBERT classifier (``task_type`` SEQ_CLS,
whose ``classifier`` entry also wraps ``pre_classifier`` under PEFT's plain ``endswith``) and a
Llama causal LM with ``modules_to_save=["lm_head"]`` and a layer filter. Every adapter has random
non-zero factors and modified copies. adapterfmt.load gives PEFT's logits, names and trainable
set; `adapterfmt merge` gives merge_and_unload's tensors; inspect lists the copies; save writes
the files back. Each test builds its models in well under a second.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterfmt

PREFIX = "base_model.model."

#: arch -> (copies PEFT saves, extra config)
ARCHS = {
    "distilbert": (["classifier", "pre_classifier"], dict(task_type="SEQ_CLS", target_modules=["q_lin", "v_lin"], rank_pattern={"v_lin": 4})),
    "llama": (
        ["lm_head"],
        dict(target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"], layers_to_transform=[1], rank_pattern={"v_proj": 4}),
    ),
}
CASES = [(a, k) for a in ARCHS for k in ("loha", "lokr")]


def _base(arch: str):
    """The same seeded tiny model every call, in eval mode."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "distilbert":
        cfg = DistilBertConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=32, num_labels=3)
        return DistilBertForSequenceClassification(cfg).eval()
    cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _logits(model) -> torch.Tensor:
    ids = torch.tensor([[3, 7, 1, 12, 5, 9], [2, 4, 6, 8, 10, 11]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _config(arch: str, kind: str):
    from peft import LoHaConfig, LoKrConfig

    extra = dict(ARCHS[arch][1])
    if kind == "loha":
        return LoHaConfig(r=2, alpha=3, **extra)
    return LoKrConfig(r=2, alpha=3, decompose_both=True, decompose_factor=4, **extra)


def _peft_adapter(arch: str, kind: str, directory) -> None:
    """A PEFT adapter with random factors and full copies that differ from the base."""
    from peft import get_peft_model

    model = get_peft_model(_base(arch), _config(arch, kind))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".hada_" in n or ".lokr_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif ".modules_to_save.default." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(str(directory))


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def case(request, tmp_path_factory):
    arch, kind = request.param
    root = tmp_path_factory.mktemp(f"{arch}-{kind}")
    _base(arch).save_pretrained(str(root / "base"))
    _peft_adapter(arch, kind, root / "adapter")
    return arch, kind, root


def test_the_file_holds_the_copies_as_peft_saves_them(case):
    """The fixture is what the tests are about: plain copy keys next to the factors."""
    arch, kind, root = case
    keys = list(load_file(str(root / "adapter" / "adapter_model.safetensors")))
    copies = ARCHS[arch][0]
    assert {k[len(PREFIX):].split(".")[0] for k in keys if "hada_" not in k and "lokr_" not in k} == set(copies)
    factors = [k for k in keys if ".hada_" in k or ".lokr_" in k]
    assert factors and (arch != "llama" or all(".layers.1." in k for k in factors))  # layers_to_transform: selection only
    assert json.loads((root / "adapter" / "adapter_config.json").read_text())["peft_type"] == kind.upper()


def test_load_equals_peft(case, tmp_path):
    """Logits, state_dict names, trainable set; save writes PEFT's files back."""
    from peft import PeftModel

    arch, kind, root = case
    ref = PeftModel.from_pretrained(_base(arch), str(root / "adapter"), is_trainable=True).eval()
    model = _base(arch)
    handle = adapterfmt.load(model, root / "adapter", is_trainable=True)
    model.eval()
    assert torch.equal(_logits(model), _logits(ref))
    assert not torch.equal(_logits(model), _logits(_base(arch)))
    assert list(model.state_dict()) == [k[len(PREFIX):] for k in ref.state_dict()]
    trainable = {k[len(PREFIX):] for k, p in ref.named_parameters() if p.requires_grad}
    assert {k for k, p in model.named_parameters() if p.requires_grad} == trainable
    for copy in ARCHS[arch][0]:
        assert f"{copy}.modules_to_save.default.weight" in trainable
        assert f"{copy}.original_module.weight" in model.state_dict()
    assert sorted(handle.adapters["default"].full_copies) == sorted(ARCHS[arch][0])

    adapterfmt.save(model, tmp_path / "resaved")
    saved = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "resaved" / "adapter_model.safetensors"))
    assert set(saved) == set(ours) and all(torch.equal(saved[k], ours[k]) for k in saved)
    config = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    assert config == json.loads((root / "adapter" / "adapter_config.json").read_text())
    again = PeftModel.from_pretrained(_base(arch), str(tmp_path / "resaved")).eval()
    assert torch.equal(_logits(again), _logits(ref))


def test_merge_cli_equals_merge_and_unload(case, tmp_path, run_cli):
    """The merged directory holds merge_and_unload's tensors bit for bit and loads with from_pretrained."""
    from peft import PeftModel

    arch, kind, root = case
    merged_ref = PeftModel.from_pretrained(_base(arch), str(root / "adapter")).merge_and_unload().eval()
    expected = merged_ref.state_dict()
    r = run_cli("merge", "--base", root / "base", "--adapter", root / "adapter", "-o", tmp_path / "merged", "--json")
    assert r.exit_code == 0, r.stderr
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(ours) == set(expected)
    different = [k for k in ours if not torch.equal(ours[k], expected[k])]
    assert different == []
    base = _base(arch).state_dict()
    for copy in ARCHS[arch][0]:
        assert not torch.equal(ours[f"{copy}.weight"], base[f"{copy}.weight"])  # the copy replaced the base module
    loaded = type(merged_ref).from_pretrained(str(tmp_path / "merged")).eval()
    assert torch.equal(_logits(loaded), _logits(merged_ref))


def test_inspect_and_check_list_the_copies(case, run_cli):
    arch, kind, root = case
    doc = json.loads(run_cli("inspect", root / "adapter", "--json").stdout)
    copies = {m["module"]: m for m in doc["modules"] if m["type"] == "full_copy"}
    assert sorted(copies) == sorted(ARCHS[arch][0]) and doc["totals"]["full_copies"] == len(copies)
    assert doc["unknown_keys"] == [] and doc["methods"] == [kind]
    # as for a PEFT LoRA adapter: PEFT's plain endswith made 'classifier' save pre_classifier too
    expected = [("full-copy-suffix", ["pre_classifier"])] if arch == "distilbert" else []
    assert [(w["code"], w["keys"]) for w in doc["warnings"]] == expected
    file = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    for path, m in copies.items():
        assert m["rank"] is None and m["scaling"] is None
        for param, t in m["tensors"].items():
            assert t["key"] == f"{PREFIX}{path}.{param}" and t["shape"] == list(file[t["key"]].shape)
    assert doc["totals"]["tensors"] == len(file) and doc["totals"]["params"] == sum(t.numel() for t in file.values())
    r = run_cli("inspect", root / "adapter", "--json", "--base", root / "base")
    check = json.loads(r.stdout)["check"]["components"][0]
    assert r.exit_code == 0 and check["ok"] and check["resolved"] == check["total"] == len(doc["modules"])
    text = run_cli("inspect", root / "adapter").stdout
    assert "full copy" in text and f", {len(copies)} full cop" in text
    r = run_cli("check", "--base", root / "base", "--adapter", root / "adapter", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"]


def _copy_adapter(src, dst) -> None:
    dst.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (dst / name).write_bytes((src / name).read_bytes())


def test_a_broken_copy_is_refused_everywhere(case, tmp_path, run_cli):
    """A copy missing a tensor, a copy that does not fit the base, a factor module inside a copy:
    check fails, load and merge refuse, with one error line each; the model stays as it was."""
    from conftest import assert_one_error_line

    arch, kind, root = case
    copy = ARCHS[arch][0][0]
    tensors = load_file(str(root / "adapter" / "adapter_model.safetensors"))

    _copy_adapter(root / "adapter", tmp_path / "wide")
    wide = dict(tensors)
    wide[f"{PREFIX}{copy}.weight"] = torch.zeros(wide[f"{PREFIX}{copy}.weight"].shape[0] + 1, *wide[f"{PREFIX}{copy}.weight"].shape[1:])
    save_file(wide, str(tmp_path / "wide" / "adapter_model.safetensors"))
    r = run_cli("check", "--base", root / "base", "--adapter", tmp_path / "wide", "--json")
    assert r.exit_code == 1 and any(copy in e for e in json.loads(r.stdout)["components"][0]["shape_errors"])
    model = _base(arch)
    keys = list(model.state_dict())
    with pytest.raises(adapterfmt.ShapeMismatchError, match="full copy"):
        adapterfmt.load(model, tmp_path / "wide")
    assert list(model.state_dict()) == keys
    assert_one_error_line(run_cli("merge", "--base", root / "base", "--adapter", tmp_path / "wide", "-o", tmp_path / "out"), copy)
    assert not (tmp_path / "out").exists()

    if arch == "distilbert":  # classifier has a bias: a copy without it is incomplete (PEFT raises KeyError)
        _copy_adapter(root / "adapter", tmp_path / "nobias")
        save_file({k: v for k, v in tensors.items() if k != f"{PREFIX}{copy}.bias"}, str(tmp_path / "nobias" / "adapter_model.safetensors"))
        with pytest.raises(adapterfmt.InconsistentAdapterError, match="lacks bias"):
            adapterfmt.load(_base(arch), tmp_path / "nobias")

    _copy_adapter(root / "adapter", tmp_path / "both")  # a factor module on the copied module itself
    module = next(k for k in tensors if ".hada_" in k or ".lokr_" in k).rsplit(".", 1)[0]
    inside = dict(tensors)
    inside.update({f"{PREFIX}{copy}.{k.rsplit('.', 1)[1]}": v.clone() for k, v in tensors.items() if k.rsplit(".", 1)[0] == module})
    save_file(inside, str(tmp_path / "both" / "adapter_model.safetensors"))
    with pytest.raises(adapterfmt.AmbiguousMatchError, match="inside the full copy"):
        adapterfmt.load(_base(arch), tmp_path / "both")


def test_convert_to_kohya_refuses_full_copies(tmp_path, run_cli):
    """kohya / LyCORIS files have no full copies: converting one would drop them, so it is refused."""
    from conftest import assert_one_error_line

    _base("distilbert").save_pretrained(str(tmp_path / "base"))
    _peft_adapter("distilbert", "loha", tmp_path / "adapter")
    r = run_cli("convert", tmp_path / "adapter", "--to", "kohya", "-o", tmp_path / "out.safetensors", "--base", tmp_path / "base",
                "--component", "text_encoder")
    assert_one_error_line(r, "modules_to_save")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_bad_modules_to_save_is_one_config_error(tmp_path, run_cli):
    from conftest import assert_one_error_line, edit_adapter_config

    _peft_adapter("llama", "lokr", tmp_path / "adapter")
    edit_adapter_config(tmp_path / "adapter", modules_to_save="lm_head")
    assert_one_error_line(run_cli("inspect", tmp_path / "adapter"), "modules_to_save")
    with pytest.raises(adapterfmt.InvalidConfigError, match="modules_to_save"):
        adapterfmt.load(_base("llama"), tmp_path / "adapter")


def test_an_entry_without_tensors_is_reported(tmp_path, run_cli):
    """As for a PEFT LoRA adapter: a modules_to_save entry with no copy in the file is a warning."""
    _peft_adapter("llama", "lokr", tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if "lm_head" not in k}, str(path))
    doc = json.loads(run_cli("inspect", tmp_path / "adapter", "--json").stdout)
    assert [(w["code"], w["keys"]) for w in doc["warnings"]] == [("config-tensor-mismatch", ["lm_head"])]
    assert run_cli("inspect", tmp_path / "adapter", "--strict").exit_code == 1


def test_copy_keys_without_the_entry_stay_unknown(tmp_path, run_cli):
    """Without its modules_to_save entry a plain key is no copy: unknown, and refused (never dropped)."""
    from conftest import edit_adapter_config

    _peft_adapter("llama", "loha", tmp_path / "adapter")
    edit_adapter_config(tmp_path / "adapter", modules_to_save=None)
    doc = json.loads(run_cli("inspect", tmp_path / "adapter", "--json").stdout)
    assert doc["unknown_keys"] == [f"{PREFIX}lm_head.weight"] and doc["totals"]["full_copies"] == 0
    with pytest.raises(adapterfmt.UnknownKeyError):
        adapterfmt.load(_base("llama"), tmp_path / "adapter")


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_a_targeted_lm_head_saves_its_base_tensor(kind, tmp_path, run_cli):
    """Targeting lm_head makes PEFT save ``lm_head.base_layer.weight``, which replaces the base
    weight on load. Changed here before saving, so applying it shows: logits, merge, inspect, save."""
    from peft import LoHaConfig, LoKrConfig, PeftModel, get_peft_model

    cls = LoHaConfig if kind == "loha" else LoKrConfig
    peft_model = get_peft_model(_base("llama"), cls(r=2, alpha=3, target_modules=["q_proj", "lm_head"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if ".hada_" in n or ".lokr_" in n or n.endswith("lm_head.base_layer.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    key = f"{PREFIX}lm_head.base_layer.weight"
    assert key in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    _base("llama").save_pretrained(str(tmp_path / "base"))

    ref = PeftModel.from_pretrained(_base("llama"), str(tmp_path / "adapter")).eval()
    assert not torch.equal(ref.base_model.model.lm_head.base_layer.weight, _base("llama").lm_head.weight)
    model = _base("llama")
    adapterfmt.load(model, tmp_path / "adapter")
    assert torch.equal(_logits(model), _logits(ref))
    assert list(model.state_dict()) == [k[len(PREFIX):] for k in ref.state_dict()]
    adapterfmt.save(model, tmp_path / "resaved")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "resaved" / "adapter_model.safetensors"))
    assert set(saved) == set(ours) and all(torch.equal(saved[k], ours[k]) for k in saved)

    doc = json.loads(run_cli("inspect", tmp_path / "adapter", "--json", "--base", tmp_path / "base").stdout)
    assert [(m["module"], m["tensors"]["value"]["key"]) for m in doc["modules"] if m["type"] == "base_override"] == [("lm_head.weight", key)]
    assert doc["unknown_keys"] == [] and doc["check"]["components"][0]["ok"] and doc["check"]["components"][0]["total"] == len(doc["modules"])

    expected = ref.merge_and_unload().state_dict()
    r = run_cli("merge", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter", "-o", tmp_path / "merged")
    assert r.exit_code == 0, r.stderr
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(merged) == set(expected) and [k for k in merged if not torch.equal(merged[k], expected[k])] == []

    from conftest import assert_one_error_line  # kohya has no place for it: refused, never dropped

    r = run_cli("convert", tmp_path / "adapter", "--to", "kohya", "-o", tmp_path / "out.safetensors", "--base", tmp_path / "base",
                "--component", "text_encoder")
    assert_one_error_line(r, key, "saved base tensors")
