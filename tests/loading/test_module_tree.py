"""``adapterfmt.load`` gives ``PeftModel.from_pretrained``'s module tree, exactly, for every method and
architecture the loader supports (BEHAVIOUR §5).

For each case PEFT builds an adapter (``get_peft_model``, trainable tensors moved off their
initial values, ``save_pretrained``); then ``PeftModel.from_pretrained(..., is_trainable=True)`` and
``adapterfmt.load(..., is_trainable=True)`` load it onto two fresh copies of the same base and the
wrapped models must agree in

* ``named_modules()`` names, in order (empty ``lora_dropout`` / ``lora_embedding_A`` ... containers
  included: PEFT's layers all carry them);
* ``state_dict()`` keys, in order, and ``named_buffers()`` names (non-persistent ones too);
* the trainable set (parameters with ``requires_grad``);
* tied parameters: every group of names that is ONE parameter object in PEFT is one object in
  adapterfmt, and no other (``ensure_weight_tying`` shares the head's full copy with the
  embedding's: training must not untie them);
* outputs.

The matrix: every architecture of ``tests/_arch_cases.py`` with its plain LoRA, and every method
(LoRA with DoRA / ``lora_bias`` / rslora / dropout / patterns / ``bias`` / ``modules_to_save`` /
trainable tokens / ``target_parameters`` / ``ensure_weight_tying``, AdaLoRA, LoHa, LoKr) on one or
two of them, plus conv / embedding layers (a plain network and a diffusers UNet), and kohya /
LyCORIS files (LoRA, LoCon, LoHa, LoKr) against PEFT loading their ``convert --to peft`` output.
A method the loader learns is added here, so its tree cannot drift from PEFT's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import adapterfmt
from _arch_cases import CASES, TARGET_PARAMETER_CASES, Case, inputs_for
from _diffusion_helpers import tiny_unet, unet_inputs
from _load_helpers import conv_embed_inputs, conv_embed_net

warnings.filterwarnings("ignore")


@dataclass
class TreeCase:
    id: str
    model: Callable[[], nn.Module]  #: a fresh, seeded base (same weights on every call)
    config: Callable[[], Any]  #: the PEFT config
    run: Callable[[nn.Module], torch.Tensor]  #: the model's output on fixed inputs


def _arch(name: str) -> Case:
    return next(c for c in CASES + TARGET_PARAMETER_CASES if c.name == name)


def _transformers_model(case: Case) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        return getattr(transformers, case.auto).from_config(case.config()).eval()

    return make


def _transformers_run(case: Case) -> Callable[[nn.Module], torch.Tensor]:
    return lambda model: model(**inputs_for(case)).logits


def _on(arch: str, make_config: Callable[[], Any], tag: str) -> TreeCase:
    case = _arch(arch)
    return TreeCase(f"{tag}-{arch}", _transformers_model(case), make_config, _transformers_run(case))


def _lora(**kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        from peft import LoraConfig

        return LoraConfig(**{"r": 2, "lora_alpha": 4, **kw})

    return make


def _peft(cls: str, **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        import peft

        return getattr(peft, cls)(**kw)

    return make


def _unet_run(model: nn.Module) -> torch.Tensor:
    out = model(*unet_inputs())
    return out.sample if hasattr(out, "sample") else out[0]


LLAMA = "llama-tied-head"
UNET_TARGETS = ["to_q", "to_k", "to_out.0", "conv1", "conv2", "proj_in", "linear_1"]

#: every architecture with its plain LoRA (target_parameters: the MoE experts and the router)
ARCHITECTURES = [TreeCase(f"lora-{c.name}", _transformers_model(c), _lora(**c.lora), _transformers_run(c)) for c in CASES + TARGET_PARAMETER_CASES]

METHODS = [
    _on(LLAMA, _lora(target_modules=["q_proj", "v_proj"], lora_dropout=0.1), "lora-dropout"),
    _on(LLAMA, _lora(target_modules=["q_proj", "v_proj"], use_dora=True), "dora"),
    _on(LLAMA, _lora(target_modules=["q_proj", "v_proj"], lora_bias=True), "lora-bias"),
    _on(LLAMA, _lora(target_modules=["q_proj", "v_proj"], use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 3}), "rslora-patterns"),
    _on(LLAMA, _lora(target_modules=["q_proj"], bias="all"), "bias-all"),
    _on(LLAMA, _lora(target_modules=["embed_tokens", "q_proj"], use_dora=True), "embedding-dora"),
    _on("qwen2", _lora(target_modules=["q_proj"], layers_to_transform=[0]), "layers-to-transform"),
    _on("gpt2-conv1d", _lora(target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True), "conv1d-dora"),
    _on("bert-classifier", _lora(target_modules=["query", "value"], lora_bias=True, bias="lora_only", modules_to_save=["classifier"]), "modules-to-save"),
    _on("llama-untied-embedding", _lora(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules-to-save"),
    _on(LLAMA, _lora(target_modules=["q_proj"], trainable_token_indices=[1, 3]), "trainable-tokens"),
    _on("llama-untied-embedding", _lora(target_modules=["q_proj"], trainable_token_indices=[1, 3]), "trainable-tokens"),
    _on(LLAMA, _lora(target_modules=["q_proj"], trainable_token_indices=[1, 3], ensure_weight_tying=True), "tokens-weight-tying"),
    _on(LLAMA, _lora(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True), "copy-weight-tying"),
    _on(LLAMA, _lora(target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True), "head-copy-weight-tying"),
    _on(LLAMA, _lora(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True), "lora-weight-tying"),
    _on("qwen3-moe-experts", _lora(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"]), "target-parameters"),
    _on(LLAMA, _peft("AdaLoraConfig", r=2, target_modules=["q_proj", "v_proj"], total_step=10), "adalora"),
    _on("bert-classifier", _peft("AdaLoraConfig", r=2, target_modules=["query"], lora_dropout=0.1, modules_to_save=["classifier"], total_step=10), "adalora"),
    _on(LLAMA, _peft("LoHaConfig", r=2, target_modules=["q_proj", "v_proj"], rank_dropout=0.1, module_dropout=0.1), "loha"),
    _on("bert-classifier", _peft("LoHaConfig", r=2, target_modules=["query"], modules_to_save=["classifier"]), "loha"),
    _on(LLAMA, _peft("LoKrConfig", r=2, target_modules=["q_proj", "v_proj"]), "lokr"),
    _on(LLAMA, _peft("LoKrConfig", r=2, target_modules=["q_proj", "v_proj"], decompose_both=True, decompose_factor=4, rank_dropout=0.1), "lokr-both"),
    TreeCase("lora-conv-embedding", conv_embed_net, _lora(target_modules=["embed", "conv1", "conv2", "conv3", "head"], use_dora=True),
             lambda m: m(conv_embed_inputs())),
    TreeCase("loha-unet-cp", tiny_unet, _peft("LoHaConfig", r=4, alpha=6, target_modules=UNET_TARGETS, use_effective_conv2d=True), _unet_run),
    TreeCase("lokr-unet-cp", tiny_unet,
             _peft("LoKrConfig", r=4, alpha=6, target_modules=UNET_TARGETS, use_effective_conv2d=True, decompose_both=True, decompose_factor=2),
             _unet_run),
]


def _peft_adapter(case: TreeCase, directory: Path) -> Path:
    """PEFT's adapter for ``case``, every trainable tensor moved off its initial value."""
    from peft import get_peft_model

    model = get_peft_model(case.model(), case.config())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
    model.save_pretrained(str(directory))
    return directory


