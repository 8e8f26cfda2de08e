"""``inspect --scan`` on kohya / LyCORIS, diffusers and PEFT LoHa / LoKr adapters, and merge's
refusal of their NaN / Inf values (docs/BEHAVIOUR.md §7.2, §7.3).

The kohya file is written by LyCORIS (:func:`_diffusion_helpers.sd_lora_case`, shared with
test_diffusion_formats.py), the LoHa directory by PEFT's ``save_pretrained``; values are then
poisoned by rewriting the file with safetensors. Expected warnings are built by
:func:`adapterfmt.checkpoint.findings.non_finite_finding`, the one place the PEFT path builds them too.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterfmt.errors import NonFiniteValuesError
from adapterfmt.checkpoint.findings import non_finite_finding

from _diffusion_helpers import sd_lora_case
from conftest import assert_one_error_line, tiny_torch_model


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory):
    return sd_lora_case(str(tmp_path_factory.mktemp("sd_lora")))


def _rewrite(src: str, dst: str, change) -> str:
    """``src`` with ``change(tensors)`` applied, saved as ``dst`` with the same metadata."""
    with safe_open(src, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(src)
    change(tensors)
    save_file(tensors, dst, metadata=metadata)
    return dst


def _non_finite(doc: dict) -> list[dict]:
    return [w for w in doc["warnings"] if w["code"] == "non-finite"]


def _expected(file: str, *rows: tuple[str, int, int, int]) -> list[dict]:
    return [non_finite_finding(file, key, nan, inf, numel).as_dict() for key, nan, inf, numel in sorted(rows)]


def _poisoned_kohya(sd_lora, tmp_path) -> tuple[str, str, str]:
    """The LyCORIS file with 2 NaN in one text-encoder ``lora_up`` and +inf as one UNet ``alpha``."""
    keys = sorted(load_file(sd_lora["file"]))
    up = next(k for k in keys if k.startswith("lora_te_") and k.endswith(".lora_up.weight"))
    alpha = next(k for k in keys if k.startswith("lora_unet_") and k.endswith(".alpha"))

    def poison(t):
        t[up].view(-1)[:2] = float("nan")
        t[alpha] = torch.tensor(float("inf"), dtype=t[alpha].dtype)

    return _rewrite(sd_lora["file"], str(tmp_path / "bad.safetensors"), poison), up, alpha


def test_scan_of_a_kohya_file_reports_exactly_the_poisoned_tensors(sd_lora, tmp_path, run_cli):
    clean = run_cli("inspect", sd_lora["file"], "--scan", "--json")
    doc = json.loads(clean.stdout)
    assert clean.exit_code == 0 and doc["format"] == "kohya" and doc["scanned"] and doc["warnings"] == []
    assert json.loads(run_cli("inspect", sd_lora["file"], "--json").stdout)["scanned"] is False

    bad, up, alpha = _poisoned_kohya(sd_lora, tmp_path)
    numel = load_file(bad)[up].numel()
    doc = json.loads(run_cli("inspect", bad, "--scan", "--json").stdout)
    assert doc["scanned"] and doc["warnings"] == _expected(bad, (up, 2, 0, numel), (alpha, 0, 1, 1))
    # without --scan nothing is read, so nothing is found
    assert _non_finite(json.loads(run_cli("inspect", bad, "--json").stdout)) == []
    # the JSON stays strict JSON: the Inf alpha (and the scale made from it) are written as null
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    strict = json.loads(run_cli("inspect", bad, "--json").stdout, parse_constant=refuse)
    row = next(m for m in strict["modules"] if m["name_in_file"] + ".alpha" in alpha or alpha.startswith(m["name_in_file"]))
    assert row["alpha"] is None and row["scaling"] is None
    # the table: one warning line per tensor on stderr; --strict fails on them
    r = run_cli("inspect", bad, "--scan")
    assert r.exit_code == 0 and "values: scanned for NaN/Inf" in r.stdout
    assert [line for line in r.stderr.splitlines() if line.startswith("warning[non-finite]")] == [
        f"warning[non-finite]: {w['message']}" for w in doc["warnings"]
    ]
    assert run_cli("inspect", bad, "--scan", "--strict").exit_code == 1


def test_scan_of_a_diffusers_file_reads_alphas_and_unknown_keys(tmp_path, run_cli):
    """Every tensor the header lists is scanned, an unknown key's included."""
    m = "unet.down_blocks.0.attentions.0.proj_in"
    t = {f"{m}.lora_A.weight": torch.randn(2, 8), f"{m}.lora_B.weight": torch.randn(8, 2), f"{m}.alpha": torch.tensor(2.0),
         "unet.stray": torch.zeros(3)}
    save_file(t, str(tmp_path / "clean.safetensors"))
    doc = json.loads(run_cli("inspect", tmp_path / "clean.safetensors", "--scan", "--json").stdout)
    assert doc["format"] == "diffusers" and doc["scanned"] and _non_finite(doc) == []
    t[f"{m}.lora_A.weight"][1, 3] = float("-inf")
    t[f"{m}.alpha"] = torch.tensor(float("nan"))
    t["unet.stray"][0] = float("nan")
    bad = str(tmp_path / "bad.safetensors")
    save_file(t, bad)
    doc = json.loads(run_cli("inspect", bad, "--scan", "--json").stdout)
    assert [w["code"] for w in doc["warnings"]] == ["unknown-key", "non-finite", "non-finite", "non-finite"]
    assert _non_finite(doc) == _expected(bad, (f"{m}.lora_A.weight", 0, 1, 16), (f"{m}.alpha", 1, 0, 1), ("unet.stray", 1, 0, 3))


