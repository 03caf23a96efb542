"""The converter: variant detection, strict key mapping, atomic output, .pth inputs parsed without unpickling."""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict

import pytest
import torch
from conftest import golden_files
from safetensors.torch import load_file, save_file

from var_hf import VARPipeline
from var_hf.convert_var_original import ConversionError, convert_to_pipeline_folder, main, var_config_from_state_dict

NAME = "var_tiny_64"
QUIET = {"log": lambda *_: None}


def teacher_logits(folder, name=NAME):
    data = load_file(str(golden_files(name)["expected"]))
    pipe = VARPipeline.from_pretrained(folder)
    with torch.no_grad():
        logits = pipe.transformer(class_labels=data["input.labels"], teacher_input=data["var.teacher_input"]).logits
    return logits, data["var.logits"]


def test_variant_detection():
    released = var_config_from_state_dict(load_file(str(golden_files(NAME)["var"])))
    assert (released.depth, released.hidden_size, released.num_attention_heads, released.num_classes) == (2, 128, 2, 10)
    assert released.attn_l2_norm and not released.shared_adaln and released.patch_nums == [1, 2, 3, 4]
    legacy_state = load_file(str(golden_files("var_tiny_64_saln_legacy")["var"]))
    legacy = var_config_from_state_dict(legacy_state, num_heads=4)
    assert legacy.shared_adaln and not legacy.attn_l2_norm and legacy.num_classes == 12 and legacy.num_attention_heads == 4
    assert var_config_from_state_dict(legacy_state).num_attention_heads == 2  # width / 64, as every release
    # without the level buffer the schedule comes from --patch-nums (or a known L)
    legacy_state.pop("lvl_1L")
    with pytest.raises(ConversionError, match="patch"):
        var_config_from_state_dict(legacy_state, num_heads=4)
    assert var_config_from_state_dict(legacy_state, num_heads=4, patch_nums=[1, 2, 3, 4]).seq_len == 30
    with pytest.raises(ConversionError, match="do not fit"):
        var_config_from_state_dict(legacy_state, num_heads=4, patch_nums=[1, 2, 5])
    with pytest.raises(ConversionError, match="divisible"):
        var_config_from_state_dict(legacy_state, num_heads=3, patch_nums=[1, 2, 3, 4])


