"""adapterfmt.load against PEFT's PeftModel.from_pretrained, on tiny models of every supported layer type.

We test, for Llama (Linear, rank/alpha patterns, full lm_head copy), Llama DoRA, Llama with a
full copy of its tied lm_head, BERT classifier
(+ lora_bias), GPT-2 (Conv1D; lora_bias; DoRA + rsLoRA), a custom Conv1d/2d/3d + Embedding network
(LoRA and DoRA + rsLoRA) and a diffusers SD3 transformer with ``proj_out`` saved in full:
* module names, state_dict keys (in order), values and requires_grad equal PEFT's;
* outputs equal within 1e-6 (float32);
* a training step with ``is_trainable=True`` changes exactly the LoRA tensors and full copies;
* the loader's modules (``loading``, ``saving``, ``wrapping``, ``adapter_state``) import neither peft nor transformers.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import adapterfmt
from adapterfmt.layers.full_copy import FullCopy
from adapterfmt.layers.lora import LoraLayer

from _load_helpers import (
    TESTDATA,
    assert_outputs_close,
    assert_same_structure,
    conv_embed_inputs,
    conv_embed_net,
    make_peft_adapter,
    make_unprefixed_adapter,
    peft_reference,
    sd3_inputs,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_llama_tied,
    tiny_sd3,
)


def _ids(vocab: int, shape: tuple[int, int] = (2, 7)) -> torch.Tensor:
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(0))


def llama_out(m):
    return m(_ids(256)).logits


def bert_out(m):
    ids = _ids(128, (2, 9))
    return m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def gpt2_out(m):
    return m(_ids(64, (2, 8))).logits


def conv_out(m):
    return m(conv_embed_inputs())


def sd3_out(m):
    return m(**sd3_inputs()).sample


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """PEFT-made adapters (get_peft_model + save_pretrained, or inject_adapter_in_model for diffusers)."""
    root = tmp_path_factory.mktemp("peft-adapters")
    return {
        "gpt2": make_peft_adapter(
            tiny_gpt2, root / "gpt2", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], lora_bias=True, modules_to_save=["ln_f"]
        ),
        "gpt2-dora": make_peft_adapter(
            tiny_gpt2, root / "gpt2-dora", r=4, lora_alpha=6, target_modules=["c_attn", "c_fc"], use_dora=True, use_rslora=True
        ),
        "conv": make_peft_adapter(
            conv_embed_net,
            root / "conv",
            r=4,
            lora_alpha=8,
            target_modules=["embed", "conv1", "conv2", "conv3", "head"],
            rank_pattern={"conv2": 2},
            alpha_pattern={"head": 3},
            modules_to_save=["classify"],
        ),
        "conv-dora": make_peft_adapter(
            conv_embed_net,
            root / "conv-dora",
            r=4,
            lora_alpha=5,
            target_modules=["embed", "conv1", "conv2", "conv3", "head"],
            use_dora=True,
            use_rslora=True,
        ),
        "sd3": make_peft_adapter(tiny_sd3, root / "sd3", **SD3_CONFIG),
        "sd3-unprefixed": make_unprefixed_adapter(tiny_sd3, root / "sd3-unprefixed", **SD3_CONFIG),
    }


SD3_CONFIG = dict(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], modules_to_save=["proj_out"])


CASES = {
    "llama-lora": (tiny_llama, TESTDATA / "tiny-llama-lora", llama_out),
    "llama-dora": (tiny_llama, TESTDATA / "tiny-llama-dora", llama_out),
    "llama-tied-head-copy": (tiny_llama_tied, TESTDATA / "tiny-llama-tied-lora", llama_out),
    "bert-classifier": (tiny_bert, TESTDATA / "tiny-bert-classifier", bert_out),
    "bert-lorabias": (tiny_bert, TESTDATA / "tiny-bert-lorabias", bert_out),
    "gpt2": (tiny_gpt2, "gpt2", gpt2_out),
    "gpt2-dora": (tiny_gpt2, "gpt2-dora", gpt2_out),
    "conv": (conv_embed_net, "conv", conv_out),
    "conv-dora": (conv_embed_net, "conv-dora", conv_out),
    "sd3": (tiny_sd3, "sd3", sd3_out),
}


def _case(name, generated):
    build, where, out = CASES[name]
    return build, (generated[where] if isinstance(where, str) else where), out


@pytest.mark.parametrize("name", list(CASES))
def test_load_matches_peft(name, generated):
    build, adapter_dir, out = _case(name, generated)
    ours = build()
    handle = adapterfmt.load(ours, adapter_dir)
    ref = peft_reference(build, adapter_dir)
    assert handle.model is ours and handle.active == ["default"]
    assert_same_structure(ours, ref.base_model.model)
    assert not any(p.requires_grad for p in ours.parameters())
    with torch.no_grad():
        assert_outputs_close(out(ours), out(ref))


@pytest.mark.parametrize("name", ["llama-lora", "conv-dora", "sd3"])
def test_trainable_flags_match_peft(name, generated):
    """LoRA tensors and full copies (SD3 ``proj_out`` included) require grad; the base is frozen."""
    build, adapter_dir, _ = _case(name, generated)
    ours = build()
    adapterfmt.load(ours, adapter_dir, is_trainable=True)
    ref = peft_reference(build, adapter_dir, is_trainable=True)
    assert_same_structure(ours, ref.base_model.model)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".modules_to_save.default." in n for n in trainable)


def test_unprefixed_keys_load_like_prefixed(generated):
    """diffusers-style files (``inject_adapter_in_model``, no ``base_model.model.``) load the same."""
    a, b = tiny_sd3(), tiny_sd3()
    adapterfmt.load(a, generated["sd3"])
    adapterfmt.load(b, generated["sd3-unprefixed"])
    assert_same_structure(a, b)
    with torch.no_grad():
        assert_outputs_close(sd3_out(a), sd3_out(b), atol=0)


def test_diffusers_full_copy_is_trainable_and_trains(generated):
    """One SGD step changes exactly the LoRA tensors and ``proj_out``'s copy, nothing else (seed 003)."""
    model = tiny_sd3()
    adapterfmt.load(model, generated["sd3"], is_trainable=True)
    assert isinstance(model.proj_out, FullCopy)
    assert all(p.requires_grad for p in model.proj_out.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in model.proj_out.original_module.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    model.train()
    sd3_out(model).pow(2).mean().backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == expected
    assert {"proj_out.modules_to_save.default.weight", "proj_out.modules_to_save.default.bias"} <= changed


def test_full_copy_freeze_helpers(generated):
    model = tiny_sd3()
    adapterfmt.load(model, generated["sd3"], is_trainable=True)
    copy = model.proj_out.modules_to_save["default"]
    adapterfmt.freeze_full_copies(model)
    assert not any(p.requires_grad for p in copy.parameters())
    lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert all(p.requires_grad for m in lora for p in m.adapter_parameters("default"))
    adapterfmt.unfreeze_full_copies(model, "default")
    assert all(p.requires_grad for p in copy.parameters())


def test_bf16_base_keeps_float32_adapters():
    """On a bf16 base the LoRA tensors are float32 (PEFT's autocast_adapter_dtype), the full copy bf16."""
    from transformers import AutoModelForCausalLM

    def build():
        return AutoModelForCausalLM.from_pretrained(TESTDATA / "tiny-llama", dtype=torch.bfloat16)

    ours = build()
    adapterfmt.load(ours, TESTDATA / "tiny-llama-lora")
    ref = peft_reference(build, TESTDATA / "tiny-llama-lora")
    assert_same_structure(ours, ref.base_model.model)
    assert ours.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        assert_outputs_close(llama_out(ours), llama_out(ref), atol=0)


def test_loading_imports_neither_peft_nor_transformers():
    code = (
        "import sys, adapterfmt, adapterfmt.loading.loader, adapterfmt.loading.saving, adapterfmt.loading.wrapping, adapterfmt.loading.adapters; "
        "adapterfmt.load; "
        "bad = [m for m in ('peft', 'transformers', 'diffusers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
