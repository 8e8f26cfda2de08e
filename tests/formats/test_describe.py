"""``read_adapter``: every tensor of real PEFT checkpoints lands in exactly one typed record."""

from __future__ import annotations

import pytest

from adapterfmt.formats.peft.reading import read_adapter
from adapterfmt.errors import CheckpointNotFoundError, UnsafeFileError
from adapterfmt.storage.header import read_header
from conftest import ADAPTERS, TESTDATA, TINY_PEFT_CONFIGS, tiny_peft_model, write_adapter

pytestmark = pytest.mark.filterwarnings("ignore:.*have invalid shape")  # PEFT's ZeRO-3 hint about lora_B.bias


def assert_every_key_once(ckpt) -> None:
    """Each tensor is in one record, or unknown, or an ignored wrapper leftover (with a warning)."""
    keys = set(read_header(ckpt.weights_file).tensors)
    leftovers = [k for f in ckpt.findings if f.code == "wrapper-leftover" for k in f.keys]
    described = list(ckpt.tensor_infos()) + list(ckpt.unknown_keys) + leftovers
    assert len(described) == len(set(described)) and set(described) == keys


@pytest.mark.parametrize("name", ADAPTERS)
def test_every_key_is_described_once(name):
    ckpt = read_adapter(TESTDATA / name)
    assert_every_key_once(ckpt)
    assert ckpt.unknown_keys == [] and ckpt.findings == []
    assert ckpt.prefix == "base_model.model."


def test_llama_lora_records():
    ckpt = read_adapter(TESTDATA / "tiny-llama-lora")
    assert len(ckpt.lora) == 14 and list(ckpt.full_copies) == ["lm_head"]
    q = ckpt.lora["model.layers.0.self_attn.q_proj"]
    assert (q.layer_kind, q.rank, q.config_rank, q.alpha, q.scaling) == ("linear", 8, 8, 16.0, 2.0)
    assert q.tensors["lora_A"].shape == (8, 64) and q.tensors["lora_B"].shape == (64, 8)
    assert q.keys["lora_B"] == "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    down = ckpt.lora["model.layers.1.mlp.down_proj"]
    assert (down.rank, down.alpha, down.scaling) == (4, 8.0, 2.0)
    head = ckpt.full_copies["lm_head"]
    assert list(head.tensors) == ["weight"] and head.tensors["weight"].shape == (256, 64)
    assert head.keys["weight"] == "base_model.model.lm_head.weight"


def test_classifier_full_copy_has_weight_and_bias():
    ckpt = read_adapter(TESTDATA / "tiny-bert-classifier")
    assert sorted(ckpt.full_copies["classifier"].tensors) == ["bias", "weight"]


def test_sub_adapters():
    top = read_adapter(TESTDATA / "tiny-llama-multi")
    assert (top.name, top.sub_adapters) == ("default", ["second"])
    assert read_adapter(TESTDATA / "tiny-llama-multi", subfolder="second").name == "second"
    assert read_adapter(TESTDATA / "tiny-llama-multi" / "second").name == "second"


# ---------------------------------------------------------------------------------------------
# checkpoints PEFT saves from a toy model: embedding, conv, DoRA, lora_bias, tokens, bias="all"
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import peft  # noqa: F401  (an oracle: missing means failing, never skipping)
    root = tmp_path_factory.mktemp("peft")
    out = {}
    for name in TINY_PEFT_CONFIGS:
        tiny_peft_model(name).save_pretrained(root / name)
        out[name] = read_adapter(root / name)
    return out


@pytest.mark.parametrize("name", list(TINY_PEFT_CONFIGS))
def test_peft_saved_checkpoints_are_fully_described(saved, name):
    ckpt = saved[name]
    assert_every_key_once(ckpt)
    assert ckpt.unknown_keys == []


