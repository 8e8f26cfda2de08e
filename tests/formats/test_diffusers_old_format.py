"""The older diffusers LoRA spellings (pre-PEFT training scripts): ``unet.<attn>.processor.to_q_lora.down.weight``,
``unet.<module>.lora.down.weight``, ``text_encoder.<attn>.q_proj.lora_linear_layer.down.weight`` (and
``to_q_lora`` on text encoders), and UNet keys with no prefix.

Files are built from PEFT-injected tiny models: the PEFT keys are respelled with diffusers' own tables
read backwards (and ``convert_state_dict_to_diffusers`` for the text encoder), and diffusers'
own renaming functions are checked to give the PEFT keys back. Oracles: diffusers 0.42's
``load_lora_weights`` + ``fuse_lora`` on a saved pipeline, ``load_lora_adapter(prefix=None)`` for
files with no prefix, and diffusers' renaming functions for every key.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterfmt
from adapterfmt.errors import InconsistentAdapterError
from adapterfmt.formats import detect_format, read_foreign

from _diffusion_helpers import assert_merged_like_fused, rel_err, save_pipeline, te_out, tiny_clip, tiny_unet, unet_out
from conftest import assert_one_error_line

TOL = 1e-4
REPO = Path(__file__).resolve().parents[2]

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def _peft_lora(model, targets, rank_pattern, seed):
    """PEFT LoRA on ``model`` (ranks 4 and 2, alpha ignored by the old format), every factor random."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern=rank_pattern), model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}


def _respell(key: str, table: dict[str, str]) -> str:
    """``key`` with the first pattern of diffusers' ``table`` read backwards (new -> old) replaced."""
    for old, new in table.items():
        if new in key:
            return key.replace(new, old)
    raise AssertionError(key)


def old_unet_keys(peft_sd: dict) -> dict:
    """Attention processors (``attn1.processor.to_q_lora.down``) on self-attention, ``LoRACompatible``
    layers (``.lora.down``) everywhere else: the two UNet spellings, from ``UNET_TO_DIFFUSERS``."""
    from diffusers.utils.state_dict_utils import UNET_TO_DIFFUSERS

    out = {}
    for k, v in peft_sd.items():
        if ".attn1." in k and ".to_" in k:
            old = _respell(k, UNET_TO_DIFFUSERS)
            old = old.replace(".attn1.", ".attn1.processor.")
        else:
            old = _respell(k, {".lora.up": ".lora_B", ".lora.down": ".lora_A"})
        out[old] = v
    return out


def old_te_keys(peft_sd: dict, *, processors: bool = False) -> dict:
    """``lora_linear_layer`` (diffusers' own ``convert_state_dict_to_diffusers``, plus the generic rule for
    ``fc1``), or with ``processors`` the oldest ``self_attn.to_q_lora.down`` from ``DIFFUSERS_OLD_TO_PEFT``."""
    from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_PEFT, DIFFUSERS_TO_PEFT, convert_state_dict_to_diffusers

    if processors:
        return {_respell(k, DIFFUSERS_OLD_TO_PEFT): v for k, v in peft_sd.items()}
    sd = convert_state_dict_to_diffusers(peft_sd)
    return {(k if "lora_linear_layer" in k else _respell(k, DIFFUSERS_TO_PEFT)): v for k, v in sd.items()}