def _ties(model: nn.Module) -> set[tuple[str, ...]]:
    """Groups of parameter names that are one parameter object."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {tuple(sorted(names)) for names in groups.values() if len(names) > 1}


def _tree(model: nn.Module) -> dict[str, Any]:
    return {
        "modules": [n for n, _ in model.named_modules()],
        "state_dict": list(model.state_dict()),
        "buffers": sorted(n for n, _ in model.named_buffers()),
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "ties": _ties(model),
    }


@pytest.mark.parametrize("case", ARCHITECTURES + METHODS, ids=lambda c: c.id)
def test_load_gives_peft_module_tree(case: TreeCase, tmp_path: Path) -> None:
    from peft import PeftModel

    adapter = _peft_adapter(case, tmp_path / "adapter")
    ref = PeftModel.from_pretrained(case.model(), str(adapter), is_trainable=True).base_model.model
    ours = case.model()
    adapterfmt.load(ours, adapter, is_trainable=True)
    expected, got = _tree(ref), _tree(ours)
    for part in expected:
        assert got[part] == expected[part], part
    assert expected["trainable"]
    ref.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(case.run(ours), case.run(ref), rtol=0, atol=1e-5)


def test_weight_tied_copies_train_and_save_as_one(tmp_path: Path) -> None:
    """``ensure_weight_tying`` with the embedding saved in full: the head's copy is the embedding
    copy's parameter, so a training step keeps them one tensor (as in PEFT) and save writes PEFT's
    file back; a file whose two values differ is refused and leaves the model as it was."""
    from safetensors.torch import load_file, save_file

    from adapterfmt.errors import InconsistentAdapterError

    case = next(c for c in METHODS if c.id == "copy-weight-tying-llama-tied-head")
    adapter = _peft_adapter(case, tmp_path / "adapter")
    model = case.model()
    adapterfmt.load(model, adapter, is_trainable=True)
    head, emb = model.lm_head.modules_to_save["default"], model.model.embed_tokens.modules_to_save["default"]
    assert head.weight is emb.weight
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    before = emb.weight.detach().clone()
    opt.step()
    assert not torch.equal(emb.weight, before) and head.weight is emb.weight
    adapterfmt.save(model, tmp_path / "resaved")
    saved = load_file(str(tmp_path / "resaved" / "adapter_model.safetensors"))
    assert set(saved) == set(load_file(str(adapter / "adapter_model.safetensors")))
    assert torch.equal(saved["base_model.model.lm_head.weight"], saved["base_model.model.model.embed_tokens.weight"])

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"] + 1
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    plain = case.model()
    names = [n for n, _ in plain.named_modules()]
    with pytest.raises(InconsistentAdapterError, match="lm_head.weight.*different values"):
        adapterfmt.load(plain, adapter)
    assert [n for n, _ in plain.named_modules()] == names and not hasattr(plain, "_adapterfmt")


@pytest.mark.parametrize("algo", ["lora", "locon", "loha", "lokr"])
def test_load_of_a_kohya_file_gives_the_tree_of_its_peft_conversion(algo: str, tmp_path: Path) -> None:
    """A kohya / LyCORIS file loaded with ``component=`` has the module tree PEFT gives the same file
    converted (``convert --to peft``): the foreign loader builds PEFT's layers too. Rank 2 on the
    tiny UNet, so LoKr stores lokr_w2 whole in some modules and factored in others."""
    from peft import PeftModel

    from _diffusion_helpers import lycoris_network, save_component, save_lycoris, tiny_clip
    from adapterfmt.convert.foreign import to_peft

    unet = tiny_unet()
    net = lycoris_network(tiny_clip(), unet, algo=algo, dim=2, alpha=3, **({"factor": -1} if algo == "lokr" else {}))
    file = save_lycoris(net, str(tmp_path / f"{algo}.safetensors"))
    save_component(tiny_unet(), str(tmp_path / "unet"))
    to_peft(file, str(tmp_path / "peft"), base=str(tmp_path / "unet"), component="unet")
    ref = PeftModel.from_pretrained(tiny_unet(), str(tmp_path / "peft"), is_trainable=True).base_model.model
    ours = tiny_unet()
    adapterfmt.load(ours, file, component="unet", is_trainable=True)
    expected, got = _tree(ref), _tree(ours)
    for part in expected:
        assert got[part] == expected[part], part
    assert expected["trainable"]
    ref.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(_unet_run(ours), _unet_run(ref), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cid", ["copy-weight-tying-llama-tied-head", "lora-weight-tying-llama-tied-head"])
def test_second_weight_tied_adapter_keeps_its_head(cid: str, tmp_path: Path) -> None:
    """Deliberately not PEFT's: PEFT 0.21's ``load_adapter`` builds no head copy / head LoRA for a
    second ``ensure_weight_tying`` adapter and leaves the file's head tensors unused (its outputs
    then differ from the adapter loaded alone). adapterfmt builds them for every adapter, so the
    second adapter, made active, gives ``PeftModel.from_pretrained``'s outputs for that adapter alone."""
    from peft import PeftModel

    case = next(c for c in METHODS if c.id == cid)
    first, second = _peft_adapter(case, tmp_path / "a"), _peft_adapter(case, tmp_path / "b")
    alone = PeftModel.from_pretrained(case.model(), str(second)).eval()
    ours = case.model()
    adapterfmt.load(ours, first)
    adapterfmt.load(ours, second, adapter_name="other")
    adapterfmt.set_adapter(ours, "other")
    with torch.no_grad():
        torch.testing.assert_close(case.run(ours), case.run(alone), rtol=0, atol=1e-5)
