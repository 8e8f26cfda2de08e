"""The architecture matrix: for each tiny transformers model type (tests/tables/_arch_cases.py) with a PEFT
adapter that visibly changes its outputs, inspect, check, merge and load agree with PEFT.

* merge: the merged directory, loaded with transformers, equals PEFT's ``merge_and_unload``
  tensor by tensor (``torch.equal``) and by logits;
* load: ``adapterfmt.load`` gives PEFT's outputs, ``state_dict`` names and trainable set;
* check/inspect: every module resolves, through the architecture's conversion rules where the
  checkpoint names differ from the in-memory ones;
* names: every in-memory key of the model maps to a tensor on disk (or to a tied one).

Each base and adapter is built once per session (``built`` fixture).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import adapterfmt
from adapterfmt.tables.architectures import architecture_of, checkpoint_key

from _arch_cases import CASES, TARGET_PARAMETER_CASES, Built, build, load_base, output_of

warnings.filterwarnings("ignore")

IDS = [c.name for c in CASES]
PREFIX = "base_model.model."


@pytest.fixture(scope="session")
def _arch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arch")


_BUILT: dict[str, Built] = {}


@pytest.fixture(params=CASES, ids=IDS)
def built(request: pytest.FixtureRequest, _arch_root: Path) -> Built:
    case = request.param
    if case.name not in _BUILT:
        _BUILT[case.name] = build(case, _arch_root)
    return _BUILT[case.name]


def _peft(b: Built, *, trainable: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(b.case, b.base), str(b.adapter), is_trainable=trainable)


def test_matrix_covers_twenty_model_types() -> None:
    types = {c.config().model_type for c in CASES}
    assert len(types) >= 20, sorted(types)


def test_check_and_inspect(built: Built, run_cli) -> None:
    res = run_cli("check", "--base", built.base, "--adapter", built.adapter, "--json")
    assert res.exit_code == 0, res
    doc = res.json()
    ckpt = adapterfmt.read_adapter(built.adapter)
    resolution = adapterfmt.resolve(ckpt, adapterfmt.read_base(built.base))
    assert resolution.ok and len(resolution.lora) == len(ckpt.lora) and len(resolution.full_copies) == len(ckpt.full_copies), doc
    assert resolution.suggestion is None
    res = run_cli("inspect", built.adapter, "--base", built.base, "--json")
    assert res.exit_code == 0, res
    codes = {f["code"] for f in res.json().get("warnings", res.json().get("findings", []))}
    assert not codes & {"unresolved-module", "shape-mismatch", "unknown-key", "unsupported-feature"}, codes


def test_merge_equals_peft(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    summary = adapterfmt.merge_to_directory(built.base, built.adapter, out)
    ckpt = adapterfmt.read_adapter(built.adapter)
    assert summary.tensors_merged >= len(ckpt.lora) and summary.skipped == []
    assert summary.applied == [
        {
            "lora_modules": [len(ckpt.lora)] * 2,
            "full_copies": [len(ckpt.full_copies)] * 2,
            "base_tensors": [len(ckpt.base_overrides)] * 2,
            "token_rows": [len(ckpt.token_deltas)] * 2,
        }
    ]
    ref = _peft(built).merge_and_unload()
    ours = load_base(built.case, out)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    assert [k for k in ref_sd if not torch.equal(ref_sd[k], our_sd[k])] == []
    plain = output_of(load_base(built.case, built.base), built.case)
    merged = output_of(ours, built.case)
    assert torch.equal(merged, output_of(ref, built.case))
    assert (merged - plain).abs().max() > 1e-3, "the adapter must change the outputs"


def test_load_equals_peft(built: Built) -> None:
    ref = _peft(built, trainable=True)
    model = load_base(built.case, built.base)
    adapterfmt.load(model, built.adapter, is_trainable=True)
    torch.testing.assert_close(output_of(model.eval(), built.case), output_of(ref.eval(), built.case), rtol=0, atol=1e-6)
    ref_names = {k[len(PREFIX) :] for k in ref.state_dict()}
    assert set(model.state_dict()) == ref_names
    ref_trainable = {k[len(PREFIX) :] for k, p in ref.named_parameters() if p.requires_grad}
    assert {k for k, p in model.named_parameters() if p.requires_grad} == ref_trainable


def test_every_in_memory_key_is_on_disk(built: Built) -> None:
    """The conversion rules map every in-memory key of the model to a stored (or tied) tensor."""
    base = adapterfmt.read_base(built.base)
    model = load_base(built.case, built.base)
    tied_keys = {f"{m}.weight" for m in base.tied}
    arch = architecture_of(base.config)
    missing = []
    for key in model.state_dict():
        disk = checkpoint_key(base.config, key, base.tensors)
        if disk in base.tensors or disk in tied_keys or (arch is not None and arch.fused(key) is not None):
            continue
        missing.append((key, disk))
    assert missing == []


def test_tied_head_lora_counts_and_untie(tmp_path: Path) -> None:
    """OPT with LoRA on its tied lm_head: both tensors get W + ΔW, the config is untied, and the
    summary counts the head (the silent-skip bug: '2 tensors merged', lm_head left plain)."""
    case = next(c for c in CASES if c.name == "opt-tied-head")
    b = _BUILT.get(case.name) or build(case, tmp_path)
    out = tmp_path / "merged"
    summary = adapterfmt.merge_to_directory(b.base, b.adapter, out)
    assert summary.untied == ["lm_head.weight"] and summary.tensors_merged == 4
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ref = _peft(b).merge_and_unload().state_dict()
    ours = load_base(case, out).state_dict()
    for key in ("lm_head.weight", "model.decoder.embed_tokens.weight"):
        assert torch.equal(ours[key], ref[key])


def test_unplaceable_part_stops_the_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolved adapter part that no output tensor carries is an error, never a silent skip."""
    from adapterfmt.merging import plan as merge_plan
    from adapterfmt.errors import MergeError

    case = next(c for c in CASES if c.name == "opt-tied-head")
    b = _BUILT.get(case.name) or build(case, tmp_path)
    real = merge_plan._Slots._tensor

    def drop_head(self, key, info, slot, out_dtype):  # the old bug: the head's LoRA reached no tensor
        if slot is not None:
            terms = [t for t in slot.terms if getattr(getattr(t, "lora", None), "module", None) is None or t.lora.module.path != "lm_head"]
            slot = merge_plan._Slot(slot.full_copy, slot.override, terms)
        return real(self, key, info, slot, out_dtype)

    monkeypatch.setattr(merge_plan._Slots, "_tensor", drop_head)
    with pytest.raises(MergeError, match="lm_head"):
        adapterfmt.merge_to_directory(b.base, b.adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", TARGET_PARAMETER_CASES, ids=[c.name for c in TARGET_PARAMETER_CASES])
def test_target_parameters(case, tmp_path: Path, run_cli) -> None:
    """LoRA on parameters (PEFT's ``target_parameters``): fused 3-D MoE experts (Qwen3-MoE, nested
    wrappers on gate_up_proj and down_proj) and a 2-D router weight (Mixtral). check resolves them
    onto the on-disk per-expert tensors through the conversion rules; the merge equals PEFT's
    (PEFT sums the expert delta with einsum, adapterfmt per expert with a matmul: equal to
    float32 rounding); load equals PEFT in outputs, names, trainable set and the re-saved file."""
    from safetensors.torch import load_file

    b = build(case, tmp_path)
    res = run_cli("check", "--base", b.base, "--adapter", b.adapter, "--json")
    assert res.exit_code == 0, res
    doc = run_cli("inspect", b.adapter, "--json").json()
    codes = {f["code"] for f in doc.get("warnings", doc.get("findings", []))}
    assert not codes & {"unsupported-feature", "rank-mismatch", "config-tensor-mismatch"}, codes
    summary = adapterfmt.merge_to_directory(b.base, b.adapter, tmp_path / "out")
    ref = _peft(b, trainable=True)
    forward = output_of(ref, case)

    model = load_base(case, b.base)
    adapterfmt.load(model, b.adapter, is_trainable=True)
    assert torch.equal(output_of(model, case), forward)
    assert set(model.state_dict()) == {k[len(PREFIX) :] for k in ref.state_dict()}
    assert {k for k, p in model.named_parameters() if p.requires_grad} == {k[len(PREFIX) :] for k, p in ref.named_parameters() if p.requires_grad}
    adapterfmt.save(model, tmp_path / "resaved")
    saved, ours_saved = load_file(str(b.adapter / "adapter_model.safetensors")), load_file(str(tmp_path / "resaved" / "adapter_model.safetensors"))
    assert set(saved) == set(ours_saved) and all(torch.equal(saved[k], ours_saved[k]) for k in saved)

    ref_sd = ref.merge_and_unload().state_dict()
    ours = load_base(case, tmp_path / "out")
    our_sd = ours.state_dict()
    assert set(our_sd) == set(ref_sd)
    for key, value in ref_sd.items():
        torch.testing.assert_close(our_sd[key], value, rtol=0, atol=1e-6)
    plain = load_base(case, b.base).state_dict()
    assert sum(not torch.equal(our_sd[k], plain[k]) for k in our_sd) >= 2
    torch.testing.assert_close(output_of(ours, case), forward, rtol=0, atol=1e-5)
    assert summary.tensors_merged >= len(adapterfmt.read_adapter(b.adapter).lora)
    adapterfmt.unload(model, merge=True)
    torch.testing.assert_close(output_of(model, case), forward, rtol=0, atol=1e-5)


def test_merge_prefix_map(tmp_path: Path, run_cli) -> None:
    """An adapter trained on a model nested under another path: merge refuses it with a suggested
    rewrite that points at a tensor of the right shape, and --prefix-map OLD=NEW merges it."""
    from safetensors.torch import load_file, save_file

    case = next(c for c in CASES if c.name == "qwen2")
    b = _BUILT.get(case.name) or build(case, tmp_path)
    nested = tmp_path / "nested"
    nested.mkdir()
    tensors = load_file(str(b.adapter / "adapter_model.safetensors"))
    save_file({k.replace(PREFIX + "model.", PREFIX + "language_model.model."): v for k, v in tensors.items()}, str(nested / "adapter_model.safetensors"))
    (nested / "adapter_config.json").write_text((b.adapter / "adapter_config.json").read_text())
    res = run_cli("merge", "--base", b.base, "--adapter", nested, "-o", tmp_path / "out")
    assert res.exit_code == 2 and "--prefix-map 'language_model.='" in res.stderr, res
    res = run_cli("merge", "--base", b.base, "--adapter", nested, "-o", tmp_path / "out", "--prefix-map", "language_model.model.=model.", "--json")
    assert res.exit_code == 0, res
    ref = _peft(b).merge_and_unload().state_dict()
    ours = load_base(case, tmp_path / "out").state_dict()
    assert all(torch.equal(ours[k], v) for k, v in ref.items())


def test_suggestion_never_points_at_a_shared_or_misshapen_tensor(tmp_path: Path) -> None:
    """T5: a full copy of a module the base does not have is never 'fixed' by a rewrite onto the
    embedding shared by encoder, decoder and head; a LoRA is never rewritten onto another shape."""
    from conftest import write_adapter, write_base

    base = write_base(
        tmp_path / "t5",
        {"shared.weight": ("F32", [64, 16]), "encoder.block.0.layer.0.SelfAttention.q.weight": ("F32", [16, 16]), "gate.weight": ("F32", [3, 16])},
        {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "tie_word_embeddings": True},
    )
    adapter = write_adapter(
        tmp_path / "a",
        {"base_model.model.output_embed.weight": ("F32", [64, 16]), "base_model.model.x.q.lora_A.weight": ("F32", [2, 16]),
         "base_model.model.x.q.lora_B.weight": ("F32", [8, 2])},
        {"r": 2, "lora_alpha": 4, "target_modules": ["q"], "modules_to_save": ["output_embed"]},
    )
    res = adapterfmt.resolve(adapterfmt.read_adapter(adapter), adapterfmt.read_base(base))
    assert not res.ok and res.suggestion is None, res.suggestion


def test_targets_prefix_map(run_cli, testdata: Path) -> None:
    """targets --prefix-map shows and matches base modules as a nested adapter names them."""
    res = run_cli("targets", "--base", testdata / "tiny-llama", "--target-modules", "language_model.model.layers.0.self_attn.q_proj",
                  "--prefix-map", "language_model.model.=model.", "--json")
    assert res.exit_code == 0, res
    assert [r["module"] for r in res.json()["lora_targets"]] == ["language_model.model.layers.0.self_attn.q_proj"]
    res = run_cli("targets", "--base", testdata / "tiny-llama", "--target-modules", "language_model.model.layers.0.self_attn.q_proj", "--json")
    assert res.exit_code == 1


def test_targets_shows_in_memory_names(tmp_path: Path, run_cli) -> None:
    """targets previews the names PEFT matches (in memory), not the checkpoint's: ViT's q_proj,
    GPT-NeoX's lm_head (embed_out on disk); Mixtral's per-expert pieces are no modules."""
    expected = {
        "vit-renamed": (["q_proj", "fc1"], {"vit.layers.0.attention.q_proj", "vit.layers.0.mlp.fc1"}),
        "gpt-neox-embed-out": (["lm_head"], {"lm_head"}),
        "mixtral": (["w1", "q_proj"], {"model.layers.0.self_attn.q_proj"}),
    }
    for name, (targets, modules) in expected.items():
        case = next(c for c in CASES if c.name == name)
        b = _BUILT.get(name) or build(case, tmp_path)
        res = run_cli("targets", "--base", b.base, "--target-modules", ",".join(targets), "--json")
        assert {r["module"] for r in res.json()["lora_targets"]} == modules, (name, res)


@pytest.mark.parametrize("equal", [True, False], ids=["equal-tied-in-memory", "different-untied"])
def test_tied_head_stored_twice(equal: bool, tmp_path: Path) -> None:
    """A tied OPT whose checkpoint stores lm_head.weight next to the embedding: transformers ties
    them in memory when the bytes are equal (then a LoRA on lm_head changes both, as PEFT's merge
    does), and keeps them apart when they differ."""
    from safetensors.torch import load_file, save_file

    case = next(c for c in CASES if c.name == "opt-tied-head")
    b = _BUILT.get(case.name) or build(case, tmp_path)
    base = tmp_path / "both"
    base.mkdir()
    for f in b.base.iterdir():
        if f.name != "model.safetensors":
            (base / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(b.base / "model.safetensors"))
    head = tensors["model.decoder.embed_tokens.weight"].clone()
    if not equal:
        head[0] += 1.0
    tensors["lm_head.weight"] = head
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    summary = adapterfmt.merge_to_directory(base, b.adapter, tmp_path / "out")
    assert summary.skipped == []
    ref = _peft(Built(case, base, b.adapter)).merge_and_unload().state_dict()
    ours = load_base(case, tmp_path / "out").state_dict()
    for key in ("lm_head.weight", "model.decoder.embed_tokens.weight"):
        assert torch.equal(ours[key], ref[key]), key
    assert torch.equal(ours["lm_head.weight"], ours["model.decoder.embed_tokens.weight"]) == equal
