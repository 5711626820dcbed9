"""RAETokenizer: noise augmentation, the registry entries, offline behaviour, the CLI commands."""

import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers as T
from typer.testing import CliRunner

from conftest import ORACLE
from raebench.checkpoint import load_state
from raebench.errors import CheckpointError, MissingWeightsError
from raebench.rae.tokenizer import add_noise
from test_rae_oracle import needs_oracle, official_yaml

RELEASED = ("rae-dinov2-b", "rae-dinov2-b-512", "rae-dinov2-s", "rae-dinov2-l", "rae-siglip2-b", "rae-mae-b")


@pytest.fixture(scope="module")
def oracle_tok(tmp_path_factory):
    if not (ORACLE / "meta.json").exists():
        pytest.skip("oracle fixtures not present")
    from raebench.official import from_official_config

    d = tmp_path_factory.mktemp("oracle_yaml")
    official_yaml(d / "rae.yaml", ORACLE, noise_tau=0.8)
    return from_official_config(d / "rae.yaml").tokenizer, d / "rae.yaml"


# --- noise augmentation ---------------------------------------------------------------------


def test_noise_rules():
    z = torch.zeros(2000, 4, 2, 2)
    g = torch.Generator().manual_seed(0)
    n = add_noise(z, 0.8, "uniform", g)
    sigma = n.flatten(1).std(1)  # per-sample sigma estimates, sigma ~ 0.8 * U[0, 1)
    assert sigma.max() < 0.8 * 1.6 and abs(sigma.mean() - 0.4) < 0.05
    h = add_noise(z, 0.8, "half-normal", g).flatten(1).std(1)  # E|N(0, 0.64)| = 0.8 * sqrt(2 / pi)
    assert abs(h.mean() - 0.8 * (2 / np.pi) ** 0.5) < 0.06
    assert torch.equal(add_noise(z, 0.0), z)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(add_noise(z[:3], 0.5, generator=g1), add_noise(z[:3], 0.5, generator=g2))


def test_noise_only_when_asked(oracle_tok):
    tok, _ = oracle_tok
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        clean = tok.encode(x)
        assert torch.equal(tok.encode(x), clean)  # eval mode: the YAML's noise_tau 0.8 is not applied
        tok.train()
        try:
            assert not tok.encoder.backbone.training
            noisy_train = tok.encode(x)
            assert not torch.equal(noisy_train, clean)
            assert torch.equal(tok.encode(x, noise_tau=0.0), clean)
        finally:
            tok.eval()
        noisy = tok.encode(x, noise_tau=0.5, noise_rule="half-normal")
    # the noise is added before the statistics: undo them and compare with the raw features
    raw = tok.encode_features(x)
    assert (tok.denormalize(noisy) - raw).abs().max() > 0
    assert (tok.denormalize(clean) - raw).abs().max() < 1e-4


def test_decoder_trains_through_decode(oracle_tok):
    tok, _ = oracle_tok
    x = torch.rand(2, 3, 64, 64)
    z = tok.encode(x, noise_tau=0.8)
    assert not z.requires_grad  # the encoder is frozen
    loss = (tok.decode(z) - x).abs().mean()
    loss.backward()
    assert tok.decoder.decoder_embed.weight.grad is not None
    tok.decoder.zero_grad(set_to_none=True)


# --- registry -------------------------------------------------------------------------------


