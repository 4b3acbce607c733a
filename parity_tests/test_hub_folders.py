"""Hugging Face folders as they exist: written by transformers' and timm's own ``save_pretrained`` /
``save_for_hf``, served by the Hub (``layer_norm_eps`` 1e-12, ``image_size`` 224 on 384 checkpoints, the
first uploads' GRN names, ``pytorch_model.bin``, shards) and kept in huggingface_hub's cache (``refs/``,
``snapshots/`` symlinked into ``blobs/``). Each is read exactly or refused by name.

The oracles are the libraries themselves: transformers loads the folders (through the cache by repository id,
offline), huggingface_hub resolves the cache, timm writes its own folders and resolves their data config.
Hub-style folders come from ``convnextv2.fixtures.hub_folders`` (deterministic, no network).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

from convnextv2 import converters, fixtures, reference
from convnextv2.converters import hf as hf_format
from convnextv2.converters.checkpoint import Preprocessing
from convnextv2.converters.runners.peers import import_timm, import_transformers
from convnextv2.fixtures.hub_folders import commit_hash, write_hub_cache, write_hub_folder
from convnextv2.parity_tests.conftest_helpers import assert_same_tensors, run_cli
from convnextv2.reference import parity_rule
from convnextv2.reference.errors import BadInputError
from convnextv2.reference.parity_rule import seeded_images

pytestmark = [pytest.mark.peers, pytest.mark.torch]

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CUSTOM = "custom:depths=1,1,2,1;dims=8,16,32,64"
BATCH = 2
RESOLUTION = 64
REPO_ID = "facebook/convnextv2-atto-22k-384"


def our_logits(ckpt, images):
    with torch.no_grad():
        ours32 = reference.build(ckpt, "torch")(torch.from_numpy(images)).double().numpy()
        ref64 = reference.build(ckpt, "torch", dtype="float64")(torch.from_numpy(images).double()).numpy()
    return ours32, ref64


def assert_parity(peer, ckpt, images, what):
    ours32, ref64 = our_logits(ckpt, images)
    ours_err = parity_rule.max_abs_error(ours32, ref64)
    peer_err = parity_rule.max_abs_error(peer, ref64)
    bound = parity_rule.tolerance(ours_err)
    print(f"{what}: peer error {peer_err:.3e}, ours {ours_err:.3e}, bound {bound:.3e}")
    assert peer_err <= bound, f"{what}: peer error {peer_err:.3e} > {bound:.3e}"
    assert (peer.argmax(-1) == ref64.argmax(-1)).all(), f"{what}: top-1 differs"


def hf_state(ckpt) -> dict[str, np.ndarray]:
    return dict(hf_format.canonical_to_state_dict(ckpt))


def peer_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def quiet_load(path, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return converters.load(path, **options)


# ------------------------------------------------------------ transformers' own save_pretrained output

@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("headless", [False, True], ids=["classifier", "base-model"])
def test_save_pretrained_folders_read_back_bit_for_bit(tmp_path, safe, sharded, headless):
    transformers = import_transformers()
    # transformers' default layer_norm_eps (1e-12), as every Hub config has it.
    config = transformers.ConvNextV2Config(depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 32, 64], num_labels=6)
    cls = transformers.ConvNextV2Model if headless else transformers.ConvNextV2ForImageClassification
    torch.manual_seed(3)
    model = cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # GRN (zero at init) and norms away from identity
            param.add_(0.05 * torch.randn_like(param))
    folder = tmp_path / "peer"
    model.save_pretrained(folder, safe_serialization=safe, **({"max_shard_size": "8KB"} if sharded else {}))
    if not safe and not any(folder.glob("pytorch_model*.bin")):
        pytest.skip(f"transformers {transformers.__version__} writes safetensors only (safe_serialization=False "
                    "is ignored since 5.0); the .bin cases run under 4.x")
    index = folder / ("model.safetensors.index.json" if safe else "pytorch_model.bin.index.json")
    assert index.is_file() == sharded
    if sharded:
        assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    assert converters.detect_format(folder) == "hf"
    with pytest.warns(UserWarning, match="no preprocessor_config.json; preprocessing assumed: 224px"):
        ckpt = converters.load(folder)
    expected = peer_state(model)
    assert any(k.startswith("convnextv2.") for k in expected) != headless  # both prefixes are exercised
    assert_same_tensors(hf_state(ckpt), expected)
    assert ckpt.config.head_norm_eps == 1e-12 and ckpt.source.layout["hf_config"]["layer_norm_eps"] == 1e-12
    assert ckpt.preprocessing.origin == "assumed" and ckpt.describe()["preprocessing"]["origin"] == "assumed"
    images = seeded_images(BATCH, RESOLUTION, seed=3)
    with torch.no_grad():
        out = model(torch.from_numpy(images))
        peer = (out.pooler_output if headless else out.logits).double().numpy()
    assert_parity(peer, ckpt, images, f"transformers save_pretrained {index.name if sharded else 'single'}")


def test_broken_shard_index_is_refused_by_name(tmp_path):
    write_hub_folder(tmp_path / "hub", CUSTOM, 1, num_classes=4, shards=3)
    index = tmp_path / "hub" / "pytorch_model.bin.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["classifier.weight"] = "pytorch_model-00009-of-00003.bin"
    index.write_text(json.dumps(data))
    with pytest.raises(BadInputError, match=r"shard 'pytorch_model-00009-of-00003.bin' is missing"):
        quiet_load(tmp_path / "hub")
    data["weight_map"]["classifier.weight"] = "../pytorch_model-00001-of-00003.bin"
    index.write_text(json.dumps(data))
    with pytest.raises(BadInputError, match=r"shard '../pytorch_model-00001-of-00003.bin' is missing"):
        quiet_load(tmp_path / "hub")


# ------------------------------------------------------------ Hub folders: eps, resolution, old GRN names

def test_hub_folder_keeps_eps_and_reads_like_transformers(tmp_path):
    transformers = import_transformers()
    folder = tmp_path / "convnextv2-atto-1k-224"
    truth = write_hub_folder(folder, "atto", 4, preprocessor_size=224)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stated preprocessing is not a guess: no note about it
        warnings.filterwarnings("ignore", message=".*eps 1e-12")
        ckpt = converters.load(folder)
    assert ckpt.preprocessing == Preprocessing() and ckpt.preprocessing.origin == "read"
    assert ckpt.config.head_norm_eps == 1e-12
    assert_same_tensors(dict(ckpt.tensors), dict(truth.tensors))
    model, info = transformers.ConvNextV2ForImageClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    images = seeded_images(BATCH, RESOLUTION, seed=4)
    with torch.no_grad():
        peer = model.eval()(torch.from_numpy(images)).logits.double().numpy()
    assert_parity(peer, ckpt, images, "transformers on a Hub folder (eps 1e-12)")


@pytest.mark.parametrize("name,size", [("convnextv2-atto-22k-384", 384), ("convnextv2-huge-22k-512", 512),
                                       ("convnextv2-atto-1k-224", 224), ("my-finetune", 224)])
def test_missing_preprocessor_config_is_assumed_from_the_name(tmp_path, name, size):
    transformers = import_transformers()
    folder = tmp_path / name
    write_hub_folder(folder, CUSTOM, 5, num_classes=3)
    assert json.loads((folder / "config.json").read_text())["image_size"] == 224
    note = rf"the name '{name}' says {size}px; config.json's image_size is 224" if size != 224 \
        else r"\(config.json's image_size\)"
    with pytest.warns(UserWarning, match=rf"no preprocessor_config.json; preprocessing assumed: {size}px.*{note}"):
        ckpt = converters.load(folder)
    assert ckpt.preprocessing == Preprocessing.for_resolution(size) and ckpt.preprocessing.origin == "assumed"
    assert ckpt.describe()["preprocessing"]["origin"] == "assumed"
    if size == 384:  # once through the command line: inspect shows the guess
        result = run_cli("inspect", str(folder), "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["preprocessing"]["origin"] == "assumed"
        assert "preprocessing assumed: 384px" in result.stderr
    # What a transformers user then gets from the converted folder: the name's resolution, squashed at 384+.
    out = tmp_path / "converted"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        converters.save(ckpt, out, format="hf")
    processor = transformers.ConvNextImageProcessor.from_pretrained(out)
    assert processor.size == {"shortest_edge": size}


def test_old_grn_names_are_mapped_and_transformers_agrees(tmp_path):
    transformers = import_transformers()
    old = tmp_path / "old-grn"
    truth = write_hub_folder(old, CUSTOM, 6, num_classes=10, legacy_grn=True)
    stored = torch.load(old / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert any(k.endswith("grn.gamma") for k in stored) and not any(k.endswith("grn.weight") for k in stored)
    # transformers itself does not map them: GRN comes up freshly initialised (the failure we do better than).
    _, info = transformers.ConvNextV2ForImageClassification.from_pretrained(old, output_loading_info=True)
    assert any(k.endswith("grn.weight") for k in info["missing_keys"]), info

    with pytest.warns(UserWarning, match=r"10 GRN tensors use the old names grn.gamma/grn.beta; read as grn.weight"):
        ckpt = converters.load(old)
    assert_same_tensors(dict(ckpt.tensors), dict(truth.tensors))
    assert ckpt.source.layout["legacy_grn_names"] is True
    new = tmp_path / "new-grn"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        converters.save(ckpt, new, format="hf")
    model, info = transformers.ConvNextV2ForImageClassification.from_pretrained(new, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    images = seeded_images(BATCH, RESOLUTION, seed=6)
    with torch.no_grad():
        peer = model.eval()(torch.from_numpy(images)).logits.double().numpy()
    assert_parity(peer, ckpt, images, "transformers on the renamed folder")
    # The mapping transformers' conversion script applies (gamma -> weight, beta -> bias), done on the peer's
    # side from the old file alone, gives the same model bit for bit.
    renamed = {k.replace("grn.gamma", "grn.weight").replace("grn.beta", "grn.bias"): v for k, v in stored.items()}
    oracle = transformers.ConvNextV2ForImageClassification(model.config)
    oracle.load_state_dict(renamed, strict=True)
    with torch.no_grad():
        np.testing.assert_array_equal(oracle.eval()(torch.from_numpy(images)).logits.double().numpy(), peer)

    result = run_cli("convert", str(old), "-o", str(tmp_path / "c.safetensors"), "--to", "canonical")
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"old names grn.gamma/grn.beta", result.stderr)) == 1, result.stderr


def test_old_and_new_grn_names_together_are_refused(tmp_path):
    folder = tmp_path / "both"
    write_hub_folder(folder, CUSTOM, 7, num_classes=2, weights="safetensors")
    state = safetensors.numpy.load_file(folder / "model.safetensors")
    key = next(k for k in state if k.endswith("grn.weight"))
    state[key.replace("grn.weight", "grn.gamma")] = state[key]
    safetensors.numpy.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInputError, match=r"both .*grn.gamma and .*grn.weight are present"):
        quiet_load(folder)


# ------------------------------------------------------------ huggingface_hub's cache

@pytest.fixture
def hub_cache(tmp_path):
    """A cache with main (old .bin, shards, no preprocessor config), tag v1.0 (safetensors, base model) and a
    snapshot no ref names."""
    main = write_hub_folder(tmp_path / "src-main", "atto", 8, shards=2)
    tagged = write_hub_folder(tmp_path / "src-v1", "atto", 9, num_classes=0, weights="safetensors",
                              preprocessor_size=384)
    loose = write_hub_folder(tmp_path / "src-loose", CUSTOM, 10, num_classes=5)
    cache = tmp_path / "cache"
    root = write_hub_cache(cache, REPO_ID, {"main": tmp_path / "src-main", "v1.0": tmp_path / "src-v1"},
                           detached=[tmp_path / "src-loose"])
    return {"cache": cache, "root": root, "main": main, "v1.0": tagged, "loose": loose,
            "loose_commit": commit_hash(tmp_path / "src-loose")}


def test_cache_layout_is_what_huggingface_hub_reads(hub_cache):
    import huggingface_hub

    scan = huggingface_hub.scan_cache_dir(hub_cache["cache"])
    assert not scan.warnings, scan.warnings
    (repo,) = scan.repos
    assert repo.repo_id == REPO_ID
    assert sorted(sorted(r.refs) for r in repo.revisions) == [[], ["main"], ["v1.0"]]
    assert all(p.file_path.is_symlink() for r in repo.revisions for p in r.files)


@pytest.mark.parametrize("revision", [None, "v1.0", "loose"])
def test_cache_root_resolves_revisions_as_huggingface_hub_and_transformers_do(hub_cache, revision):
    import huggingface_hub

    transformers = import_transformers()
    root, cache = hub_cache["root"], hub_cache["cache"]
    asked = hub_cache["loose_commit"] if revision == "loose" else revision
    truth = hub_cache[revision or "main"]
    assert converters.detect_format(root) == "hf"
    ckpt = quiet_load(root, **({"revision": asked} if asked else {}))
    assert_same_tensors(dict(ckpt.tensors), dict(truth.tensors))
    # huggingface_hub's own resolution names the same snapshot.
    config_path = huggingface_hub.try_to_load_from_cache(REPO_ID, "config.json", cache_dir=cache, revision=asked)
    assert Path(config_path).parent.name == ckpt.source.layout["hub_cache"]["commit"]
    assert ckpt.source.layout["hub_cache"]["repo_id"] == REPO_ID
    # transformers, offline, by repository id through the same cache: the very same tensors.
    cls = transformers.ConvNextV2Model if truth.config.num_classes == 0 else transformers.ConvNextV2ForImageClassification
    model = cls.from_pretrained(REPO_ID, cache_dir=cache, revision=asked, local_files_only=True)
    assert_same_tensors(hf_state(ckpt), peer_state(model))
    # The snapshot folder given directly reads the same.
    assert_same_tensors(dict(quiet_load(Path(config_path).parent).tensors), dict(truth.tensors))


def test_cache_without_symlinks_reads_the_same(tmp_path):
    truth = write_hub_folder(tmp_path / "src", CUSTOM, 11, num_classes=3)
    root = write_hub_cache(tmp_path / "cache", REPO_ID, {"main": tmp_path / "src"}, symlinks=False)
    assert not any(p.is_symlink() for p in root.rglob("*"))
    assert_same_tensors(dict(quiet_load(root).tensors), dict(truth.tensors))


def test_cache_revision_errors_name_what_is_there(hub_cache, tmp_path):
    root = hub_cache["root"]
    with pytest.raises(BadInputError, match=r"revision 'v9' is neither in refs/ nor a snapshot \(refs: main -> [0-9a-f]{40}, "
                                             r"v1.0 -> [0-9a-f]{40}; snapshots: "):
        quiet_load(root, revision="v9")
    for bad in ("../../etc", "/etc/passwd", "refs/../main"):
        with pytest.raises(BadInputError, match="is not a branch, tag or commit name"):
            quiet_load(root, revision=bad)
    with pytest.raises(BadInputError, match="--revision applies to a huggingface_hub cache folder"):
        quiet_load(tmp_path / "src-main", revision="main")
    (root / "refs" / "main").write_text("0" * 40)
    with pytest.raises(BadInputError, match=r"refs/main points at commit '0{40}', which has no snapshot"):
        quiet_load(root)
    assert converters.detect_format(root) == "hf"  # still recognised, so the read can say what is wrong


def test_cache_symlink_out_of_the_cache_is_refused(hub_cache, tmp_path):
    root = hub_cache["root"]
    outside = tmp_path / "outside-config.json"
    snapshot = root / "snapshots" / (root / "refs" / "main").read_text()
    outside.write_bytes((snapshot / "config.json").read_bytes())
    (snapshot / "config.json").unlink()
    os.symlink(outside, snapshot / "config.json")
    with pytest.raises(BadInputError, match=r"config.json: symlink points outside the cache folder .* refusing to follow"):
        quiet_load(root)
    with pytest.raises(BadInputError, match="symlink points outside the cache folder"):
        quiet_load(snapshot)
    result = run_cli("inspect", str(root))
    assert result.returncode == 2 and "symlink points outside the cache folder" in result.stderr


@pytest.mark.parametrize("command", ["inspect", "convert", "parity"])
def test_cli_revision_option(hub_cache, tmp_path, command):
    root = hub_cache["root"]
    extra = {"convert": ["-o", str(tmp_path / "out.safetensors"), "--to", "canonical"],
             "parity": ["--runtimes", "torch", "--batch", "2"], "inspect": []}[command]
    result = run_cli(command, str(root), "--revision", "v1.0", "--json", *extra)
    assert result.returncode == 0, result.stderr
    if command == "inspect":
        assert json.loads(result.stdout)["num_classes"] == 0
    elif command == "convert":
        assert_same_tensors(dict(converters.load(tmp_path / "out.safetensors").tensors),
                            dict(hub_cache["v1.0"].tensors))
    else:  # the parity report names the snapshot it checked
        assert json.loads(result.stdout)["passed"]
    bad_extra = ["-o", str(tmp_path / "not-written.safetensors"), "--to", "canonical"] if command == "convert" else []
    bad = run_cli(command, str(root), "--revision", "nope", *bad_extra)
    assert bad.returncode == 2 and "revision 'nope' is neither in refs/ nor a snapshot" in bad.stderr
    assert "v1.0 ->" in bad.stderr and not (tmp_path / "not-written.safetensors").exists()


# ------------------------------------------------------------ timm consumers

TIMM_REGISTRY_RECORD = ("tag", "license", "origin_url")  # timm's record of its own released weights


def flatten(data, prefix=""):
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_timm_folder_carries_what_timm_save_for_hf_writes(tmp_path):
    timm = import_timm()
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("convnextv2_nano.fcmae_ft_in22k_in1k_384", pretrained=False).eval()
    theirs_dir = tmp_path / "theirs"
    save_for_hf(model, str(theirs_dir), safe_serialization=True)
    theirs = json.loads((theirs_dir / "config.json").read_text())
    ckpt = converters.load(theirs_dir)  # timm's own folder reads with its preprocessing (384, squash)
    assert ckpt.preprocessing == Preprocessing.for_resolution(384) and ckpt.preprocessing.origin == "read"
    ours_dir = tmp_path / "ours"
    converters.save(ckpt, ours_dir, format="timm")
    ours = flatten(json.loads((ours_dir / "config.json").read_text()))
    expected = {k: v for k, v in flatten(theirs).items()
                if k.rsplit(".", 1)[-1] not in TIMM_REGISTRY_RECORD}
    missing = sorted(set(expected) - set(ours))
    assert not missing, f"timm's save_for_hf writes {missing}, ours does not"
    differ = {k: (expected[k], ours[k]) for k in expected if expected[k] != ours[k]}
    assert not differ, differ
    assert_same_tensors(safetensors.numpy.load_file(ours_dir / "model.safetensors"), peer_state(model))


def write_384_timm(tmp_path):
    ckpt = fixtures.make_checkpoint("atto", 12, "original")
    ckpt.preprocessing = Preprocessing.for_resolution(384)
    pair, folder = tmp_path / "atto-384.safetensors", tmp_path / "atto-384"
    converters.save(ckpt, pair, format="timm")
    converters.save(ckpt, folder, format="timm")
    return ckpt, pair, folder


EXPECTED_384 = {"input_size": (3, 384, 384), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "squash",
                "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def data_config(timm, model, **kwargs):
    found = timm.data.resolve_data_config(model=model, **kwargs)
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in found.items()}


def test_documented_timm_recipes_give_the_checkpoints_data_config(tmp_path):
    """The two recipes of docs/hf_timm.md, as written there."""
    timm = import_timm()
    ckpt, pair, folder = write_384_timm(tmp_path)
    images = seeded_images(BATCH, RESOLUTION, seed=12)
    # A folder: timm reads config.json itself.
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    # A file pair: the JSON beside the weights supplies the architecture, model_args and pretrained_cfg.
    cfg = json.loads(pair.with_suffix(".json").read_text())
    model2 = timm.create_model(cfg["architecture"], pretrained=True,
                               pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=str(pair)),
                               **cfg["model_args"]).eval()
    for what, m in (("local-dir", model), ("file + json", model2)):
        assert data_config(timm, m) == EXPECTED_384, what
        # Asking for the test-time size must not fall back to the registered atto tag's 288 / 0.95.
        assert data_config(timm, m, use_test_size=True) == EXPECTED_384, what
        with torch.no_grad():
            peer = m(torch.from_numpy(images)).double().numpy()
        assert_parity(peer, ckpt, images, f"timm {what}")
    # The plain overlay of the file alone keeps the registered tag's config: why the recipe passes the JSON.
    plain = timm.create_model("convnextv2_atto", pretrained=True, pretrained_cfg_overlay=dict(file=str(pair)))
    assert data_config(timm, plain)["input_size"] == (3, 224, 224)


def test_timm_hub_cache_folder_is_read(tmp_path):
    timm = import_timm()
    from timm.models._hub import save_for_hf

    torch.manual_seed(1)
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=7).eval()
    save_for_hf(model, str(tmp_path / "src"), safe_serialization=True)
    root = write_hub_cache(tmp_path / "cache", "timm/convnextv2_atto.custom", {"main": tmp_path / "src"})
    assert converters.detect_format(root) == "timm"
    ckpt = converters.load(root)
    assert ckpt.source.layout["hub_cache"]["repo_id"] == "timm/convnextv2_atto.custom"
    back = tmp_path / "back.safetensors"
    converters.save(ckpt, back, format="timm")
    assert_same_tensors(safetensors.numpy.load_file(back), peer_state(model))
    with pytest.raises(BadInputError, match="revision 'v2' is neither in refs/ nor a snapshot"):
        converters.load(root, revision="v2")
