"""Broken kohya / LyCORIS files: merge, load and inspect --base answer each in one line naming the
file and the key, and nothing is applied. (A damaged safetensors container is covered by the
bad-input corpus, tests/make_bad_inputs.py; these are well-formed files with wrong contents.)"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import adapterfmt
from _diffusion_helpers import save_component, tiny_clip

P = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
GOOD = {f"{P}.lora_down.weight": torch.ones(2, 16), f"{P}.lora_up.weight": torch.ones(16, 2), f"{P}.alpha": torch.tensor(1.0)}

CASES = {
    # name: (tensors, error class, the key the message names)
    "lokr-half-given-twice": (
        {f"{P}.lokr_w1": torch.ones(4, 4), f"{P}.lokr_w1_a": torch.ones(4, 1), f"{P}.lokr_w1_b": torch.ones(1, 4), f"{P}.lokr_w2": torch.ones(4, 4)},
        adapterfmt.InconsistentAdapterError, f"{P}.lokr_w1",
    ),
    "rank-0": ({f"{P}.lora_down.weight": torch.ones(0, 16), f"{P}.lora_up.weight": torch.ones(16, 0)}, adapterfmt.InconsistentAdapterError, P),
    "negative-alpha": ({**GOOD, f"{P}.alpha": torch.tensor(-2.0)}, adapterfmt.InvalidConfigError, f"{P}.alpha"),
    "int8-factors": (
        {f"{P}.lora_down.weight": torch.ones(2, 16, dtype=torch.int8), f"{P}.lora_up.weight": torch.ones(16, 2, dtype=torch.int8)},
        adapterfmt.UnsupportedFeatureError, f"{P}.lora_down.weight",
    ),
    "float8-factors": (
        {f"{P}.lora_down.weight": torch.ones(2, 16).to(torch.float8_e4m3fn), f"{P}.lora_up.weight": torch.ones(16, 2).to(torch.float8_e4m3fn)},
        adapterfmt.UnsupportedFeatureError, f"{P}.lora_down.weight",
    ),
    "loha-missing-factor": (
        {f"{P}.hada_w1_a": torch.ones(16, 2), f"{P}.hada_w1_b": torch.ones(2, 16)}, adapterfmt.InconsistentAdapterError, P,
    ),
    # shapes are checked against the base: the message names the resolved module
    "lokr-product-does-not-fit": ({f"{P}.lokr_w1": torch.ones(4, 4), f"{P}.lokr_w2": torch.ones(4, 5)}, adapterfmt.ShapeMismatchError, "q_proj"),
    "rank-mismatch": ({**GOOD, f"{P}.lora_up.weight": torch.ones(16, 3)}, adapterfmt.InconsistentAdapterError, P),
    "loha-rank-mismatch": (
        {f"{P}.hada_w1_a": torch.ones(16, 2), f"{P}.hada_w1_b": torch.ones(2, 16), f"{P}.hada_w2_a": torch.ones(16, 2), f"{P}.hada_w2_b": torch.ones(3, 16)},
        adapterfmt.InconsistentAdapterError, P,
    ),
}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("te")
    te = tiny_clip()
    save_component(te, str(root / "te"))
    return te, root / "te"


@pytest.mark.parametrize("name", list(CASES))
def test_broken_kohya_file_is_refused_in_one_line(name, encoder, tmp_path, run_cli):
    tensors, error, key = CASES[name]
    te, base = encoder
    file = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(file))
    r = run_cli("merge", "--base", base, "--adapter", file, "-o", tmp_path / "out")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and str(file) in r.stderr and key in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    model = copy.deepcopy(te)
    keys = list(model.state_dict())
    with pytest.raises(error) as e:
        adapterfmt.load(model, file)
    assert key in str(e.value) and list(model.state_dict()) == keys
    r = run_cli("inspect", file, "--base", base)
    assert r.exit_code in (1, 2), r.stdout + r.stderr  # reported: a failed check (1) or unreadable (2), never a clean pass
