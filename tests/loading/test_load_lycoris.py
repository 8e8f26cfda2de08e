"""adapterfmt.load of PEFT's own LoHa / LoKr adapters (peft_type LOHA / LOKR), against PEFT:
same state_dict names, same outputs, same trainable set; save, merge, unload and several adapters
behave as PEFT's do."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import adapterfmt
from _diffusion_helpers import tiny_unet, unet_inputs

PREFIX = "base_model.model."
TARGETS = ["to_q", "to_k", "to_out.0", "conv1", "conv2", "proj_in", "linear_1"]


def _config(kind: str, variant: str):
    from peft import LoHaConfig, LoKrConfig

    if kind == "loha":
        extra = dict(use_effective_conv2d=True) if variant == "cp" else {}
        return LoHaConfig(r=4, alpha=6, target_modules=TARGETS, rank_pattern={"^down_blocks.0.resnets.0.conv1": 2}, alpha_pattern={"to_k": 3}, **extra)
    extra = dict(use_effective_conv2d=True, decompose_both=True, decompose_factor=2) if variant == "cp" else dict(decompose_factor=4)
    return LoKrConfig(r=4, alpha=6, target_modules=TARGETS, alpha_pattern={"to_k": 3}, rank_pattern={"to_q": 16}, **extra)


def _peft_adapter(kind: str, variant: str, directory, seed: int = 0) -> None:
    from peft import get_peft_model

    model = get_peft_model(tiny_unet(), _config(kind, variant))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".hada_" in n or ".lokr_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(str(directory))


def _out(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(*unet_inputs())
    return out.sample if hasattr(out, "sample") else out[0]


CASES = [("loha", "plain"), ("loha", "cp"), ("lokr", "plain"), ("lokr", "cp")]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def adapter(request, tmp_path_factory):
    kind, variant = request.param
    root = tmp_path_factory.mktemp(f"{kind}-{variant}")
    _peft_adapter(kind, variant, root / "a", seed=1)
    _peft_adapter(kind, variant, root / "b", seed=2)
    return kind, root


def test_load_equals_peft(adapter, tmp_path):
    """Outputs, state_dict names, trainable set and the re-saved files are PEFT's."""
    from peft import PeftModel

    kind, root = adapter
    ref = PeftModel.from_pretrained(tiny_unet(), str(root / "a"), is_trainable=True).eval()
    model = tiny_unet()
    handle = adapterfmt.load(model, root / "a", is_trainable=True)
    model.eval()
    assert torch.equal(_out(model), _out(ref))
    assert list(model.state_dict()) == [k[len(PREFIX):] for k in ref.state_dict()]
    trainable = {k[len(PREFIX):] for k, p in ref.named_parameters() if p.requires_grad}
    assert {k for k, p in model.named_parameters() if p.requires_grad} == trainable and trainable
    slot = "hada_w1_a" if kind == "loha" else "lokr_w1"
    assert any(f".{slot}." in k for k in trainable)
    layer = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k
    peft_layer = ref.base_model.model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k
    assert (layer.r, layer.alpha, layer.scaling) == (peft_layer.r, peft_layer.alpha, peft_layer.scaling)
    assert handle.adapters["default"].config["peft_type"] == kind.upper()
    adapterfmt.save(model, tmp_path / "resaved")
    saved, ours = load_file(str(root / "a" / "adapter_model.safetensors")), load_file(str(tmp_path / "resaved" / "adapter_model.safetensors"))
    assert list(saved) and set(saved) == set(ours) and all(torch.equal(saved[k], ours[k]) for k in saved)
    assert json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())["peft_type"] == kind.upper()
    again = PeftModel.from_pretrained(tiny_unet(), str(tmp_path / "resaved")).eval()
    assert torch.equal(_out(again), _out(ref))


