"""Stage-1 building blocks on CPU: config, schedule, data order, DiffAugment, discriminator, losses."""

import json

import pytest
import torch
import torch.nn.functional as F

from raebench.errors import MissingWeightsError, RaebenchError
from raebench.stage1.config import PRESETS, Stage1Config, parse_overrides, preset
from raebench.stage1.discriminator import build_discriminator, diff_augment, quantize_8bit, save_backbone
from raebench.stage1.losses import LastLayerTap, adaptive_gan_backward, adaptive_weight, build_lpips, hinge_d_loss
from raebench.stage1.data import StepBatches
from raebench.stage1.train import lr_lambda, plan


# -- config --------------------------------------------------------------------------------------


def test_recipe_preset_holds_the_official_constants():
    c = PRESETS["dinov2-b-decxl"]
    assert (c.epochs, c.lr, c.final_lr, c.warmup_epochs, c.betas, c.weight_decay) == (16, 2e-4, 2e-5, 1.0, (0.9, 0.95), 0.0)
    assert (c.ema_decay, c.noise_tau, c.gan_weight, c.gan_start_epoch, c.disc_start_epoch, c.lpips_start_epoch) == (
        0.9978, 0.8, 0.75, 8, 6, 0)
    assert (c.max_adaptive_weight, c.global_batch, c.encoder_input_size, c.resolution) == (1e4, 512, 224, 256)
    assert (c.decoder_hidden, c.decoder_depth, c.decoder_heads, c.decoder_mlp, c.decoder_layer_norm_eps) == (
        1152, 28, 16, 4096, 1e-12)
    assert (c.disc_backbone, c.disc_input_size, c.disc_patch, c.disc_key_blocks, c.disc_kernel_size) == (
        "vit_small_patch8_224.dino", 224, 8, (2, 5, 8, 11), 9)
    assert (c.diffaug_translation, c.diffaug_color, c.diffaug_cutout) == (0.125, True, 0.0)
    assert c.train_pos_embed  # train_stage1.py's decoder.requires_grad_(True) unfreezes the sin-cos positions


def test_a_run_from_before_train_pos_embed_resumes_with_fixed_positions_only():
    """Runs written before the setting existed kept the positions fixed: resuming one with the new
    default would change its trajectory, so it is refused; with train_pos_embed=false it resumes."""
    from raebench.stage1.config import from_dict
    from raebench.stage1.train import compare_configs

    old = preset("tiny").to_dict()
    del old["train_pos_embed"]
    assert compare_configs(old, preset("tiny")) == ["train_pos_embed: False -> True"]
    assert compare_configs(old, preset("tiny", train_pos_embed=False)) == []
    assert from_dict(old).train_pos_embed is False


def test_overrides_are_typed_and_typos_are_errors():
    o = parse_overrides(["lr=1e-4", "disc_key_blocks=2,5", "init_decoder=none", "wandb=true", "epochs=3"])
    assert o == {"lr": 1e-4, "disc_key_blocks": (2, 5), "init_decoder": None, "wandb": True, "epochs": 3}
    cfg = preset("dinov2-b-decxl", **o)
    assert isinstance(cfg, Stage1Config) and cfg.lr == 1e-4
    with pytest.raises(RaebenchError, match="Did you mean lr"):
        parse_overrides(["lrr=1"])
    with pytest.raises(RaebenchError, match="dinov2-b-decxl"):
        preset("dinov2-b-dec-xl")
    with pytest.raises(RaebenchError, match="multiple of the decoder patch"):
        preset("dinov2-b-decxl", resolution=250)


def test_plan_converts_epochs_to_steps():
    p = plan(PRESETS["dinov2-b-decxl"], 1_281_167, world=8)
    assert p["steps_per_epoch"] == 1_281_167 // 512 == 2502
    assert (p["total_steps"], p["warmup_steps"], p["disc_start_step"], p["gan_start_step"]) == (
        16 * 2502, 2502, 6 * 2502, 8 * 2502)
    assert p["micro_batch"] == 512 // 8  # no accumulation, as the official trainer (64 per GPU on 8)
    with pytest.raises(RaebenchError, match="fewer than one global batch"):
        plan(PRESETS["dinov2-b-decxl"], 100)
    with pytest.raises(RaebenchError, match="not divisible"):
        plan(PRESETS["dinov2-b-decxl"], 10_000, world=3)