def test_registry_entries_are_metadata_only():
    code = (
        "import sys, raebench.tokenizers as t; "
        "print(sorted(n for n in t.TOKENIZERS.names() if n.startswith('rae')), 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in RELEASED:
        assert name in out
    assert out.strip().endswith("False")  # registering loaded no model library


@pytest.mark.parametrize("name", RELEASED)
def test_registry_metadata(name):
    from raebench.tokenizers import get_tokenizer_spec

    spec = get_tokenizer_spec(name)
    res = spec.native_resolutions[0]
    assert spec.family == "rae" and spec.latent_shape(res)[1:] == (res // 16, res // 16)
    repos = {w.repo_id for w in spec.weights}
    assert "nyu-visionx/RAE-collections" in repos and len(spec.weights) == 3
    assert 4e8 < spec.params < 8e8


def test_alias():
    from raebench.tokenizers import get_tokenizer_spec

    assert get_tokenizer_spec("rae-dinov2").name == "rae-dinov2-b"


def test_offline_without_cache_is_one_sentence(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    from raebench.tokenizers import build_tokenizer

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as e:
        build_tokenizer("rae-dinov2")
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(".")
    assert "facebook/dinov2-with-registers-base" in msg and "decoders/dinov2/wReg_base/ViTXL_n08/model.pt" in msg


def test_missing_file_messages_point_at_the_users_mistake(tmp_path, monkeypatch):
    """A wrong explicit path is named even when other files are missing too; a --weights folder without
    the expected layout says what belongs in it; a folder where a file belongs says so."""
    import huggingface_hub.constants as hc

    from raebench.tokenizers import build_tokenizer

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="nonexist.pt' given with --decoder does not exist"):
        build_tokenizer("rae-dinov2", decoder=str(tmp_path / "nonexist.pt"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "model.pt").write_bytes(b"")
    for weights, needle in [(tmp_path / "flat", "lacks them (it should hold facebook/dinov2-with-registers-base/"),
                            (tmp_path / "flat" / "model.pt", "model.pt' is a file; it should be a folder holding")]:
        with pytest.raises(MissingWeightsError, match=re.escape(needle)) as e:
            build_tokenizer("rae-dinov2", weights=str(weights))
        msg = str(e.value)
        assert "decoders/dinov2/wReg_base/ViTXL_n08/model.pt" in msg and "stats/dinov2/wReg_base/imagenet1k/stat.pt" in msg
        assert "--encoder" not in msg  # eval/compare/analyze have no such flag
    with pytest.raises(CheckpointError, match="is a folder; a checkpoint file is needed here"):
        load_state(tmp_path / "flat")
    # README: --weights also takes the release in diffusers' format; a folder that is not there says so too
    with pytest.raises(MissingWeightsError, match="does not exist") as e:
        build_tokenizer("rae-dinov2", weights=str(tmp_path / "rae-b-diffusers"))
    assert "diffusers' format (a download of nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08" in str(e.value)


def test_missing_weights_name_the_options_of_the_running_command(tmp_path, monkeypatch, capsys):
    """The hint after a missing file is spelled as the command takes local weights: eval `--decoder`,
    analyze `--decoder NAME=PATH`, compare (no --decoder) its `--weights NAME=DIR`; never an option the
    command lacks."""
    import huggingface_hub.constants as hc
    from _cli import run as run_main

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def text(p, data="{}"):
        p.write_text(data)

    # encoder and statistics in the cache, the decoder missing: a one-file sentence naming the decoder's flag
    _fake_hub_file(tmp_path / "hub", "facebook/dinov2-with-registers-base",
                   {"config.json": text, "model.safetensors": text, "preprocessor_config.json": text})
    _fake_hub_file(tmp_path / "hub", "nyu-visionx/RAE-collections", {"stats/dinov2/wReg_base/imagenet1k/stat.pt": text})
    res = str(tmp_path / "res")
    for argv, hint in [
        (["eval", "-t", "rae-dinov2-b", "--results", res], "or pass a local copy with --decoder."),
        (["analyze", "-t", "rae-dinov2-b", "--reference", "none", "--results", res],
         "or pass a local copy with --decoder rae-dinov2-b=PATH."),
        (["compare", "-t", "rae-dinov2-b", "-t", "pixels", "--results", res],
         "`raebench compare` has no --decoder option: put the file in that cache, or give rae-dinov2-b's files "
         "with --weights rae-dinov2-b=DIR"),
    ]:
        code, _, err = run_main(argv + ["--device", "cpu"], capsys)
        msg = " ".join(err.split())
        assert code == 2 and "Traceback" not in err and "decoders/dinov2/wReg_base/ViTXL_n08/model.pt" in msg, err
        assert hint in msg, (argv[0], msg)
    # nothing cached: compare's --weights takes NAME=DIR
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    code, _, err = run_main(["compare", "-t", "rae-dinov2", "-t", "pixels", "--results", res, "--device", "cpu"], capsys)
    assert code == 2 and "or pass a local copy with --weights rae-dinov2-b=DIR holding facebook/" in " ".join(err.split())


def test_cli_eval_offline_fails_in_one_sentence(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "COLUMNS": "80"}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run(
        [sys.executable, "-m", "raebench", "eval", "--tokenizer", "rae-dinov2", "--results", str(tmp_path / "res")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]  # (a progress bar may precede it)
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert "nyu-visionx/RAE-collections" in errors[0] and errors[0].endswith(".")


def _fake_hub_file(cache, repo, files: dict) -> None:
    """Files placed as huggingface_hub stores them: models--owner--name/snapshots/<commit>/..."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs/main").write_text(commit)
    for rel, write in files.items():
        p = root / "snapshots" / commit / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        write(p)


def _fake_rae_hub(tmp_path, monkeypatch):
    """rae-dinov2-b's encoder, decoder and statistics in an offline Hub cache (tiny random weights under
    the real repo names and file paths; the decoder preset is shrunk to match): (release, cache)."""
    import huggingface_hub.constants as hc

    from raebench.rae import decoder as dec
    from raebench.rae.decoder import RAEDecoder, preset_config
    from raebench.tokenizers import rae

    r = rae.RELEASES["rae-dinov2-b"]
    cache = tmp_path / "hub"
    torch.manual_seed(0)
    enc = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=224,
        patch_size=14, num_register_tokens=4,
    ))

    def save_encoder(p):
        enc.save_pretrained(p.parent)
        p.write_text(json.dumps({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))

    _fake_hub_file(cache, r.encoder_repo, {"preprocessor_config.json": save_encoder})
    monkeypatch.setitem(dec.DECODER_PRESETS, "TINY", dict(hidden_size=32, depth=1, num_heads=2, mlp_dim=64))
    monkeypatch.setitem(rae.RELEASES, "rae-dinov2-b", replace(r, decoder_preset="TINY"))
    decoder = RAEDecoder(preset_config("TINY", latent_dim=32, grid_size=16))
    _fake_hub_file(cache, rae.RAE_REPO, {
        r.decoder_file: lambda p: torch.save(decoder.state_dict(), p),
        r.stats_file: lambda p: torch.save({"mean": torch.zeros(32, 16, 16), "var": torch.ones(32, 16, 16)}, p),
    })
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return r, cache


def test_eval_end_to_end_from_an_offline_cache(tmp_path, monkeypatch):
    """`raebench eval --tokenizer rae-dinov2` with HF_HUB_OFFLINE=1 and the repos in the cache (tiny
    random weights under the real repo names and file paths; the decoder preset is shrunk to match)."""
    from raebench.cli import main
    from raebench.tokenizers import rae

    r, cache = _fake_rae_hub(tmp_path, monkeypatch)
    main(["eval", "--tokenizer", "rae-dinov2", "--limit", "2", "--device", "cpu", "--results", str(tmp_path / "res")])
    rows = [json.loads(line) for f in (tmp_path / "res").rglob("*.jsonl") for line in f.read_text().splitlines()]
    assert {row["metric"] for row in rows} >= {"psnr", "ssim"}
    assert all(row["tokenizer"] == "rae-dinov2-b" and row["n_images"] == 2 for row in rows)
    # the released decoder by its repo path, then the content of decoder, encoder and statistics (as a
    # --weights copy of the same files has it: the same weights, see raebench.weights.same_weights)
    from raebench.weights import same_weights

    wid = rows[0]["weights_id"]
    assert re.fullmatch(re.escape(f"{rae.RAE_REPO}:{r.decoder_file}") + r"@[0-9a-f]{12}\+enc:[0-9a-f]{12}\+stats:[0-9a-f]{12}",
                        wid), wid
    assert same_weights(f"{rae.RAE_REPO}:{r.decoder_file}", wid)  # rows stored before: the released weights
    import shutil  # a --weights copy of the same files (the layout of the Hub repos) is the same weights

    snap = lambda repo: cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)  # noqa: E731
    shutil.copytree(snap(r.encoder_repo), tmp_path / "w" / r.encoder_repo)
    shutil.copytree(snap(rae.RAE_REPO), tmp_path / "w", dirs_exist_ok=True)
    (tmp_path / "w" / r.encoder_repo / "README.md").write_text("notes")  # not loaded: not in the identity
    local = rae.build_rae(rae.RELEASES["rae-dinov2-b"], weights=tmp_path / "w").weights_id
    assert local.startswith("local:") and local != wid and same_weights(local, wid)


def test_the_released_decoder_with_other_statistics_or_encoder_is_not_the_released_weights(tmp_path, monkeypatch):
    """Rows recorded before identities carried content name the released RAE by its Hub label alone,
    which then meant the released encoder and statistics too: a Hub decoder with a --stats or --encoder
    of other content is neither those rows' weights nor released weights (no card numbers beside it)."""
    from raebench.tokenizers import rae
    from raebench.weights import released_label, same_weights

    r, cache = _fake_rae_hub(tmp_path, monkeypatch)
    released = rae.build_rae(rae.RELEASES["rae-dinov2-b"]).weights_id
    assert same_weights(f"{rae.RAE_REPO}:{r.decoder_file}", released)
    torch.save({"mean": torch.ones(32, 16, 16), "var": torch.ones(32, 16, 16)}, tmp_path / "other.pt")
    own_stats = rae.build_rae(rae.RELEASES["rae-dinov2-b"], stats=tmp_path / "other.pt").weights_id
    assert own_stats.startswith("local:") and released_label(own_stats) is None
    assert not same_weights(f"{rae.RAE_REPO}:{r.decoder_file}", own_stats) and not same_weights(released, own_stats)
    enc_dir = next((cache / f"models--{r.encoder_repo.replace('/', '--')}" / "snapshots").iterdir())
    copy = rae.build_rae(rae.RELEASES["rae-dinov2-b"], encoder=enc_dir,  # the released encoder's files, given
                         stats=cache / f"models--{rae.RAE_REPO.replace('/', '--')}" / "snapshots" / ("0" * 40) / r.stats_file)
    assert copy.weights_id.startswith("local:") and same_weights(copy.weights_id, released)  # by content


# --- commands -------------------------------------------------------------------------------


@pytest.fixture
def rae_app():
    import typer

    from raebench.cli import rae_cmds

    app = typer.Typer()
    rae_cmds.register(app)

    @app.command("noop")  # a second command keeps typer from collapsing the app into one command
    def _noop() -> None:
        pass

    return app


@needs_oracle
def test_stats_command_is_exact(rae_app, oracle_tok, image_folder, tmp_path):
    from raebench.data import resolve_data
    from raebench.images import to_float
    from raebench.loaders import ImageDataset

    tok, yaml_path = oracle_tok
    out = tmp_path / "stat.pt"
    res = CliRunner().invoke(rae_app, ["stats", "--tokenizer-config", str(yaml_path), "--data", str(image_folder),
                                       "--resolution", "64", "--batch-size", "3", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    got = torch.load(out, weights_only=True)
    ds = ImageDataset(resolve_data(str(image_folder)).images, 64)
    x = to_float(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    with torch.no_grad():
        f = tok.encode_features(x).double()
    assert torch.allclose(got["mean"].double(), f.mean(0), atol=1e-6)
    assert torch.allclose(got["var"].double(), f.var(0, unbiased=False), atol=1e-6)


@needs_oracle
def test_reconstruct_command(rae_app, oracle_tok, image_folder, tmp_path):
    from raebench.data import resolve_data
    from raebench.images import to_float, to_uint8
    from raebench.loaders import ImageDataset

    tok, yaml_path = oracle_tok
    out = tmp_path / "rec"
    res = CliRunner().invoke(rae_app, ["reconstruct", "--tokenizer-config", str(yaml_path), "--data", str(image_folder),
                                       "--resolution", "64", "--out", str(out), "--references", "--device", "cpu",
                                       "--batch-size", "3"])
    assert res.exit_code == 0, res.output
    arr = np.load(out / "reconstructions.npz")["arr_0"]
    assert arr.shape == (8, 64, 64, 3) and arr.dtype == np.uint8
    assert len(list((out / "images").glob("*.png"))) == 8
    ds = ImageDataset(resolve_data(str(image_folder)).images, 64)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.no_grad():  # in the command's batches of 3: the same float results, so exactly the same bytes
        ref = torch.cat([to_uint8(tok.reconstruct(to_float(x[i:i + 3]))) for i in range(0, 8, 3)]).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(arr, ref)  # rounded (x * 255 + 0.5 floored), not truncated
    assert np.array_equal(np.load(out / "references.npz")["arr_0"], x.permute(0, 2, 3, 1).numpy())
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out / "images/000003.png")), arr[3])
    assert (out / "files.csv").read_text().splitlines()[0] == "index,source,row"
    assert not list(out.glob(".part-*"))


def test_training_noise_is_added_to_the_raw_features_before_the_statistics(oracle_tok):
    """The official ``RAE.encode``: z + sigma * eps on the encoder's features, then (z - mean) /
    sqrt(var + 1e-5) with the stat.pt of the oracle. Noise added after the normalisation would be
    sqrt(var) times smaller or larger per element, a different augmentation."""
    tok, _ = oracle_tok
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    stat = torch.load(ORACLE / "stat.pt", weights_only=True)
    with torch.no_grad():
        got = tok.encode(x, noise_tau=0.8, noise_rule="uniform", generator=torch.Generator().manual_seed(7))
        raw = tok.encode_features(x)
    g = torch.Generator().manual_seed(7)  # the draws in add_noise's order: one sigma per sample, then eps
    sigma = 0.8 * torch.rand(3, 1, 1, 1, generator=g)
    eps = torch.randn(raw.shape, generator=g)
    expected = (raw + sigma * eps - stat["mean"]) / torch.sqrt(stat["var"] + 1e-5)
    assert (stat["var"].sqrt() - 1).abs().max() > 0.1  # so the order of noise and statistics matters here
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