def test_merge_unmerge_unload_and_disable_equal_peft(adapter):
    from peft import PeftModel

    kind, root = adapter
    base_out = _out(tiny_unet())
    ref = PeftModel.from_pretrained(tiny_unet(), str(root / "a")).eval()
    expected = _out(ref)
    model = tiny_unet()
    adapterfmt.load(model, root / "a")
    with adapterfmt.disable_adapters(model):
        assert torch.equal(_out(model), base_out)
    adapterfmt.merge(model)
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=1e-5)
    adapterfmt.unmerge(model)
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=1e-5)
    merged_ref = ref.merge_and_unload().state_dict()
    ours = adapterfmt.unload(model, merge=True).state_dict()
    assert list(ours) == list(merged_ref)
    assert all(torch.equal(ours[k], merged_ref[k]) for k in ours)
    plain = tiny_unet()
    adapterfmt.load(plain, root / "a")
    assert torch.equal(_out(adapterfmt.unload(plain)), base_out)


def test_two_adapters_switch_like_peft(adapter):
    from peft import PeftModel

    kind, root = adapter
    ref = PeftModel.from_pretrained(tiny_unet(), str(root / "a")).eval()
    ref.load_adapter(str(root / "b"), adapter_name="other")
    model = tiny_unet()
    adapterfmt.load(model, root / "a")
    adapterfmt.load(model, root / "b", adapter_name="other")
    assert list(model.state_dict()) == [k[len(PREFIX):] for k in ref.state_dict()]
    assert torch.equal(_out(model), _out(ref))
    ref.set_adapter("other")
    adapterfmt.set_adapter(model, "other")
    assert torch.equal(_out(model), _out(ref))


def test_kohya_loaded_loha_is_not_saved_as_lora(tmp_path):
    """A LoHa file from LyCORIS loads, but save() has no PEFT config for it: refused, not written as LORA."""
    from _diffusion_helpers import lycoris_network, save_lycoris

    unet = tiny_unet()
    net = lycoris_network(None, unet, algo="loha", dim=4, alpha=2)
    file = save_lycoris(net, str(tmp_path / "loha.safetensors"))
    
    model = tiny_unet()
    adapterfmt.load(model, file, component="unet")
    with pytest.raises(adapterfmt.UnsupportedFeatureError, match="convert"):
        adapterfmt.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refusals_leave_the_model_untouched(adapter, tmp_path):
    """A LoHa / LoKr whose product does not fit, or a target PEFT cannot wrap: one error, no change."""
    kind, root = adapter
    other = tiny_unet(cross_attention_dim=8)  # to_k / to_v of cross attention take 8 inputs here
    keys = list(other.state_dict())
    with pytest.raises((adapterfmt.ShapeMismatchError, adapterfmt.UnresolvedModulesError)):
        adapterfmt.load(other, root / "a")
    assert list(other.state_dict()) == keys and not hasattr(other, "_adapterfmt")
    wrapped = copy.deepcopy(tiny_unet())
    adapterfmt.load(wrapped, root / "a")
    with pytest.raises(ValueError):
        adapterfmt.load(wrapped, root / "b")  # the name is taken


def test_load_takes_a_kohya_file_path_with_its_component(tmp_path):
    """adapterfmt.load(model, FILE, component=...) on a LyCORIS LoKr file for a UNet and a text
    encoder: each component gets LyCORIS's forward outputs; a missing component is one error."""
    from _diffusion_helpers import lycoris_network, rel_err, save_lycoris, te_out, tiny_clip, unet_out

    unet, te = tiny_unet(), tiny_clip()
    ref = {"unet": unet_out(unet), "text_encoder": te_out(te)}
    net = lycoris_network(te, unet, algo="lokr", dim=4, alpha=3, factor=2)
    expected = {"unet": unet_out(unet), "text_encoder": te_out(te)}
    file = save_lycoris(net, str(tmp_path / "lokr.safetensors"))
    loaded_unet, loaded_te = tiny_unet(), tiny_clip()
    with pytest.raises(adapterfmt.AmbiguousMatchError, match="component"):
        adapterfmt.load(loaded_unet, file)  # the file adapts two components
    adapterfmt.load(loaded_unet, file, component="unet")
    adapterfmt.load(loaded_te, file, component="text_encoder")
    assert rel_err(unet_out(loaded_unet), expected["unet"], ref["unet"]) < 1e-4
    assert rel_err(te_out(loaded_te), expected["text_encoder"], ref["text_encoder"]) < 1e-4
    with pytest.raises(TypeError):
        adapterfmt.load(tiny_unet(), file, component="unet", prefix_map={"a": "b"})