def test_legacy_checkpoint_needs_the_head_override(tmp_path):
    files = golden_files("var_tiny_64_saln_legacy")
    convert_to_pipeline_folder(golden_files(NAME)["vae"], files["var"], tmp_path / "wrong", **QUIET)
    wrong, expected = teacher_logits(tmp_path / "wrong", "var_tiny_64_saln_legacy")
    assert (wrong - expected).abs().max() > 1e-3
    assert main(["--vae", str(golden_files(NAME)["vae"]), "--var", str(files["var"]), "--num-heads", "4", "--output", str(tmp_path / "right")]) == 0
    right, expected = teacher_logits(tmp_path / "right", "var_tiny_64_saln_legacy")
    torch.testing.assert_close(right, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.update({"blocks.0.attn.mystery": torch.zeros(3)}), "unknown upstream key"),
        (lambda s: s.pop("blocks.1.ffn.fc2.bias"), "missing keys"),
        (lambda s: s.update({"head.bias": torch.zeros(7)}), "shape"),
        (lambda s: s.update({"blocks.0.attn.zero_k_bias": torch.ones(128)}), "zero_k_bias"),
        (lambda s: s.update({"lvl_1L": torch.zeros(1, 30, dtype=torch.long)}), "lvl_1L|square"),
        (lambda s: s.pop("pos_1LC"), "pos_1LC"),
    ],
)
def test_bad_state_dicts_are_refused_and_leave_nothing(tmp_path, mutate, message):
    state = load_file(str(golden_files(NAME)["var"]))
    mutate(state)
    save_file(state, str(tmp_path / "var.safetensors"))
    with pytest.raises(ConversionError, match=message):
        convert_to_pipeline_folder(golden_files(NAME)["vae"], tmp_path / "var.safetensors", tmp_path / "out", **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["var.safetensors"]


def test_unknown_tokenizer_key_is_refused(tmp_path):
    state = load_file(str(golden_files(NAME)["vae"]))
    state["quantize.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "vae.safetensors"))
    assert main(["--vae", str(tmp_path / "vae.safetensors"), "--var", str(golden_files(NAME)["var"]), "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    args = ["--vae", str(golden_files(NAME)["vae"]), "--var", str(golden_files(NAME)["var"]), "--output", str(tmp_path / "out")]
    assert main(args) == 2 and (tmp_path / "out" / "keep.txt").exists()
    assert main(args + ["--overwrite"]) == 0 and not (tmp_path / "out" / "keep.txt").exists()


def test_written_folder_and_card(tmp_path, monkeypatch):
    import os

    opened, synced, real_open, real_fsync = {}, [], os.open, os.fsync

    def recording_open(path, flags, *args):
        descriptor = real_open(path, flags, *args)
        opened[descriptor] = path
        return descriptor

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "fsync", lambda descriptor: (synced.append(opened.get(descriptor)), real_fsync(descriptor))[1])
    folder = convert_to_pipeline_folder(golden_files(NAME)["vae"], golden_files(NAME)["var"], tmp_path / "out", **QUIET)
    staging = synced[-1]  # the folder itself is flushed last, then renamed to the output
    written = {p.relative_to(folder).as_posix() for p in folder.rglob("*")} | {"."}
    assert {__import__("pathlib").Path(s).relative_to(staging).as_posix() for s in synced} >= written
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert all(n.endswith((".json", ".safetensors", "README.md")) for n in names)
    card = (folder / "README.md").read_text()
    assert "license: mit" in card and "library_name: var-hf" in card and "pipeline_tag: unconditional-image-generation" in card
    assert "var_state.safetensors" in card and "vae_state.safetensors" in card  # provenance with sha256
    vq_config = json.loads((folder / "vqvae" / "config.json").read_text())
    assert vq_config["phi_index_per_scale"] == [0, 1, 2, 3] and vq_config["base_channels"] == 32
    transformer_keys = set(load_file(str(folder / "transformer" / "model.safetensors")))
    assert not any("attn_bias" in k or "lvl_1L" in k or "zero_k_bias" in k for k in transformer_keys)


def test_official_file_names_are_checked_by_sha256(tmp_path, capsys):
    shutil.copy(golden_files(NAME)["var"], tmp_path / "var_d16.pth")
    args = ["--vae", str(golden_files(NAME)["vae"]), "--var", str(tmp_path / "var_d16.pth"), "--output", str(tmp_path / "out")]
    assert main(args) == 2 and not (tmp_path / "out").exists()
    assert main(args + ["--allow-sha256-mismatch"]) == 0
    shutil.copy(golden_files(NAME)["var"], tmp_path / "var_d30.pth")  # a release file whose sha256 is not pinned
    capsys.readouterr()
    assert main(["--vae", str(golden_files(NAME)["vae"]), "--var", str(tmp_path / "var_d30.pth"), "--output", str(tmp_path / "d30")]) == 0
    assert "var_d30.pth: no pinned sha256" in capsys.readouterr().out


def test_release_files_are_recognised_by_content_whatever_their_name(tmp_path):
    """A renamed release file is verified by its sha256 (the card says which release it is); others are marked as not."""
    from var_hf.convert_var_original import sha256_of

    files = golden_files(NAME)
    pinned = {"var_d16.pth": sha256_of(files["var"]), "vae_ch160v4096z32.pth": "0" * 64}  # stand-ins for the release table
    logged = []
    folder = convert_to_pipeline_folder(files["vae"], files["var"], tmp_path / "out", expected_sha256=pinned, log=logged.append)
    assert f"{files['var'].name}: sha256 matches the official var_d16.pth" in logged
    card = (folder / "README.md").read_text()
    assert f"| `{files['var'].name}` | `{pinned['var_d16.pth']}` | `var_d16.pth` (sha256 matches) |" in card
    assert f"| `{files['vae'].name}` | `{sha256_of(files['vae'])}` | no (not a pinned release file) |" in card


# ------------------------------------------------------------------------------------- upstream .pth (torch.save) files
def save_upstream_pth(state, path, **kwargs):
    """Exactly how upstream wrote its checkpoints: torch.save of the state dict."""
    torch.save(OrderedDict(state), path, **kwargs)


@pytest.mark.parametrize("protocol", [2, 4])
def test_pth_files_convert_to_the_same_pipeline(tmp_path, protocol):
    for name in ("vae", "var"):
        save_upstream_pth(load_file(str(golden_files(NAME)[name])), tmp_path / f"{name}.pth", pickle_protocol=protocol)
    folder = convert_to_pipeline_folder(tmp_path / "vae.pth", tmp_path / "var.pth", tmp_path / "out", **QUIET)
    ours, expected = teacher_logits(folder)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_training_checkpoint_nesting(tmp_path):
    var_state = load_file(str(golden_files(NAME)["var"]))
    vae_state = load_file(str(golden_files(NAME)["vae"]))
    checkpoint = {"epoch": 3, "iter": 10, "trainer": {"var_wo_ddp": var_state, "vae_local": vae_state, "var_opt": {"optimizer": {"state": {}}}}}
    torch.save(checkpoint, tmp_path / "ar-ckpt-last.pth")
    folder = convert_to_pipeline_folder(tmp_path / "ar-ckpt-last.pth", tmp_path / "ar-ckpt-last.pth", tmp_path / "out", **QUIET)
    ours, expected = teacher_logits(folder)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_half_precision_sources(tmp_path):
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(golden_files(NAME)["var"])).items()}
    state["attn_bias_for_masking"] = state["attn_bias_for_masking"].float()
    save_upstream_pth(state, tmp_path / "var.pth")
    folder = convert_to_pipeline_folder(golden_files(NAME)["vae"], tmp_path / "var.pth", tmp_path / "out", **QUIET)
    saved = load_file(str(folder / "transformer" / "model.safetensors"))
    assert torch.equal(saved["lm_head.weight"], state["head.weight"].float())


def test_pickle_with_code_is_refused_without_side_effect(tmp_path):
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    torch.save({"head.weight": torch.zeros(2, 2), "evil": Payload()}, tmp_path / "var.pth")
    assert main(["--vae", str(golden_files(NAME)["vae"]), "--var", str(tmp_path / "var.pth"), "--output", str(tmp_path / "out")]) == 2
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_hostile_inputs_end_in_a_clear_error_and_leave_nothing(tmp_path, capsys):
    """A broadcast view (a few stored bytes addressing 32 GiB: refused before anything is allocated), a state dict
    missing a key the config is derived from, and a corrupt safetensors file: `error: ...` and exit code 2."""
    state = load_file(str(golden_files(NAME)["var"]))
    bomb = dict(state, **{"class_emb.weight": torch.zeros(1).expand(2**26, 128)})
    save_upstream_pth(bomb, tmp_path / "bomb.pth")
    missing = {k: v for k, v in state.items() if k != "blocks.0.ffn.fc1.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(golden_files(NAME)["var"].read_bytes() + b"trailing")
    for source, message in (("bomb.pth", "broadcast view"), ("missing.safetensors", "blocks.0.ffn.fc1.weight"), ("corrupt.safetensors", "")):
        args = ["--vae", str(golden_files(NAME)["vae"]), "--var", str(tmp_path / source), "--output", str(tmp_path / "out")]
        assert main(args) == 2, source
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), source


def test_many_weights_sharing_one_storage_are_refused(tmp_path):
    """Each view is legal alone, but 100 keys over one 1 MiB storage would build a model 100x the file."""
    from var_hf.convert_var_original import read_state_dict

    shared = torch.zeros(1 << 18)
    torch.save({f"blocks.{i}.ffn.fc1.weight": shared.view(512, 512) for i in range(100)}, tmp_path / "shared.pth")
    with pytest.raises(ConversionError, match="storages shared"):
        read_state_dict(tmp_path / "shared.pth")
    torch.save({"a": shared.view(512, 512), "b": shared[:1024]}, tmp_path / "tied.pth")  # a tied pair is fine
    assert set(read_state_dict(tmp_path / "tied.pth")) == {"a", "b"}


def test_non_finite_weights_round_trip_bit_for_bit(tmp_path):
    state = load_file(str(golden_files(NAME)["var"]))
    state["head.bias"][3] = float("nan")
    save_file(state, str(tmp_path / "var.safetensors"))
    folder = convert_to_pipeline_folder(golden_files(NAME)["vae"], tmp_path / "var.safetensors", tmp_path / "out", **QUIET)
    saved = load_file(str(folder / "transformer" / "model.safetensors"))["lm_head.bias"]
    assert saved[3].isnan() and torch.equal(saved.nan_to_num(), state["head.bias"].nan_to_num())


def test_from_hub_downloads_then_converts(fake_hub, tmp_path):
    for name, filename in (("vae", "vae_ch160v4096z32.pth"), ("var", "var_d2.pth")):
        save_upstream_pth(load_file(str(golden_files(NAME)[name])), tmp_path / filename)
    fake_hub.add_repo("FoundationVision/var", {f: (tmp_path / f).read_bytes() for f in ("vae_ch160v4096z32.pth", "var_d2.pth")})
    args = ["--from-hub", "FoundationVision/var", "--depth", "2", "--output", str(tmp_path / "out")]
    assert main(args) == 2  # the tokenizer's sha256 is not the official one
    assert main(args + ["--allow-sha256-mismatch"]) == 0
    ours, expected = teacher_logits(tmp_path / "out")
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


SHARED_GOLDEN = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "golden"


@pytest.mark.skipif(not (SHARED_GOLDEN / "var_tiny_64" / "var.pth").exists(), reason="../shared/golden is not beside this checkout")
@pytest.mark.parametrize("name, heads", [("var_tiny_64", None), ("var_tiny_64_saln_legacy", 4)])
def test_upstream_golden_pth_files_convert_and_sample_identically(tmp_path, name, heads):
    """The .pth files upstream itself wrote, parsed without unpickling, reproduce upstream's sampled tokens."""
    from conftest import golden_config

    args = ["--vae", str(SHARED_GOLDEN / "var_tiny_64" / "vae.pth"), "--var", str(SHARED_GOLDEN / name / "var.pth"), "--output", str(tmp_path / "out")]
    assert main(args + (["--num-heads", str(heads)] if heads else [])) == 0
    data = load_file(str(golden_files(name)["expected"]))
    run = golden_config(name)["sampling_runs"][0]
    pipe = VARPipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=data["input.labels"].tolist(), guidance_scale=run["cfg"], top_k=run["top_k"], top_p=run["top_p"],
               generator=torch.Generator().manual_seed(run["g_seed"]), output_type="pt")
    for k, tokens in enumerate(out.scale_indices):
        assert torch.equal(tokens, data[f"sample.{run['tag']}.idx.{k}"])
    torch.testing.assert_close(out.images, data[f"sample.{run['tag']}.image"], atol=1e-4, rtol=0)


def test_training_checkpoint_with_pickled_arguments_needs_the_ignore_flag(tmp_path, capsys):
    """Upstream's training checkpoints carry an argument object: refused by name, or skipped (never imported) on request."""
    import argparse

    var_state = load_file(str(golden_files(NAME)["var"]))
    torch.save({"trainer": {"var_wo_ddp": var_state}, "args": argparse.Namespace(depth=2, tblr=1e-4)}, tmp_path / "ar-ckpt-best.pth")
    args = ["--vae", str(golden_files(NAME)["vae"]), "--var", str(tmp_path / "ar-ckpt-best.pth"), "--output", str(tmp_path / "out")]
    assert main(args) == 2
    assert "argparse" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(args + ["--ignore-unknown-objects"]) == 0
    ours, expected = teacher_logits(tmp_path / "out")
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
