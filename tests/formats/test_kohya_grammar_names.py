"""kohya names read without a base (FORMAT §10.4, "Reading without a base"), against diffusers 0.42.

The oracle is diffusers' own kohya SD / SDXL reading: ``lora_state_dict`` (``_maybe_map_sgm_blocks_to_diffusers``
with the UNet's config, then ``_convert_non_diffusers_lora_to_diffusers``), followed by the renaming its
loaders apply (``convert_unet_state_dict_to_peft`` for the UNet, ``convert_state_dict_to_diffusers`` +
``convert_state_dict_to_peft`` for a text encoder). Key sets name every Linear and Conv2d (LoRA and LoCon
targets) of tiny diffusers UNets shaped like SD 1.5 (4 blocks, diffusers names) and SDXL (3 blocks,
``transformer_layers_per_block``, added embeddings; SGM names as sd-scripts writes them, and diffusers
names) and of tiny CLIP text encoders; LyCORIS LoHa / LoKr / LoCon files are written by LyCORIS itself.
"""

from __future__ import annotations

import json

import pytest
import torch

from adapterfmt.formats import read_foreign
from adapterfmt.formats.diffusion import grammar_names
from adapterfmt.formats.diffusion.grammar_names import Grammar, from_sgm, grammar_trie, read_kohya_name
from adapterfmt.formats.diffusion.names import base_module_paths, resolve_names
from adapterfmt.formats.diffusion.sgm_names import sgm_name

from _diffusion_helpers import lycoris_network, save_lycoris, sd_lora_case

COMPONENT = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}


def _sd15_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 8, 8, 8),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()


def _sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 8, 8),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
        norm_num_groups=4, transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
    ).eval()