def test_layer_kinds_and_container_copy(saved):
    ckpt = saved["lora-embedding-conv-container"]
    kinds = {p: m.layer_kind for p, m in ckpt.lora.items()}
    assert kinds == {"emb": "embedding", "q": "linear", "conv": "conv2d"}
    emb = ckpt.lora["emb"]
    assert emb.tensors["lora_A"].shape == (2, 16) and emb.tensors["lora_B"].shape == (8, 2)
    assert sorted(ckpt.full_copies["classifier"].tensors) == ["dense.bias", "dense.weight", "out_proj.bias", "out_proj.weight"]


def test_dora_magnitudes(saved):
    ckpt = saved["dora"]
    assert all(m.use_dora and "magnitude" in m.tensors for m in ckpt.lora.values())
    assert ckpt.lora["conv"].tensors["magnitude"].shape == (1, 4, 1, 1)


def test_lora_bias_and_trainable_tokens(saved):
    ckpt = saved["lora-bias-tokens"]
    assert ckpt.lora["q"].lora_bias and ckpt.lora["q"].tensors["lora_B.bias"].shape == (8,)
    delta = ckpt.token_deltas["emb"]
    assert delta.indices == [1, 3] and delta.tensor.shape == (2, 8)


def test_peft_suffix_collision_is_reported(saved):
    ckpt = saved["suffix-trap"]
    suffix = [f for f in ckpt.findings if f.code == "full-copy-suffix"]
    assert suffix and suffix[0].keys == ["img_model.layers.0.x"]


def test_bias_all_overrides_and_leftovers(saved):
    ckpt = saved["bias-all"]
    assert {"q.bias", "conv.bias", "model.layers.0.x.bias", "img_model.layers.0.x.bias"} <= set(ckpt.base_overrides)
    leftovers = [f for f in ckpt.findings if f.code == "wrapper-leftover"]
    assert len(leftovers) == 4


# ---------------------------------------------------------------------------------------------
# findings from headers alone, and errors
# ---------------------------------------------------------------------------------------------


def _lora(module: str, r: int = 2, prefix: str = "base_model.model.") -> dict:
    return {f"{prefix}{module}.lora_A.weight": ("F32", (r, 4)), f"{prefix}{module}.lora_B.weight": ("F32", (4, r))}


def test_mixed_prefix(tmp_path):
    d = write_adapter(tmp_path / "a", {**_lora("a.q"), **_lora("b.q", prefix="")}, {"r": 2, "target_modules": ["q"]})
    ckpt = read_adapter(d)
    assert [f.code for f in ckpt.findings] == ["mixed-prefix"]
    assert set(ckpt.lora) == {"a.q", "b.q"}


def test_unsupported_feature_and_pattern_overlap(tmp_path):
    d = write_adapter(
        tmp_path / "a",
        {**_lora("layers.0.self_attn.q_proj", r=4)},
        {"r": 4, "target_modules": ["q_proj"], "layer_replication": [[0, 1]], "alpha_pattern": {"q_proj": 2, "self_attn.q_proj": 3}},
    )
    codes = [f.code for f in read_adapter(d).findings]
    assert codes == ["unsupported-feature", "pattern-overlap"]


def test_directory_with_only_sub_adapters(tmp_path):
    import shutil

    shutil.copytree(TESTDATA / "tiny-llama-multi" / "second", tmp_path / "pack" / "second")
    with pytest.raises(CheckpointNotFoundError, match=r"sub-adapters \['second'\]"):
        read_adapter(tmp_path / "pack")


def test_file_instead_of_directory():
    path = TESTDATA / "tiny-llama-lora" / "adapter_config.json"
    with pytest.raises(CheckpointNotFoundError, match="is not a directory") as e:
        read_adapter(path)
    assert e.value.path == str(path)


def test_pickle_needs_permission(tmp_path):
    import shutil

    d = tmp_path / "a"
    shutil.copytree(TESTDATA / "tiny-llama-multi" / "second", d)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(UnsafeFileError, match="pickle"):
        read_adapter(d)
    with pytest.raises(UnsafeFileError, match="weights_only=True"):
        read_adapter(d, allow_pickle=True)  # not a pickle at all: refused, not crashed