def test_lr_schedule_warms_up_from_zero_then_cosine_to_final():
    f = lr_lambda(10, 100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    assert all(f(t) >= f(t + 1) for t in range(10, 120))


# -- data order ------------------------------------------------------------------------------------


def _items(n, cfg, start, stop, rank, world):
    return [mb for mb in StepBatches(n, cfg, start, stop, rank, world)]


def test_step_batches_do_not_depend_on_the_split_and_resume_mid_epoch():
    one = preset("tiny", global_batch=4, grad_accum=2)  # 1 process x 2 micro-batches
    two = preset("tiny", global_batch=4, grad_accum=1)  # 2 processes x 1 micro-batch
    a = _items(10, one, 0, 5, 0, 1)
    b0, b1 = _items(10, two, 0, 5, 0, 2), _items(10, two, 0, 5, 1, 2)
    assert [mb for pair in zip(b0, b1) for mb in pair] == a  # same samples, crops and positions
    epoch0 = sorted(i for mb in a[:4] for i, _, _ in mb)  # 2 steps = one epoch of 10 // 4
    assert len(set(epoch0)) == 8  # no image twice within an epoch
    assert _items(10, one, 3, 5, 0, 1) == a[6:]  # resuming at step 3 continues the same sequence


# -- discriminator inputs --------------------------------------------------------------------------


def test_diffaug_matches_the_official_formula():
    """Translation (zero fill) and colour with the same uniforms as StyleGAN-T/RAE's DiffAug."""
    x = torch.randn(4, 3, 16, 16)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    r = torch.stack([torch.rand(7, generator=torch.Generator().manual_seed(i)) for i in range(4)]).T.reshape(7, 4, 1, 1)
    ours = diff_augment(x, gens, 0.125, True, 0.0)
    # reference: the official index arithmetic on a 1-pixel zero pad
    d = round(16 * 0.125)
    th, tw = r[0].mul(2 * d + 1).floor().long() - d, r[1].mul(2 * d + 1).floor().long() - d
    gb, gh, gw = torch.meshgrid(torch.arange(4), torch.arange(16), torch.arange(16), indexing="ij")
    gh, gw = (gh + th).add(1).clamp(0, 17), (gw + tw).add(1).clamp(0, 17)
    y = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)[gb, gh, gw].permute(0, 3, 1, 2)
    y = y + r[2].unsqueeze(-1) - 0.5
    m = y.mean(1, keepdim=True)
    y = (y - m) * (r[3].unsqueeze(-1) * 2) + m
    m = y.mean((1, 2, 3), keepdim=True)
    y = (y - m) * (r[4].unsqueeze(-1) + 0.5) + m
    torch.testing.assert_close(ours, y, rtol=0, atol=1e-6)
    # per-sample generators: a sample's augmentation does not depend on its batch
    fresh = [torch.Generator().manual_seed(i) for i in range(4)]
    torch.testing.assert_close(diff_augment(x[2:3], fresh[2:3]), ours[2:3])