def _clip(projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2, num_hidden_layers=2, vocab_size=100,
                         projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


@pytest.fixture(scope="module")
def models():
    return {"sd15": _sd15_unet(), "sdxl": _sdxl_unet(), "te": _clip(False), "te2": _clip(True)}


def _targets(model) -> list[str]:
    """Every LoRA / LoCon target: the Linear and Conv2d modules."""
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _sgm(unet, path: str) -> str:
    paths = [n for n, _ in unet.named_modules()]
    with_attention = {int(p.split(".")[1]) for p in paths if p.startswith("up_blocks.") and ".attentions." in p}
    return sgm_name(path, unet.config.layers_per_block, with_attention)


def diffusers_reading(entries: list[tuple[str, str]], unet_config) -> list:
    """diffusers' module name (component, dotted path) for each ``(prefix, flattened name)`` of one kohya
    file, ``None`` where diffusers loses it. Each module's ``lora_down`` holds its index, so the
    converted keys are traced back to their module whatever diffusers renames."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    sd = {}
    for i, (prefix, name) in enumerate(entries):
        sd[f"{prefix}{name}.lora_down.weight"] = torch.full((1, 1), float(i))
        sd[f"{prefix}{name}.lora_up.weight"] = torch.zeros(1, 1)
        sd[f"{prefix}{name}.alpha"] = torch.tensor(1.0)
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(sd, unet_config=unet_config)
    found = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        part = {k[len(comp) + 1 :]: v for k, v in converted.items() if k.startswith(comp + ".")}
        if not part:
            continue
        part = convert_unet_state_dict_to_peft(part) if comp == "unet" else convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        for k, v in part.items():
            if k.endswith(".lora_A.weight"):
                found[int(v.item())] = (comp, k[: -len(".lora_A.weight")])
    return [found.get(i) for i in range(len(entries))]


def _clip_module(reading: str, model) -> str:
    """The module the one CLIP reading names in ``model``: diffusers' loader strips ``text_model.``
    where the model has none (transformers 5's CLIPTextModel)."""
    return reading if hasattr(model, "text_model") else reading.removeprefix("text_model.")


def _assert_reads_as_diffusers(entries, unet, encoders, *, diffusers_gaps=()):
    """Every reading equals diffusers' (a text encoder's up to the one CLIP naming) and names a
    module of the model. ``diffusers_gaps``: names diffusers itself misreads (asserted, not skipped)."""
    oracle = diffusers_reading(entries, unet.config)
    modules = {"unet": dict(unet.named_modules()), **{c: dict(m.named_modules()) for c, m in encoders.items()}}
    for (prefix, name), theirs in zip(entries, oracle):
        component = COMPONENT[prefix]
        reading = read_kohya_name(component, name)
        assert reading.dotted is not None, (prefix, name, reading.note)
        if name in diffusers_gaps:
            assert theirs is None or theirs[1] not in modules["unet"], (name, theirs)
            assert reading.dotted in modules["unet"], (name, reading)
            continue
        assert theirs is not None and theirs[0] == component, (prefix, name, theirs)
        if component == "unet":
            assert reading.dotted == theirs[1], (name, reading.dotted, theirs)
            assert reading.dotted in modules["unet"], name
        else:  # one naming for CLIP: `text_model.` in front, as kohya's own files and diffusers' reading of them
            assert reading.dotted == theirs[1] or reading.dotted == "text_model." + theirs[1], (name, reading.dotted, theirs)
            assert reading.dotted.startswith("text_model.") or reading.dotted == "text_projection", reading
            model = encoders[component]
            assert _clip_module(reading.dotted, model) == _clip_module(theirs[1], model) and _clip_module(reading.dotted, model) in modules[component]


def test_sd15_key_set_reads_as_diffusers(models):
    """SD 1.5: kohya writes the diffusers UNet's names (LoRA and LoCon convs) and `lora_te_` CLIP
    names, with `text_model_` (transformers 4 and every old file) or without (transformers 5)."""
    unet, te = models["sd15"], models["te"]
    entries = [("lora_unet_", _flat(p)) for p in _targets(unet)]
    entries += [("lora_te_", "text_model_" + _flat(p)) for p in _targets(te)] + [("lora_te_", _flat(p)) for p in _targets(te)]
    assert any("conv" in n for _, n in entries) and any("proj_in" in n for _, n in entries)
    _assert_reads_as_diffusers(entries, unet, {"text_encoder": te})
    assert read_kohya_name("unet", "down_blocks_0_attentions_0_proj_in").dotted == "down_blocks.0.attentions.0.proj_in"


def test_sdxl_sgm_key_set_reads_as_diffusers(models):
    """SDXL as sd-scripts writes it: SGM UNet names (input / middle / output blocks, time_embed,
    label_emb, out), 3 down blocks with 1, 2, 2 transformer layers, `lora_te1_` and `lora_te2_`."""
    unet, te, te2 = models["sdxl"], models["te"], models["te2"]
    entries = [("lora_unet_", _flat(_sgm(unet, p))) for p in _targets(unet)]
    assert {n.split("_")[0] for _, n in entries} == {"input", "middle", "output", "time", "label", "out"}
    assert any("transformer_blocks_1" in n for _, n in entries)
    entries += [("lora_te1_", "text_model_" + _flat(p)) for p in _targets(te)] + [("lora_te2_", _flat(p)) for p in _targets(te2)]
    _assert_reads_as_diffusers(entries, unet, {"text_encoder": te, "text_encoder_2": te2})
    r = read_kohya_name("unet", "input_blocks_4_1_transformer_blocks_1_attn2_to_out_0")
    assert r.dotted == "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0"


def test_sdxl_diffusers_names_and_diffusers_own_gap(models):
    """SDXL files with diffusers names (OneTrainer, adapterfmt's convert): as diffusers reads them,
    except `add_embedding_linear_1/2`, which diffusers' SDXL index-stripping collapses to one wrong
    name; the grammar reads them as the UNet's own modules."""
    unet = models["sdxl"]
    entries = [("lora_unet_", _flat(p)) for p in _targets(unet)]
    _assert_reads_as_diffusers(entries, unet, {}, diffusers_gaps={"add_embedding_linear_1", "add_embedding_linear_2"})


def test_one_clip_naming_for_both_text_encoders():
    """The issue's case: `encoder_layers_0_mlp_fc1` (text_encoder) and `text_model_encoder_layers_0_mlp_fc1`
    (text_encoder_2) read as one name."""
    a = read_kohya_name("text_encoder", "encoder_layers_0_mlp_fc1")
    b = read_kohya_name("text_encoder_2", "text_model_encoder_layers_0_mlp_fc1")
    assert a.dotted == b.dotted == "text_model.encoder.layers.0.mlp.fc1"
    assert read_kohya_name("text_encoder_2", "text_projection").dotted == "text_projection"


def test_sgm_reading_inverts_the_sgm_names(models):
    """from_sgm is sgm_names.sgm_name read backwards, for every module with a weight (norms too) of the
    SDXL-shaped UNet, and the grammar reads each flattened SGM name back to its module."""
    unet = models["sdxl"]
    paths = [p for p, m in unet.named_modules() if isinstance(getattr(m, "weight", None), torch.nn.Parameter)]
    with_attention = {int(p.split(".")[1]) for p in paths if p.startswith("up_blocks.") and ".attentions." in p}
    named = 0
    for path in paths:
        name = sgm_name(path, unet.config.layers_per_block, with_attention)
        if name is not None:
            named += 1
            assert from_sgm(name) == path and read_kohya_name("unet", _flat(name)).dotted == path, (path, name)
    assert named > 100
    assert [from_sgm(p) for p in ("input_blocks.0.0.in_layers.2", "input_blocks.3.0.in_layers.2", "input_blocks.3.1.proj_in",
                                  "middle_block.1.in_layers.2", "middle_block.3.proj_in", "output_blocks.4.2.conv", "blocks.1.0")] == [None] * 7


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_lycoris_files_read_as_diffusers(algo, models, tmp_path):
    """LyCORIS's own kohya writer (LoCon, LoHa, LoKr) on the SD 1.5-shaped UNet and two CLIP text
    encoders (SDXL style, `lora_te1_` / `lora_te2_`): every record carries the grammar's reading, the
    same as diffusers' reading of that name, unchecked; against the real modules it is checked."""
    import copy

    unet, te, te2 = copy.deepcopy(models["sd15"]), copy.deepcopy(models["te"]), copy.deepcopy(models["te2"])
    kwargs = {"conv_dim": 2, "conv_alpha": 1} if algo == "locon" else {}
    net = lycoris_network([te, te2], unet, algo="lora" if algo == "locon" else algo, dim=2, alpha=1, **kwargs)
    ckpt = read_foreign(save_lycoris(net, str(tmp_path / f"{algo}.safetensors")))
    assert ckpt.components == ["unet", "text_encoder", "text_encoder_2"]
    assert ckpt.kinds == [{"locon": "lora"}.get(algo, algo)]
    if algo == "locon":  # LoCon: 3x3 convolutions of the resnets and samplers
        assert any(m.layer_kind == "conv2d" and "resnets" in m.name for m in ckpt.modules)
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    entries = [(prefix[m.component], m.name) for m in ckpt.modules]
    oracle = diffusers_reading(entries, models["sd15"].config)
    encoders = {"text_encoder": models["te"], "text_encoder_2": models["te2"]}
    for m, theirs in zip(ckpt.modules, oracle):
        assert m.grammar_name is not None and m.grammar_note is None and not m.checked, m.name
        assert m.shown_name() == (m.grammar_name, "grammar")
        if m.component == "unet":
            assert m.grammar_name == theirs[1]
        else:
            assert m.grammar_name.removeprefix("text_model.") == theirs[1].removeprefix("text_model.")
            assert m.grammar_name.startswith("text_model.")
    bases = {"unet": unet, "text_encoder": te, "text_encoder_2": te2}
    for component, model in bases.items():
        res = resolve_names(ckpt.component_modules(component), base_module_paths(model.state_dict()), component=component)
        assert res.ok
        for m in ckpt.component_modules(component):
            assert m.checked and m.shown_name() == (m.path, "base")
            assert m.path == (m.grammar_name if component != "text_encoder" else _clip_module(m.grammar_name, encoders[component]))


def _kohya_file(path, names_by_prefix):
    from safetensors.torch import save_file

    tensors = {}
    for prefix, names in names_by_prefix.items():
        for n in names:
            tensors[f"{prefix}{n}.lora_down.weight"] = torch.zeros(2, 4)
            tensors[f"{prefix}{n}.lora_up.weight"] = torch.zeros(4, 2)
    save_file(tensors, path)
    return path


def test_no_unique_reading_is_never_a_guess(tmp_path, monkeypatch):
    """Names outside the grammar, SGM indices the standard arithmetic places nowhere, components with no
    grammar, and names that read two ways: the flattened name stays, marked, with why."""
    f = _kohya_file(str(tmp_path / "odd.safetensors"), {
        "lora_unet_": ["down_blocks_0_attentions_0_proj_in", "foo_bar", "input_blocks_3_1_proj_in", "middle_block_3_in_layers_2",
                       "down_blocks_01_resnets_0_conv1"],
        "lora_transformer_": ["transformer_blocks_0_attn_to_q"],
    })
    by = {(m.component, m.name): m for m in read_foreign(f).modules}
    ok = by[("unet", "down_blocks_0_attentions_0_proj_in")]
    assert (ok.grammar_name, ok.grammar_note, ok.shown_name()) == ("down_blocks.0.attentions.0.proj_in", None, ("down_blocks.0.attentions.0.proj_in", "grammar"))
    for name, why in [("foo_bar", "fits no module name"), ("input_blocks_3_1_proj_in", "names no module there"),
                      ("middle_block_3_in_layers_2", "names no module there"), ("down_blocks_01_resnets_0_conv1", "fits no module name")]:
        m = by[("unet", name)]
        assert m.grammar_name is None and why in m.grammar_note and m.shown_name() == (name, "file"), (name, m.grammar_note)
    t = by[("transformer", "transformer_blocks_0_attn_to_q")]
    assert t.grammar_name is None and "no grammar for transformer" in t.grammar_note
    # a grammar in which one flattened name spells two module paths: neither is chosen
    monkeypatch.setitem(grammar_names.GRAMMARS, "unet", (Grammar("a test grammar", grammar_trie(["proj.in_x", "proj_in.x", "proj_in.y"]), lambda p: p),))
    r = read_kohya_name("unet", "proj_in_x")
    assert r.dotted is None and "'proj.in_x'" in r.note and "'proj_in.x'" in r.note
    assert read_kohya_name("unet", "proj_in_y").dotted == "proj_in.y"


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory):
    return sd_lora_case(str(tmp_path_factory.mktemp("sd_lora_names")))


def test_inspect_json_carries_the_reading(sd_lora, run_cli):
    """inspect --json: without --base each kohya record has its dotted reading, unchecked; with --base the
    exact module path, checked (transformers 5's CLIPTextModel: no `text_model.`)."""
    doc = json.loads(run_cli("inspect", sd_lora["file"], "--json").stdout)
    by = {m["name_in_file"]: m for m in doc["modules"]}
    rec = by["down_blocks_0_resnets_0_conv1"]
    assert (rec["grammar_name"], rec["grammar_note"], rec["checked"], rec["resolved"]) == ("down_blocks.0.resnets.0.conv1", None, False, False)
    te = by["encoder_layers_0_mlp_fc1"]
    assert (te["component"], te["grammar_name"], te["checked"]) == ("text_encoder", "text_model.encoder.layers.0.mlp.fc1", False)
    assert all(m["grammar_name"] is not None for m in doc["modules"])
    r = run_cli("inspect", sd_lora["file"], "--json", "--base", sd_lora["pipe"])
    assert r.exit_code == 0
    by = {m["name_in_file"]: m for m in json.loads(r.stdout)["modules"]}
    te = by["encoder_layers_0_mlp_fc1"]
    assert (te["module"], te["grammar_name"], te["checked"], te["resolved"]) == ("encoder.layers.0.mlp.fc1", "text_model.encoder.layers.0.mlp.fc1", True, True)
    assert by["down_blocks_0_resnets_0_conv1"]["module"] == "down_blocks.0.resnets.0.conv1" and by["down_blocks_0_resnets_0_conv1"]["checked"]