def test_scan_of_a_peft_loha_directory(tmp_path, run_cli):
    from peft import LoHaConfig, get_peft_model

    model = get_peft_model(tiny_torch_model(), LoHaConfig(r=2, alpha=4, target_modules=["q", "conv"]))
    model.save_pretrained(tmp_path / "loha")
    weights = str(tmp_path / "loha" / "adapter_model.safetensors")
    doc = json.loads(run_cli("inspect", tmp_path / "loha", "--scan", "--json").stdout)
    assert doc["format"] == "peft" and doc["peft_type"] == "LOHA" and doc["scanned"] and doc["warnings"] == []
    key = "base_model.model.q.hada_w1_a"

    def poison(t):
        t[key][0, 0] = float("inf")
        t[key][1, 1] = float("nan")

    _rewrite(weights, weights, poison)
    doc = json.loads(run_cli("inspect", tmp_path / "loha", "--scan", "--json").stdout)
    assert doc["warnings"] == _expected(weights, (key, 1, 1, load_file(weights)[key].numel()))


def test_header_only_inspect_of_a_peft_loha_directory_imports_no_torch(tmp_path):
    from peft import LoHaConfig, get_peft_model
    from test_no_torch import run_and_report

    get_peft_model(tiny_torch_model(), LoHaConfig(r=2, target_modules=["q"])).save_pretrained(tmp_path / "loha")
    code, loaded, stdout = run_and_report("inspect", str(tmp_path / "loha"), "--json")
    assert code == 0 and json.loads(stdout)["format"] == "peft" and loaded == []


def test_merge_and_load_refuse_a_nan_factor_and_an_infinite_alpha(sd_lora, tmp_path, run_cli):
    """A NaN adapter never merges silently: one error line naming the file and the key, exit 2, no output."""
    from adapterfmt.merging.foreign import merge_foreign

    bad, up, alpha = _poisoned_kohya(sd_lora, tmp_path)
    te, unet = os.path.join(sd_lora["pipe"], "text_encoder"), os.path.join(sd_lora["pipe"], "unet")
    out = tmp_path / "out"
    assert_one_error_line(run_cli("merge", "--base", te, "--adapter", bad, "--component", "text_encoder", "-o", out), "bad.safetensors", up)
    assert_one_error_line(run_cli("merge", "--base", unet, "--adapter", bad, "--component", "unet", "-o", out), "bad.safetensors", alpha)
    assert_one_error_line(run_cli("merge", "--base", sd_lora["pipe"], "--adapter", bad, "-o", out), "bad.safetensors")
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["bad.safetensors"]
    for component, base, key in (("text_encoder", te, up), ("unet", unet, alpha)):
        with pytest.raises(NonFiniteValuesError) as e:
            merge_foreign(base, bad, out, component=component)
        assert e.value.key == key
    # adapterfmt.load of the file refuses the same values
    import adapterfmt

    for component, key in (("text_encoder", up), ("unet", alpha)):
        model = copy.deepcopy(sd_lora["base"][component])
        keys = list(model.state_dict())
        with pytest.raises(NonFiniteValuesError) as e:
            adapterfmt.load(model, bad, component=component)
        assert e.value.key == key and e.value.path == bad and list(model.state_dict()) == keys
    # the alpha alone (finite factors) is refused too, before anything is read
    only_alpha = _rewrite(sd_lora["file"], str(tmp_path / "alpha.safetensors"), lambda t: t.__setitem__(alpha, torch.tensor(float("nan"))))
    assert_one_error_line(run_cli("merge", "--base", unet, "--adapter", only_alpha, "--component", "unet", "-o", out), alpha, "alpha is nan")
    assert not out.exists()