def diffusers_renames(file: str) -> dict[str, str]:
    """file key -> the PEFT key diffusers 0.42 loads it as (its own renaming functions, per component)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    keys = list(load_file(file))
    out = {}
    prefixes = ("unet.", "text_encoder.", "text_encoder_2.")
    groups = {p: [k for k in keys if k.startswith(p)] for p in prefixes}
    groups[""] = [k for k in keys if not k.startswith(prefixes)]
    for prefix, group in groups.items():
        if not group:
            continue
        sd = {k[len(prefix) :]: k for k in group}  # values: the file key, carried through the renaming
        if prefix.startswith("text_encoder"):
            renamed = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
        else:
            renamed = convert_unet_state_dict_to_peft(sd)
        out.update({file_key: new for new, file_key in renamed.items()})
    return out


def our_renames(file: str) -> dict[str, str]:
    peft_name = {"lora_down": "lora_A.weight", "lora_up": "lora_B.weight"}
    return {key: f"{m.name}.{peft_name[slot]}" for m in read_foreign(file).modules for slot, key in m.keys.items()}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A UNet (both old spellings, two ranks, 3x3 convs) + text encoder (``lora_linear_layer``) file,
    the base pipeline saved by diffusers, and a copy of the UNet part with no prefix."""
    d = tmp_path_factory.mktemp("olddiff")
    unet, te = tiny_unet(), tiny_clip()
    base = {"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(te)}
    pipe = save_pipeline(str(d / "pipe"), base["unet"], base["text_encoder"], str(d))
    unet_sd = _peft_lora(unet, UNET_TARGETS, {"proj_out": 2, "conv1": 2}, seed=3)
    te_sd = _peft_lora(te, TE_TARGETS, {"fc1": 2}, seed=4)
    old_unet, old_te = old_unet_keys(unet_sd), old_te_keys(te_sd)
    file = str(d / "pytorch_lora_weights.safetensors")
    # text encoder keys as the old files name CLIP's modules (text_model.encoder...; transformers 5 dropped text_model.)
    save_file({**{f"unet.{k}": v for k, v in old_unet.items()}, **{f"text_encoder.text_model.{k}": v for k, v in old_te.items()}}, file)
    bare = str(d / "bare.safetensors")
    save_file(old_unet, bare)
    return {"dir": d, "pipe": pipe, "file": file, "bare": bare, "base": base, "unet_sd": unet_sd, "te_sd": te_sd,
            "ref": {"unet": unet_out(base["unet"]), "text_encoder": te_out(base["text_encoder"])}}


@pytest.fixture(scope="module")
def oracle(case):
    """diffusers' own pipeline after ``load_lora_weights(FILE)`` (unfused outputs) and ``fuse_lora``."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(case["pipe"])
    pipe.load_lora_weights(case["file"])
    out = {"unet": unet_out(pipe.unet), "text_encoder": te_out(pipe.text_encoder)}
    pipe.fuse_lora()
    return {"pipe": pipe, "out": out}


def test_tables_match_the_pinned_diffusers() -> None:
    spec = importlib.util.spec_from_file_location("gen_diffusers_tables", REPO / "scripts" / "gen_diffusers_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = (REPO / "adapterfmt" / "tables" / "diffusers_tables.json").read_text(encoding="utf-8")
    assert module.build() == shipped, "adapterfmt/tables/diffusers_tables.json is stale: run `python scripts/gen_diffusers_tables.py`"


def test_the_test_files_are_what_diffusers_renames_back_to_peft(case):
    """The respelled files really are older spellings diffusers maps to the PEFT keys they came from."""
    keys = list(load_file(case["file"]))
    assert any(".processor.to_q_lora.down.weight" in k for k in keys) and any(".proj_in.lora.down.weight" in k for k in keys)
    assert any(".q_proj.lora_linear_layer.down.weight" in k for k in keys) and not any("lora_A" in k for k in keys)
    want = list(case["unet_sd"]) + [f"text_model.{k}" for k in case["te_sd"]]
    assert sorted(diffusers_renames(case["file"]).values()) == sorted(want)


def test_records_rename_every_key_as_diffusers_does(case, tmp_path):
    """Each tensor's module and role are diffusers' renaming of its own key, which the record keeps."""
    for file in (case["file"], case["bare"]):
        assert detect_format(file) == "diffusers"
        ckpt = read_foreign(file)
        assert not ckpt.unknown_keys and not ckpt.findings
        assert our_renames(file) == diffusers_renames(file)
    # `.processor.` anywhere in a key is dropped too
    f = str(tmp_path / "processor.safetensors")
    save_file({"unet.down_blocks.0.processor.attentions.0.proj_in.lora.down.weight": torch.zeros(2, 8),
               "unet.down_blocks.0.processor.attentions.0.proj_in.lora.up.weight": torch.zeros(8, 2)}, f)
    assert our_renames(f) == diffusers_renames(f) == {
        "unet.down_blocks.0.processor.attentions.0.proj_in.lora.down.weight": "down_blocks.0.attentions.0.proj_in.lora_A.weight",
        "unet.down_blocks.0.processor.attentions.0.proj_in.lora.up.weight": "down_blocks.0.attentions.0.proj_in.lora_B.weight"}


def test_oldest_text_encoder_spelling_loads_like_diffusers(tmp_path):
    """``self_attn.to_q_lora.down`` ... ``to_out_lora`` on a second text encoder: renamed to q_proj ... out_proj
    as diffusers renames it, and adapterfmt.load gives the outputs of diffusers' text-encoder loader."""
    from diffusers import StableDiffusionXLPipeline

    te = tiny_clip(2, projection=True)
    base, ref = copy.deepcopy(te), te_out(te)
    te_sd = _peft_lora(te, ["q_proj", "k_proj", "v_proj", "out_proj"], {"out_proj": 2}, seed=5)
    f = str(tmp_path / "te2.safetensors")
    save_file({f"text_encoder_2.{k}": v for k, v in old_te_keys(te_sd, processors=True).items()}, f)
    assert any(".self_attn.to_out_lora.down.weight" in k for k in load_file(f))
    assert our_renames(f) == diffusers_renames(f) and read_foreign(f).components == ["text_encoder_2"]
    theirs = copy.deepcopy(base)
    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(f)
    StableDiffusionXLPipeline.load_lora_into_text_encoder(sd, alphas, text_encoder=theirs, prefix="text_encoder_2")
    ours = copy.deepcopy(base)
    adapterfmt.load(ours, f)
    assert (te_out(theirs) - ref).abs().max() > 1e-3  # diffusers applied it
    assert rel_err(te_out(ours), te_out(theirs), ref) < TOL


def test_inspect_json_reports_diffusers_components_and_module_paths(case, run_cli):
    r = run_cli("inspect", case["file"], "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    unet_modules = {k.rsplit(".lora_", 1)[0] for k in case["unet_sd"]}
    te_modules = {"text_model." + k.rsplit(".lora_", 1)[0] for k in case["te_sd"]}
    assert doc["format"] == "diffusers" and doc["components"] == {"unet": len(unet_modules), "text_encoder": len(te_modules)}
    by = {(m["component"], m["module"]): m for m in doc["modules"]}
    assert set(by) == {("unet", p) for p in unet_modules} | {("text_encoder", p) for p in te_modules}
    q = by[("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")]
    assert q["tensors"]["lora_down"]["key"] == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"
    assert (q["rank"], q["alpha"], q["scaling"], q["resolved"]) == (4, None, 1.0, True)
    conv = by[("unet", "down_blocks.0.resnets.0.conv1")]
    assert (conv["layer_kind"], conv["rank"], conv["tensors"]["lora_up"]["key"]) == ("conv2d", 2, "unet.down_blocks.0.resnets.0.conv1.lora.up.weight")
    assert by[("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")]["tensors"]["lora_down"]["key"] == (
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight")
    # against the pipeline: every name resolves (text_model. dropped for transformers 5's CLIPTextModel)
    r = run_cli("check", "--base", case["pipe"], "--adapter", case["file"], "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"], r.stdout
    doc = json.loads(run_cli("inspect", case["bare"], "--json").stdout)
    assert doc["format"] == "diffusers" and doc["components"] == {"unet": len(unet_modules)}


def test_merge_pipeline_equals_load_lora_weights_and_fuse(case, oracle, run_cli, tmp_path):
    out = tmp_path / "merged"
    r = run_cli("merge", "--base", case["pipe"], "--adapter", case["file"], "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    ckpt = read_foreign(case["file"])
    for c in ("unet", "text_encoder"):
        assert_merged_like_fused(str(out / c), getattr(oracle["pipe"], c), case["base"][c], len(ckpt.component_modules(c)))


def test_load_gives_diffusers_outputs(case, oracle):
    for c, run in (("unet", unet_out), ("text_encoder", te_out)):
        model = copy.deepcopy(case["base"][c])
        adapterfmt.load(model, case["file"], component=c)
        assert rel_err(run(model), oracle["out"][c], case["ref"][c]) < TOL


def test_convert_to_peft_loads_in_peft_like_diffusers(case, oracle, run_cli, tmp_path):
    from peft import PeftModel

    for c, run in (("unet", unet_out), ("text_encoder", te_out)):
        r = run_cli("convert", case["file"], "--to", "peft", "-o", tmp_path / c, "--base", case["pipe"], "--component", c)
        assert r.exit_code == 0, r.stderr
        cfg = json.loads((tmp_path / c / "adapter_config.json").read_text())
        assert set(cfg["rank_pattern"].values()) == {2} and cfg["r"] == 4  # the old spelling has no alpha: scale 1
        model = PeftModel.from_pretrained(copy.deepcopy(case["base"][c]), str(tmp_path / c)).eval()
        assert rel_err(run(model), oracle["out"][c], case["ref"][c]) < TOL


def test_unprefixed_unet_file_is_the_unets(case, run_cli, tmp_path):
    """Keys with no prefix are the UNet's: what UNet2DConditionModel.load_lora_adapter(FILE, prefix=None)
    loads (diffusers 0.42's pipeline skips them and says so)."""
    unet = copy.deepcopy(case["base"]["unet"])
    unet.load_lora_adapter(case["bare"], prefix=None)
    lora_out = unet_out(unet)
    unet.fuse_lora()
    out = tmp_path / "unet"
    r = run_cli("merge", "--base", os.path.join(case["pipe"], "unet"), "--adapter", case["bare"], "-o", out)
    assert r.exit_code == 0, r.stderr
    assert_merged_like_fused(str(out), unet, case["base"]["unet"], len(read_foreign(case["bare"]).modules))
    model = copy.deepcopy(case["base"]["unet"])
    adapterfmt.load(model, case["bare"])
    assert rel_err(unet_out(model), lora_out, case["ref"]["unet"]) < TOL


def _file(tmp_path, name, keys):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: (torch.ones(()) if k.endswith(".alpha") else torch.zeros(2, 8) if k.endswith((".down.weight", "lora_A.weight")) else torch.zeros(8, 2)) for k in keys}, str(path))
    return path


A = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"


@pytest.mark.parametrize(
    "keys,named",
    [
        ([f"{A}.processor.to_q_lora.down.weight", f"{A}.processor.to_q_lora.up.weight", f"{A}.to_k.lora_A.weight", f"{A}.to_k.lora_B.weight"],
         f"{A}.processor.to_q_lora.down.weight"),
        ([f"{A[5:]}.processor.to_q_lora.down.weight", f"{A[5:]}.processor.to_q_lora.up.weight",
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight"], f"{A[5:]}.processor.to_q_lora.down.weight"),
        ([f"{A}.processor.to_q_lora.down.weight", f"{A}.processor.to_q_lora.up.weight", f"{A}.to_q.lora.down.weight"], f"{A}.to_q.lora.down.weight"),
    ],
    ids=["old-and-peft-in-one-component", "no-prefix-and-prefixed", "two-keys-one-tensor"],
)
def test_mixed_spellings_are_refused_naming_a_key(tmp_path, run_cli, keys, named):
    path = _file(tmp_path, "mixed", keys)
    with pytest.raises(InconsistentAdapterError) as e:
        read_foreign(path)
    assert named in str(e.value)
    assert_one_error_line(run_cli("inspect", path, "--json"), "mixed.safetensors", named)


def test_keys_fitting_no_rule_are_unknown_and_refused(case, tmp_path, run_cli):
    """An .alpha beside an older spelling (diffusers reads none for it), a text encoder with neither
    marker diffusers infers its renaming from, and a suffix no table has: reported, never applied."""
    te = "text_encoder.text_model.encoder.layers.0.self_attn"
    keys = [f"{A}.processor.to_q_lora.down.weight", f"{A}.processor.to_q_lora.up.weight", f"{A}.to_q.alpha",
            f"{A}.processor.to_k_lora.mid.weight", f"{te}.to_q_lora.down.weight", f"{te}.to_q_lora.up.weight"]
    path = _file(tmp_path, "odd", keys)
    ckpt = read_foreign(path)
    assert detect_format(path) == "diffusers" and ckpt.components == ["unet"]
    assert sorted(ckpt.unknown_keys) == sorted([f"{A}.to_q.alpha", f"{A}.processor.to_k_lora.mid.weight", f"{te}.to_q_lora.down.weight",
                                                f"{te}.to_q_lora.up.weight"])
    assert [f.code for f in ckpt.findings] == ["unknown-key"]
    out = tmp_path / "out"
    r = run_cli("merge", "--base", os.path.join(case["pipe"], "unet"), "--adapter", path, "--component", "unet", "-o", out)
    assert_one_error_line(r, "odd.safetensors")
    assert not out.exists()
    # nothing of any rule: not an adapter file
    path = _file(tmp_path, "none", [f"{A}.processor.to_q_lora.mid.weight"])
    assert_one_error_line(run_cli("inspect", path), "none.safetensors", "to_q_lora.mid.weight")


def test_inspect_of_an_old_file_is_header_only(case):
    from test_no_torch import run_and_report

    code, loaded, stdout = run_and_report("inspect", case["file"], "--json")
    assert code == 0 and stdout and loaded == []