class _ConvNet(torch.nn.Module):
    """Conv1d, 3x3 and 1x1 Conv2d and Linear: every layer type PEFT's LoHa / LoKr wrap."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.pw = torch.nn.Conv2d(8, 8, 1)
        self.lin = torch.nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x).unsqueeze(-1).expand(-1, -1, -1, 5)
        return self.lin(self.pw(self.c2(y)).mean((2, 3)))


@pytest.mark.parametrize(
    "kind,options",
    [("loha", dict(use_effective_conv2d=True)), ("loha", {}), ("lokr", dict(use_effective_conv2d=True, decompose_both=True)), ("lokr", {}),
     ("lokr", dict(decompose_factor=2, r=2))],
    ids=["loha-cp", "loha", "lokr-cp-both", "lokr-full", "lokr-factor2"],
)
def test_conv1d_conv2d_linear_equal_peft_in_load_and_merge(kind, options, tmp_path, run_cli):
    """Every layer type, PEFT's own way — including a Conv1d with a full 3-D lokr_w2, whose
    Kronecker product PEFT builds differently from LyCORIS (FORMAT §10.6): load gives PEFT's outputs
    and names, `adapterfmt merge` PEFT's merge_and_unload weights, bit for bit."""
    from peft import LoHaConfig, LoKrConfig, PeftModel, get_peft_model
    from safetensors.torch import save_file

    torch.manual_seed(1)
    base = _ConvNet().eval()
    options = dict(options)
    config = (LoHaConfig if kind == "loha" else LoKrConfig)(r=options.pop("r", 4), alpha=3, target_modules=["c1", "c2", "pw", "lin"], **options)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if ".hada_" in n or ".lokr_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(str(tmp_path / "a"))
    ref = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    x = torch.randn(2, 4, 7, generator=g)
    model = copy.deepcopy(base)
    adapterfmt.load(model, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert list(model.state_dict()) == [k[len(PREFIX):] for k in ref.state_dict()]
    expected = ref.merge_and_unload().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in adapterfmt.unload(model, merge=True).state_dict().items())
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    r = run_cli("merge", "--base", tmp_path / "base.safetensors", "--adapter", tmp_path / "a", "-o", tmp_path / "merged")
    assert r.exit_code == 0, r.stderr
    merged = load_file(str(next((tmp_path / "merged").glob("*.safetensors"))))
    assert set(merged) == set(expected) and all(torch.equal(merged[k], expected[k]) for k in merged)
    if kind == "lokr" and len(load_file(str(tmp_path / "a" / "adapter_model.safetensors")).get(f"{PREFIX}c1.lokr_w2", torch.empty(0)).shape) == 3:
        # LyCORIS would build that module's product another way: no kohya form keeps the outputs
        r = run_cli("convert", tmp_path / "a", "--to", "kohya", "-o", tmp_path / "k.safetensors", "--base", tmp_path / "base.safetensors", "--component", "unet")
        assert r.exit_code == 2 and "3-D lokr_w2" in r.stderr and not (tmp_path / "k.safetensors").exists()


