"""kohya / LyCORIS / diffusers LoRA files and PEFT LoHa adapters named by Hub id, against a fake Hub
on 127.0.0.1 (``tests/sources/_fake_hub.py``; never any other address).

Every Hub result is compared with the same command on the same file as a local path: inspect and
check JSON equal modulo paths, merge and convert outputs equal byte for byte, ``adapterfmt.load``
outputs equal. Header-only commands must make range requests only (nothing downloaded, no torch);
offline, a warm cache answers. Commands run in a few fresh processes (huggingface_hub reads
``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` on import), many commands per process.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from _diffusion_helpers import sd_lora_case, tiny_unet
from _fake_hub import FakeHub, run_batch

SHA_MAIN, SHA_V0 = "a" * 40, "b" * 40


def _local_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _big_kohya(path: Path, modules: int = 12, width: int = 1024, rank: int = 64) -> Path:
    """A kohya file of ~6 MiB whose alpha scalars lie between 512 KiB factor pairs (F32 and one F16)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(modules):
        name = f"lora_unet_blocks_{i}_proj"
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, width, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(width, rank, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(1.5 + i, dtype=torch.float16 if i == 3 else torch.float32)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Any]:
    """Real adapter files: LyCORIS's SD LoRA/LoCon file (and a v0 with other alphas), a diffusers
    file of its UNet part, a PEFT LoHa adapter of the same UNet, a big kohya file."""
    from peft import LoHaConfig, get_peft_model

    from adapterfmt.convert.foreign import from_peft, to_peft

    d = tmp_path_factory.mktemp("hubfiles")
    case = sd_lora_case(str(tmp_path_factory.mktemp("sd_lora")))
    pipe, kohya = Path(case["pipe"]), Path(case["file"])
    state = load_file(str(kohya))
    old = {k: v * 2 if k.endswith(".alpha") else v for k, v in state.items()}
    kohya_v0 = d / "v0.safetensors"
    save_file(old, str(kohya_v0), metadata={"ss_network_module": "lycoris.kohya"})
    to_peft(kohya, d / "peft-unet", base=str(pipe / "unet"), component="unet")
    diffusers_file = d / "pytorch_lora_weights.safetensors"
    from_peft(d / "peft-unet", diffusers_file, to="diffusers", base=str(pipe / "unet"), component="unet")
    model = get_peft_model(tiny_unet(), LoHaConfig(r=4, alpha=6, target_modules=["to_q", "to_k", "conv1"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".hada_" in n:
                p.normal_(0, 0.3)
    model.save_pretrained(str(d / "loha"))
    return {"pipe": pipe, "base_unet": case["base"]["unet"], "kohya": kohya, "kohya_v0": kohya_v0, "diffusers": diffusers_file, "loha": d / "loha",
            "big": _big_kohya(d / "big_lora.safetensors"), "dir": d}


@pytest.fixture(scope="module")
def hub(files):
    read = lambda p: Path(p).read_bytes()  # noqa: E731
    with FakeHub() as fake:
        fake.add("user/kohya", {"sd_lora.safetensors": read(files["kohya"]), "README.md": b"# a LoRA"}, sha=SHA_MAIN)
        fake.add("user/kohya", {"sd_lora.safetensors": read(files["kohya_v0"])}, sha=SHA_V0, refs=("v0",))
        fake.add("user/big", {"big_lora.safetensors": read(files["big"])}, sha="c" * 40)
        # diffusers' file name wins over any other .safetensors file
        fake.add("user/diffusers", {"pytorch_lora_weights.safetensors": read(files["diffusers"]), "other.safetensors": read(files["kohya"])}, sha="d" * 40)
        fake.add("user/several", {"a.safetensors": read(files["kohya"]), "b.safetensors": read(files["kohya_v0"])}, sha="e" * 40)
        fake.add("user/loha", _local_files(files["loha"]), sha="f" * 40)
        fake.add("user/nested", {"loras/pytorch_lora_weights.safetensors": read(files["diffusers"]), "README.md": b"#"}, sha="8" * 40)
        fake.add("user/broken", {"lora.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "}, sha="9" * 40)
        yield fake


def _same(doc: dict[str, Any], *paths: Any) -> dict[str, Any]:
    """``doc`` without what names the input (``source``, ``file``, ``adapter``, a check's ``adapter``; paths in messages)."""
    doc = {k: v for k, v in doc.items() if k not in ("source", "file", "adapter")}
    if isinstance(doc.get("check"), dict):
        doc["check"] = {k: v for k, v in doc["check"].items() if k != "adapter"}
    text = json.dumps(doc)
    for p in paths:
        text = text.replace(str(p), "<file>")
    return json.loads(text)


def _json(step: dict[str, Any]) -> dict[str, Any]:
    assert step["exit_code"] == 0, step["stderr"]
    return json.loads(step["stdout"])


def _one_error_line(step: dict[str, Any], *names: str) -> str:
    assert step["exit_code"] == 2, step
    lines = step["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in step["stderr"], step["stderr"]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def test_header_only_commands_read_hub_files_by_range_request(files, hub, tmp_path, run_cli):
    cache, pipe = tmp_path / "hub", str(files["pipe"])
    hub.reset_count()
    steps = run_batch(hub, cache, [
        {"cli": ["inspect", "user/big", "--json"]},
        {"cli": ["inspect", "user/kohya", "--json"]},
        {"cli": ["check", "--base", pipe, "--adapter", "user/kohya", "--json"]},
        {"cli": ["inspect", "user/kohya", "--revision", "v0", "--json"]},
        {"cli": ["inspect", "user/diffusers", "--json", "--base", pipe + "/unet"]},
        {"cli": ["inspect", "user/several"]},
        {"cli": ["inspect", "user/several", "--weight-name", "b.safetensors", "--json"]},
        {"cli": ["check", "--base", pipe, "--adapter", "user/kohya", "--weight-name", "nope.safetensors"]},
        {"cli": ["inspect", "user/broken"]},
        {"cli": ["inspect", "user/nested", "--subfolder", "loras", "--json"]},
        {"cli": ["inspect", "user/nothing"]},
    ])
    assert not any(s["torch"] for s in steps), "a header-only command imported torch"
    local = lambda *args: json.loads(run_cli(*args).stdout)  # noqa: E731
    assert _same(_json(steps[0])) == _same(local("inspect", files["big"], "--json"))
    assert {m["name_in_file"]: m["alpha"] for m in _json(steps[0])["modules"]} == {f"blocks_{i}_proj": 1.5 + i for i in range(12)}
    assert _same(_json(steps[1])) == _same(local("inspect", files["kohya"], "--json"))
    assert _json(steps[1])["file"] == f"hf://user/kohya@{SHA_MAIN}/sd_lora.safetensors"
    hub_check, local_check = _json(steps[2]), local("check", "--base", pipe, "--adapter", files["kohya"], "--json")
    assert hub_check["ok"] and _same(hub_check) == _same(local_check)
    v0 = _json(steps[3])
    assert _same(v0) == _same(local("inspect", files["kohya_v0"], "--json")) and v0["file"].startswith(f"hf://user/kohya@{SHA_V0}/")
    assert _same(v0) != _same(_json(steps[1]))  # the revision was honoured: other alphas
    diffusers = _json(steps[4])
    assert diffusers["format"] == "diffusers" and diffusers["file"].endswith("/pytorch_lora_weights.safetensors") and diffusers["check"]["components"][0]["ok"]
    assert _same(diffusers) == _same(local("inspect", files["diffusers"], "--json", "--base", pipe + "/unet"))
    _one_error_line(steps[5], "user/several", "a.safetensors", "b.safetensors", "--weight-name")
    assert _same(_json(steps[6])) == _same(v0)
    _one_error_line(steps[7], "user/kohya/nope.safetensors", "sd_lora.safetensors")
    _one_error_line(steps[8], f"hf://user/broken@{'9' * 40}/lora.safetensors")
    assert _json(steps[9])["file"] == f"hf://user/nested@{'8' * 40}/loras/pytorch_lora_weights.safetensors"
    assert _same(_json(steps[9])) == _same(local("inspect", files["diffusers"], "--json"))
    _one_error_line(steps[10], "user/nothing", "no such Hub repo")
    # range requests only: every file request asks for bytes, nothing lands in the cache
    file_requests = [r for r in hub.requests if "/resolve/" in r]
    assert file_requests and all(r.startswith("GET ") and "bytes=" in r for r in file_requests), file_requests
    assert not list(cache.rglob("*.safetensors"))
    big = files["big"].stat().st_size
    assert big > 6_000_000 and hub.bytes_served < 1_000_000, hub.bytes_served


_LOAD = """
import copy, torch, adapterfmt
from diffusers import UNet2DConditionModel
base = UNet2DConditionModel.from_pretrained({unet!r}).eval()
g = torch.Generator().manual_seed(5)
x = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 3, 16, generator=g))
run = lambda m: m(x[0], x[1], encoder_hidden_states=x[2]).sample.detach()
hub_model, local_model = copy.deepcopy(base), copy.deepcopy(base)
adapterfmt.load(hub_model, "user/kohya", component="unet", revision="v0")
adapterfmt.load(local_model, {local!r}, component="unet")
with torch.no_grad():
    result = {{"equal": torch.equal(run(hub_model), run(local_model)), "changed": not torch.equal(run(hub_model), run(base))}}
"""


def test_merge_convert_and_load_download_through_the_cache_and_work_offline(files, hub, tmp_path, run_cli):
    cache, pipe, out = tmp_path / "hub", files["pipe"], tmp_path / "out"
    unet = str(pipe / "unet")
    online = run_batch(hub, cache, [
        {"cli": ["merge", "--base", unet, "--adapter", "user/kohya", "--component", "unet", "-o", str(out / "kohya"), "-q"]},
        {"cli": ["merge", "--base", str(pipe), "--adapter", "user/kohya", "--adapter-revision", "v0", "-o", str(out / "pipe-v0"), "-q"]},
        {"cli": ["merge", "--base", unet, "--adapter", "user/diffusers", "-o", str(out / "diffusers"), "-q"]},
        {"cli": ["merge", "--base", unet, "--adapter", "user/loha", "-o", str(out / "loha"), "-q"]},
        {"cli": ["inspect", "user/loha", "--json"]},
        {"cli": ["check", "--base", unet, "--adapter", "user/loha", "--json"]},
        {"cli": ["convert", "user/several", "--weight-name", "a.safetensors", "--to", "peft", "-o", str(out / "peft"), "--base", unet, "--component", "unet"]},
        {"code": _LOAD.format(unet=unet, local=str(files["kohya_v0"]))},
        {"cli": ["inspect", "user/kohya", "--scan", "--json"]},
    ])
    for step in online[:4] + online[6:7]:
        assert step["exit_code"] == 0, step["stderr"]
    assert online[7]["result"] == {"equal": True, "changed": True}
    scanned = _json(online[8])
    assert scanned["scanned"] and _same(scanned) == _same(json.loads(run_cli("inspect", files["kohya"], "--scan", "--json").stdout))
    ref = tmp_path / "local"
    for args in (("--base", unet, "--adapter", files["kohya"], "--component", "unet", "-o", ref / "kohya"),
                 ("--base", pipe, "--adapter", files["kohya_v0"], "-o", ref / "pipe-v0"),
                 ("--base", unet, "--adapter", files["diffusers"], "-o", ref / "diffusers"),
                 ("--base", unet, "--adapter", files["loha"], "-o", ref / "loha")):
        assert run_cli("merge", *args, "-q").exit_code == 0
    assert run_cli("convert", files["kohya"], "--to", "peft", "-o", ref / "peft", "--base", unet, "--component", "unet").exit_code == 0
    for name in ("kohya", "pipe-v0", "diffusers", "loha", "peft"):
        assert _local_files(out / name) == _local_files(ref / name), name
    assert _same(_json(online[4]), files["loha"]) == _same(json.loads(run_cli("inspect", files["loha"], "--json").stdout), files["loha"])
    assert _same(_json(online[5])) == _same(json.loads(run_cli("check", "--base", unet, "--adapter", files["loha"], "--json").stdout))
    cached = {p.name for p in cache.rglob("*") if p.is_file() and "blobs" not in p.parts}
    assert "sd_lora.safetensors" in cached and "README.md" not in cached and "other.safetensors" not in cached

    # offline: the warm cache answers, and the Hub sees no request
    hub.reset_count()
    offline = run_batch(hub, cache, [
        {"cli": ["inspect", "user/kohya", "--json"]},
        {"cli": ["inspect", "user/kohya", "--revision", "v0", "--json"]},
        {"cli": ["merge", "--base", unet, "--adapter", "user/kohya", "--component", "unet", "-o", str(out / "kohya-offline"), "-q"]},
        {"cli": ["check", "--base", unet, "--adapter", "user/loha"]},
        {"cli": ["inspect", "user/never-fetched"]},
    ], offline=True)
    assert _same(_json(offline[0]), files["kohya"]) == _same(json.loads(run_cli("inspect", files["kohya"], "--json").stdout), files["kohya"])
    assert _same(_json(offline[1]), files["kohya_v0"]) == _same(json.loads(run_cli("inspect", files["kohya_v0"], "--json").stdout), files["kohya_v0"])
    assert offline[2]["exit_code"] == 0 and _local_files(out / "kohya-offline") == _local_files(ref / "kohya")
    assert offline[3]["exit_code"] == 0, offline[3]["stderr"]
    _one_error_line(offline[4], "user/never-fetched", "HF_HUB_OFFLINE")
    assert hub.requests == []


def test_several_files_in_a_local_folder_are_an_error_naming_them(files, tmp_path, run_cli):
    """The rule is the same for a local folder: several .safetensors files, none diffusers' name."""
    import shutil

    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(files["kohya"], folder / "a.safetensors")
    shutil.copy(files["kohya_v0"], folder / "b.safetensors")
    r = run_cli("inspect", folder)
    assert r.exit_code == 2 and "a.safetensors, b.safetensors" in r.stderr and "--weight-name" in r.stderr
    doc = json.loads(run_cli("inspect", folder, "--weight-name", "b.safetensors", "--json").stdout)
    assert _same(doc) == _same(json.loads(run_cli("inspect", files["kohya_v0"], "--json").stdout))
    import adapterfmt

    named, direct = copy.deepcopy(files["base_unet"]), copy.deepcopy(files["base_unet"])
    adapterfmt.load(named, folder, component="unet", weight_name="a.safetensors")
    adapterfmt.load(direct, files["kohya"], component="unet")
    assert all(torch.equal(a, b) for a, b in zip(named.state_dict().values(), direct.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        adapterfmt.load(named, folder, component="unet", weight_name="nope.safetensors", adapter_name="x")
    assert sorted(os.listdir(folder)) == ["a.safetensors", "b.safetensors"]


def test_scalar_ranges_are_read_from_the_head_or_in_few_requests():
    """Ranges inside the bytes the header request brought come from there; ranges less than 64 KiB
    apart share a request; each answer is its own slice (the fetch is counted, not networked)."""
    from adapterfmt.sources.hub_files import RemoteFile

    data = bytes(range(256)) * 4096  # 1 MiB
    asked: list[tuple[int, int]] = []

    class Counted(RemoteFile):
        def fetch(self, start: int, end: int) -> tuple[bytes, int]:
            asked.append((start, end))
            return data[start:end], len(data)

    remote = Counted("user/x", "f.safetensors", "0" * 40, head=data[:1000])
    ranges = [(10, 14), (500_000, 500_004), (500_100, 500_108), (530_000, 530_002), (900_000, 900_004), (998, 1002)]
    assert remote.read_ranges(ranges) == [data[a:b] for a, b in ranges]
    assert sorted(asked) == [(998, 1002), (500_000, 530_002), (900_000, 900_004)]