def test_quantize_8bit_levels_and_straight_through_gradient():
    x = (torch.rand(2, 3, 8, 8) * 2.4 - 1.2).requires_grad_(True)
    q = quantize_8bit(x, straight_through=True)
    levels = (q.detach() + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert q.detach().min() >= -1 and q.detach().max() <= 1
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert not quantize_8bit(x, straight_through=False).requires_grad


@pytest.fixture(scope="module")
def tiny_cfg():
    return preset("tiny")


def test_discriminator_heads_per_sample_and_only_heads_train(tiny_cfg):
    torch.manual_seed(0)
    d = build_discriminator(tiny_cfg).eval()
    n_heads = 1 + len(tiny_cfg.disc_key_blocks)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    out = d(x)
    assert out.shape == (3, n_heads * (32 // 8) ** 2)
    torch.testing.assert_close(d(x[1:2]), out[1:2], rtol=1e-5, atol=1e-5)  # no batch statistics
    assert all(not p.requires_grad for p in d.backbone.parameters())
    assert sum(p.numel() for p in d.parameters() if p.requires_grad) == sum(p.numel() for p in d.heads.parameters())
    d.train()
    assert not d.backbone.training
    assert hinge_d_loss(torch.full((2, 4), 2.0), torch.full((2, 4), -2.0)) == 0


def test_discriminator_weights_load_from_file_and_fail_offline_in_one_sentence(tiny_cfg, tmp_path, monkeypatch):
    import timm

    torch.manual_seed(1)
    vit = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=32, depth=3, num_heads=2)
    f = save_backbone(vit, tmp_path / "dino.safetensors")
    d = build_discriminator(preset("tiny", disc_weights=str(f)))
    for k, v in vit.state_dict().items():
        assert torch.equal(d.backbone.state_dict()[k], v)
    with pytest.raises(RaebenchError, match="do not fit"):
        build_discriminator(preset("tiny", disc_weights=str(f), disc_width=64))

    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(MissingWeightsError) as e:
        build_discriminator(PRESETS["dinov2-b-decxl"])
    msg = str(e.value)
    assert "timm/vit_small_patch8_224.dino" in msg and "\n" not in msg and msg.count(". ") <= 1


# -- losses ----------------------------------------------------------------------------------------


def test_lpips_equals_the_lpips_package_and_fails_offline_in_one_sentence(tmp_path, monkeypatch):
    import warnings

    import lpips

    ours = build_lpips("random")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    ref.net.load_state_dict(ours.net.state_dict())
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ours(x, y), ref(x, y), rtol=1e-6, atol=1e-7)
    # a torchvision-layout VGG16 file (features.N.*) is the user-supplied route
    f = tmp_path / "vgg16.pth"
    torch.save({f"features.{k.split('.', 1)[1]}": v for k, v in ref.net.state_dict().items()}, f)
    torch.testing.assert_close(build_lpips(str(f))(x, y), ref(x, y), rtol=1e-6, atol=1e-7)

    import huggingface_hub.constants as hc

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(MissingWeightsError) as e:
        build_lpips(None)
    assert "timm/vgg16.tv_in1k" in str(e.value) and "vgg16-397923af.pth" in str(e.value) and "\n" not in str(e.value)


def test_adaptive_weight_backward_equals_the_official_two_pass_computation():
    """lambda and every decoder gradient match autograd.grad on the last layer + one full backward."""
    from raebench.rae.decoder import DecoderConfig, RAEDecoder

    torch.manual_seed(0)
    dec = RAEDecoder(DecoderConfig(latent_dim=8, hidden_size=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4, grid_size=4))
    lp = build_lpips("random")
    critic = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GELU(), torch.nn.Conv2d(4, 1, 3))
    z, x = torch.randn(3, 8, 4, 4), torch.rand(3, 3, 16, 16)

    def losses():
        rec = dec(z)
        rec_loss = (rec - x).abs().mean() + lp(rec.clamp(-1, 1), x * 2 - 1).mean()
        return rec_loss, -critic(quantize_8bit(rec, True)).mean()

    rec_loss, gan_loss = losses()
    lam_ref = adaptive_weight(rec_loss, gan_loss, dec.decoder_pred.weight)
    (0.5 * (rec_loss + 0.75 * lam_ref * gan_loss)).backward()
    ref = {n: p.grad.clone() for n, p in dec.named_parameters() if p.requires_grad}
    dec.zero_grad(set_to_none=True)
    tap = LastLayerTap(dec.decoder_pred)
    rec_loss, gan_loss = losses()
    lam = adaptive_gan_backward(rec_loss, gan_loss, tap, 0.75, 1e4, scale=0.5)
    assert lam.item() == pytest.approx(lam_ref.item(), rel=1e-5)
    scale = max(g.abs().max().item() for g in ref.values())
    for n, p in dec.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6 * scale)
    rec_loss, gan_loss = losses()
    assert adaptive_weight(1e12 * rec_loss, gan_loss, dec.decoder_pred.weight).item() == 1e4  # clamped