def test_verify_reads_peft_loha_and_lokr(adapter, tmp_path, run_cli):
    """`adapterfmt verify` checks a PEFT LoHa / LoKr directory with their reader (not refused as
    a non-LoRA config) and reports a module missing a factor."""
    import shutil

    from safetensors.torch import save_file

    kind, root = adapter
    r = run_cli("verify", root / "a")
    assert r.exit_code == 0, r.stdout + r.stderr
    broken = tmp_path / "broken"
    shutil.copytree(root / "a", broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    dropped = sorted(k for k in tensors if k.endswith((".hada_w2_b", ".lokr_w1", ".lokr_w1_a")))[0]
    del tensors[dropped]
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    r = run_cli("verify", broken)
    assert r.exit_code == 1 and dropped.rpartition(".")[0][len(PREFIX):] in r.stdout + r.stderr


@pytest.mark.parametrize(
    "patch,key",
    [({"rank_pattern": {"to_q": "x"}}, "rank_pattern.to_q"), ({"alpha_pattern": {"to_q": None}}, "alpha_pattern.to_q"), ({"r": "4"}, "'r'"),
     ({"rank_pattern": {"to_q": 0}}, "rank_pattern.to_q"), ({"r": 0}, "'r'"), ({"rank_pattern": {"(": 2}}, "rank_pattern.("),
     ({"alpha": float("nan")}, "'alpha'"), ({"module_dropout": "x"}, "module_dropout"), ({"rank_dropout_scale": "yes"}, "rank_dropout_scale")],
    ids=["rank-str", "alpha-null", "r-str", "rank-0", "r-0", "bad-regex", "alpha-nan", "dropout-str", "scale-str"],
)
def test_broken_loha_lokr_configs_are_one_line_errors(adapter, patch, key, tmp_path, run_cli):
    """Every field of a LoHa / LoKr config is type-checked as PEFT declares it (r > 0 as PEFT
    requires): inspect, merge and load fail in one line naming the file and the field."""
    import shutil

    kind, root = adapter
    bad = tmp_path / "bad"
    shutil.copytree(root / "a", bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config.update(patch)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    for args in (("inspect", bad), ("merge", "--base", bad, "--adapter", bad, "-o", tmp_path / "out")):
        r = run_cli(*args)
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "adapter_config.json" in r.stderr and key in r.stderr, r.stderr
    with pytest.raises(adapterfmt.InvalidConfigError):
        adapterfmt.load(tiny_unet(), bad)


def test_a_pipeline_object_is_refused_with_the_component_to_give(tmp_path):
    """load takes one component; a diffusers pipeline object is a TypeError that says how to call it."""
    from diffusers import DiffusionPipeline

    class Pipe(DiffusionPipeline):
        def __init__(self, unet):
            super().__init__()
            self.register_modules(unet=unet)

    with pytest.raises(TypeError, match=r"pipe\.unet"):
        adapterfmt.load(Pipe(tiny_unet()), tmp_path / "any.safetensors", component="unet")


def test_load_of_an_in_memory_loha_lokr_state_dict(adapter):
    """load(model, state_dict, config=<LOHA/LOKR adapter_config.json dict>) — what
    get_peft_model_state_dict returns — gives PEFT's outputs like the directory does; the caller's
    tensors are copied, and save writes the LOHA / LOKR config back."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    kind, root = adapter
    ref = PeftModel.from_pretrained(tiny_unet(), str(root / "a")).eval()
    state = get_peft_model_state_dict(ref)
    config = json.loads((root / "a" / "adapter_config.json").read_text())
    model = tiny_unet()
    handle = adapterfmt.load(model, state, config=config)
    assert torch.equal(_out(model), _out(ref))
    first = next(iter(state))
    with torch.no_grad():
        state[first].add_(1.0)  # the loaded adapter does not share the caller's tensors
    assert torch.equal(_out(model), _out(tiny_unet_loaded(root)))
    assert handle.adapters["default"].config["peft_type"] == kind.upper()


def tiny_unet_loaded(root):
    model = tiny_unet()
    adapterfmt.load(model, root / "a")
    return model