def test_config_round_trips_through_json():
    from raebench.stage1.config import from_dict

    c = preset("tiny", disc_key_blocks=(0, 2))
    assert from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_cli_dry_run_prints_the_resolved_config_and_step_plan(image_folder, tmp_path):
    from typer.testing import CliRunner

    from raebench.cli import app

    res = CliRunner().invoke(app, ["train", "stage1", "--preset", "dinov2-b-decxl", "--data", str(image_folder),
                                   "--global-batch", "4", "--set", "lr=1e-4", "--results", str(tmp_path), "--dry-run"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["config"]["lr"] == 1e-4 and out["config"]["epochs"] == 16
    assert out["plan"]["steps_per_epoch"] == 2 and out["plan"]["gan_start_step"] == 16
    assert out["run_dir"] == str(tmp_path / "stage1" / "dinov2-b-decxl")
    assert not (tmp_path / "stage1").exists()
    res = CliRunner().invoke(app, ["train", "stage1", "--set", "learning_rate=1", "--dry-run"])
    assert res.exit_code != 0
    # data smaller than the recipe's global batch: the config still prints, with the reason the run would stop
    res = CliRunner().invoke(app, ["train", "stage1", "--preset", "dinov2-b-decxl", "--data", str(image_folder),
                                   "--results", str(tmp_path), "--dry-run"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["config"]["global_batch"] == 512 and "plan" not in out and "512" in out["plan_error"]


def test_run_settings_are_validated_and_init_decoder_accepts_an_exported_folder(tmp_path):
    from raebench.stage1.train import init_decoder_file

    for bad in ("ckpt_every", "log_every", "max_steps"):
        with pytest.raises(RaebenchError, match=f"{bad} must be at least 1"):
            preset("tiny", **{bad: 0})
    (tmp_path / "model.pt").write_bytes(b"")
    assert init_decoder_file(str(tmp_path)) == str(tmp_path / "model.pt")
    assert init_decoder_file(str(tmp_path / "model.pt")) == str(tmp_path / "model.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RaebenchError, match="holds no model.safetensors or model.pt"):
        init_decoder_file(str(tmp_path / "empty"))


def test_export_hint_names_the_tokenizer_of_the_encoder(tmp_path):
    from raebench.cli.stage1_cmds import _eval_hint

    for encoder, resolution, expected in [("google/siglip2-base-patch16-256", 256, "--tokenizer rae-siglip2-b"),
                                          ("facebook/dinov2-with-registers-base", 512, "--tokenizer rae-dinov2-b-512"),
                                          ("/my/encoder", 32, "no registered RAE tokenizer")]:
        (tmp_path / "stage1.json").write_text(json.dumps({"encoder": encoder, "resolution": resolution}))
        assert expected in _eval_hint(tmp_path)


def test_cuda_rng_state_is_this_ranks_gpu_only(monkeypatch):
    """Checkpoints hold this rank's GPU generator, so a run resumes on a machine with fewer GPUs; states
    saved by earlier versions (one per visible GPU) still restore (torch.cuda stubbed on the CPU)."""
    from raebench.stage1 import train as tr

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # a process that uses its GPU
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda st, device="cuda": restored.append(int(st[0])))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    st = tr.rng_state()
    assert torch.equal(st["cuda"], torch.tensor([7], dtype=torch.uint8))
    tr.set_rng_state(st)
    tr.set_rng_state({**st, "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]})  # 8 GPUs saved
    tr.set_rng_state({**st, "cuda": [torch.tensor([i], dtype=torch.uint8) for i in (5, 6)]})  # 2 saved, GPU 3 now
    assert restored == [7, 3, 5]


def test_device_cuda_pins_the_current_gpu_with_its_index(monkeypatch):
    """`train stage1 --device cuda` failed on a GPU (H100, 2026-11-26): torch.cuda.set_device refuses a
    device without an index. pin_cuda gives it the current GPU's index first; torch's own index check
    (the one set_device runs) stands in for the GPU here."""
    from torch._utils import _get_device_index

    from raebench import distributed

    pinned = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pinned.append(_get_device_index(d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    with pytest.raises(ValueError, match="specified index"):  # what the old call did with "cuda"
        torch.cuda.set_device(torch.device("cuda"))
    pinned.clear()
    assert distributed.pin_cuda(torch.device("cuda")) == torch.device("cuda", 2)
    assert distributed.pin_cuda(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert distributed.pin_cuda(torch.device("cpu")) == torch.device("cpu")
    assert pinned == [2, 1]


def test_an_explicit_gpu_under_torchrun_is_refused_in_one_sentence(monkeypatch):
    """`--device cuda:0` with several ranks and GPUs put every rank on GPU 0 (NCCL then fails deep in
    its first collective); `cuda`/`auto` mean this rank's GPU; one visible GPU per rank keeps cuda:0."""
    from raebench import distributed
    from raebench.errors import RaebenchError

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.local_device("cuda") == distributed.local_device("auto") == "cuda:2"
    assert distributed.local_device("cpu") == "cpu"
    with pytest.raises(RaebenchError, match="every rank of a node on one GPU"):
        distributed.local_device("cuda:0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one rank per node (--nnodes 4): its cuda:3 is its own
    assert distributed.local_device("cuda:3") == "cuda:3"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES per rank
    assert distributed.local_device("cuda:0") == "cuda:0"


def test_only_the_distributed_helpers_set_the_cuda_device():
    """The stage-1 start-up failure on a GPU was a direct torch.cuda.set_device("cuda") call: every
    caller goes through raebench.distributed (init, pin_cuda), which indexes the device first."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    callers = sorted(str(f.relative_to(root)) for d in ("raebench", "metrics", "baselines")
                     for f in (root / d).rglob("*.py") if "torch.cuda.set_device(" in f.read_text())
    assert callers == ["raebench/distributed.py"], callers


def test_export_decoder_of_a_stage2_run_says_so(tmp_path):
    """`export-decoder` on a `train stage2` run used to say its 'ema' entry "is not a decoder state dict";
    it now names the stage-2 model and what the command exports."""
    from raebench.errors import CheckpointError
    from raebench.stage1.export import export_decoder
    from raebench.stage2.train import preset

    import dataclasses

    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    torch.save({"ema": {"pos_embed": torch.zeros(1, 4, 8)}, "model": {}, "config": dataclasses.asdict(preset("tiny"))},
               run / "last.pt")
    with pytest.raises(CheckpointError, match=r"is a stage-2 \(ditdh-tiny\) checkpoint; export-decoder exports the "
                                              r"decoder of a `raebench train stage1` run"):
        export_decoder(tmp_path / "run", tmp_path / "out")


def test_rng_state_leaves_cuda_alone_in_a_process_that_does_not_use_it(monkeypatch):
    """`--device cpu` on a GPU node: saving the random state must not open a CUDA context on GPU 0 in
    every rank (torch.cuda.get_rng_state initialises CUDA); a process that uses its GPU saves it."""
    from raebench.stage1.train import rng_state, set_rng_state

    def no_cuda(*a, **k):
        raise AssertionError("CUDA was touched")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state", no_cuda)
    monkeypatch.setattr(torch.cuda, "set_rng_state", no_cuda)
    st = rng_state()
    assert "cuda" not in st
    set_rng_state({**st, "cuda": torch.zeros(16, dtype=torch.uint8)})  # a GPU run's checkpoint resumed on the CPU
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.ones(3, dtype=torch.uint8))
    assert rng_state()["cuda"].tolist() == [1, 1, 1]


def test_random_backbone_warnings_are_said_by_rank_0_alone(monkeypatch, caplog):
    """Under torchrun every rank builds the discriminator and LPIPS alike; the test-only warning about
    their random weights was printed by each rank."""
    import logging

    from raebench import distributed
    from raebench.stage1.config import preset
    from raebench.stage1.discriminator import build_discriminator
    from raebench.stage1.losses import build_lpips
    from raebench.stage2.train import check_labels

    def warned(rank: int) -> list[str]:
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            build_discriminator(preset("tiny"))
            build_lpips("random")
            check_labels(torch.tensor([0, 1, 0]), 4, "the cache")  # 2 of 4 classes: a note
        return [r.getMessage() for r in caplog.records]

    said = warned(0)
    assert len(said) == 3 and "random weights" in said[0] and "examples of 2 of the model's 4" in said[2], said
    assert warned(1) == []
