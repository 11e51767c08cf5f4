"""Image tokenizer: Lightning-2 VQGAN training and finetuning, frame sources, pre-tokenized shards, clear errors."""

import io
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml

from gr.config import ConfigError, ImageTokenizerConfig
from gr.data.frames import FrameDataModule, FrameStream
from gr.data.shards import expand_urls
from gr.data.video_io import encode_mp4
from gr.encoders import FrozenVQGAN, load_taming_vqgan, save_taming_vqgan
from gr.encoders.vqgan import VQGAN, ddconfig_from
from gr.training.tokenizer import TokenizerModule, frames_to_input
from tests.conftest import TINY_TOKENIZER

TOKENIZER_ARGS = {"tokenizer": TINY_TOKENIZER, "image_size": 32,
                  "loss": {"disc_start": 2, "disc_num_layers": 2, "disc_ndf": 16},
                  "codebook": {"log_every_n_steps": 2, "restart_every_n_steps": 2},
                  "optim": {"lr": 1e-3, "betas": [0.5, 0.9], "weight_decay": 0.0, "warmup_steps": 0}}


def tokenizer_config(path, sources: dict, root: str, max_steps: int = 4, model_args: dict | None = None) -> str:
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "default_root_dir": root,
                    "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "val_check_interval": max_steps, "check_val_every_n_epoch": None, "limit_val_batches": 1,
                    "num_sanity_val_steps": 0,
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": os.path.join(root, "checkpoints"), "every_n_train_steps": 2,
                                       "save_top_k": -1, "save_last": True}},
                        {"class_path": "gr.training.tokenizer.ExportTamingVQGAN",
                         "init_args": {"dirpath": os.path.join(root, "export")}}]},
        "model": {"class_path": "gr.training.tokenizer.TokenizerModule", "init_args": model_args or TOKENIZER_ARGS},
        "data": {"class_path": "gr.data.frames.FrameDataModule",
                 "init_args": {"train_sources": [{"shards": sources["train_shards"]}],
                               "val_sources": [{"shards": sources["val_shards"]}],
                               "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8, "num_val_frames": 4}},
    }
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def write_robot_shard(path, num_episodes: int = 2, size: int = 32, num_frames: int = 6, views=("head", "wrist")):
    """Robot episode samples: one mp4 per view, state.npy, action.npy and json (the DESIGN.md episode layout)."""
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as w:
        for e in range(num_episodes):
            sample = {"__key__": f"ep{e:04d}"}
            for v, view in enumerate(views):
                frames = np.full((num_frames, size, size, 3), 40 + 80 * v, np.uint8)
                frames[:, : size // 2] = rng.integers(0, 255, 3, dtype=np.uint8)
                sample[f"{view}.mp4"] = encode_mp4(frames, 10.0)
            for name, dim in (("state", 4), ("action", 4)):
                buf = io.BytesIO()
                np.save(buf, rng.normal(size=(num_frames, dim)).astype(np.float32))
                sample[f"{name}.npy"] = buf.getvalue()
            sample["json"] = json.dumps({"instruction": "push the block", "fps": 10.0, "views": list(views)}).encode()
            w.write(sample)
    return str(path)


@pytest.fixture(scope="module")
def trained(synthetic_shards, tmp_path_factory):
    """A 4-step tokenizer run through `gr tokenizer fit` (GAN on from step 2); returns (root, config path)."""
    from gr.cli import main

    root = tmp_path_factory.mktemp("tok")
    cfg = tokenizer_config(root / "tok.yaml", synthetic_shards, str(root / "run"))
    main(["tokenizer", "fit", "--config", cfg])
    return root / "run", cfg


def test_fit_exports_a_taming_checkpoint_the_frozen_encoder_loads(trained, synthetic_shards):
    run, _ = trained
    ckpt, yml = str(run / "export" / "vqgan.ckpt"), str(run / "export" / "vqgan.yaml")
    doc = yaml.safe_load(open(yml))
    assert doc["model"]["target"] == "taming.models.vqgan.VQModel"
    assert doc["model"]["params"]["lossconfig"]["target"].endswith("VQLPIPSWithDiscriminator")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any(k.startswith("loss.discriminator.") for k in state)
    # Exactly the keys of taming's VQModel minus `loss.*`: load_taming_vqgan is strict about missing/extra keys.
    vq = load_taming_vqgan(ckpt, yml)
    assert set(vq.state_dict()) == {k for k in state if not k.startswith("loss.")}
    frozen = FrozenVQGAN(ImageTokenizerConfig(**{**TINY_TOKENIZER, "checkpoint": ckpt, "yaml": yml}))
    module = TokenizerModule(**TOKENIZER_ARGS).eval()
    module.load_state_dict(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    val = [(expand_urls(synthetic_shards["val_shards"], "val"), 1.0, None, "val")]
    frames = torch.stack([f["frame"] for f in FrameStream(val, 32, endless=False, shuffle_buffer=1, max_frames=6)])
    with torch.no_grad():
        rec, _, _, codes, _ = module.vqgan(frames_to_input(frames))
    assert torch.equal(frozen.encode(frames), codes)
    decoded = frozen.vq.decode_codes(frozen.encode(frames))
    torch.testing.assert_close(decoded, rec, atol=1e-5, rtol=1e-5)  # the frozen decoder reproduces the trainer


def test_fit_logs_codebook_usage_and_trains_the_gan_after_disc_start(trained):
    run, _ = trained
    ckpts = {p.name: torch.load(p, weights_only=True) for p in (run / "checkpoints").glob("*.ckpt")}
    at2 = next(c for n, c in ckpts.items() if "step=2" in n)
    at4 = next(c for n, c in ckpts.items() if "step=4" in n)
    init = TokenizerModule(**TOKENIZER_ARGS).state_dict()
    disc = [k for k in init if k.startswith("discriminator.") and k.endswith("weight")]
    # disc_start=2: steps 0 and 1 leave the discriminator untouched, steps 2 and 3 train it.
    assert all(torch.equal(at2["state_dict"][k], init[k]) for k in disc)
    assert any(not torch.equal(at4["state_dict"][k], at2["state_dict"][k]) for k in disc)
    assert not torch.equal(at2["state_dict"]["vqgan.decoder.conv_out.weight"], init["vqgan.decoder.conv_out.weight"])
    assert at4["global_step"] == 4  # one optimizer step per batch: max_steps counts batches
    assert "usage_since_restart" in at4["state_dict"]


def test_codebook_metrics_and_dead_code_restart():
    module = TokenizerModule(**TOKENIZER_ARGS)
    weight = module.vqgan.quantize.embedding.weight
    before = weight.detach().clone()
    module.usage_since_restart[:] = 1.0
    module.usage_since_restart[[3, 7, 11]] = 0.0  # three dead codes
    z = torch.randn(2, 32, 4, 4) * 5
    assert module.restart_dead_codes(z) == 3
    changed = (weight.detach() != before).any(1).nonzero().flatten().tolist()
    assert changed == [3, 7, 11]
    flat = z.permute(0, 2, 3, 1).reshape(-1, 32)
    dist = torch.cdist(weight.detach()[[3, 7, 11]], flat).min(1).values
    assert (dist < 0.1 * flat.norm(dim=1).mean()).all()  # restarted codes sit on encoder outputs
    module.usage_since_restart[:] = 1.0
    assert module.restart_dead_codes(z) == 0


def _lpips_files(tmp_path, full: bool):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"])
    vgg = {f"features.{k}": v for k, v in features.state_dict().items()}  # torchvision's vgg16-*.pth layout
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lins, tmp_path / "vgg.pth")  # taming's vgg_lpips file: the linear layers only
    return str(tmp_path / "vgg.pth"), str(tmp_path / "vgg16.pth"), vgg, lins


def test_perceptual_loss_from_local_files_only(tmp_path):
    from gr.training.perceptual import LocalLPIPS

    lpips_path, vgg_path, vgg, lins = _lpips_files(tmp_path, full=False)
    with pytest.raises(ValueError, match="vgg16_weights"):
        LocalLPIPS(lpips_path)
    lp = LocalLPIPS(lpips_path, vgg_path)
    assert torch.equal(lp.net.slice3.state_dict()["10.weight"], vgg["features.10.weight"])
    assert torch.equal(lp.lin2.model[1].weight, lins["lin2.model.1.weight"])
    assert not lp.training and not any(p.requires_grad for p in lp.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lp(x, x).abs().max() < 1e-6 and (lp(x, x.flip(-1)) > 0).all()
    module = TokenizerModule(**{**TOKENIZER_ARGS, "loss": {"lpips_weights": lpips_path, "vgg16_weights": vgg_path}})
    assert module.perceptual is not None and not any(k.startswith("perceptual.") for k in module.state_dict())
    with pytest.raises(ConfigError, match="loss.lpips_weights: file not found"):
        TokenizerModule(**{**TOKENIZER_ARGS, "loss": {"lpips_weights": str(tmp_path / "missing.pth")}})


def test_finetune_starts_from_a_taming_checkpoint(trained, tmp_path):
    run, _ = trained
    ckpt = str(run / "export" / "vqgan.ckpt")
    base = torch.load(ckpt, weights_only=True)["state_dict"]
    module = TokenizerModule(**{**TOKENIZER_ARGS, "tokenizer": {"checkpoint": ckpt, "codebook_size": 64}})
    sd = module.state_dict()
    assert all(torch.equal(sd[f"vqgan.{k}"], v) for k, v in base.items() if not k.startswith("loss."))
    assert all(torch.equal(sd[k[len("loss."):]], v) for k, v in base.items() if k.startswith("loss."))
    with pytest.raises(ConfigError, match=r"tokenizer.codebook_size: config says 128 .* has 64 codes"):
        TokenizerModule(**{**TOKENIZER_ARGS, "tokenizer": {"checkpoint": ckpt, "codebook_size": 128}})


def test_frames_from_video_and_robot_shards_mixed(synthetic_shards, tmp_path):
    robot = write_robot_shard(tmp_path / "robot-000000.tar")
    video = synthetic_shards["train_shards"].replace("{000000..000005}", "000000")
    sources = [([video], 1.0, None, "video"), ([robot], 1.0, None, "robot")]
    frames = list(FrameStream(sources, 32, 8, frames_per_video=2, endless=False, shuffle_buffer=4))
    keys = [f["key"] for f in frames]
    assert all(f["frame"].shape == (32, 32, 3) and f["frame"].dtype == torch.uint8 for f in frames)
    assert sum("robot" in k for k in keys) == 2 * 2 * 2  # 2 episodes x 2 views x 2 frames
    assert any(".head.mp4#" in k for k in keys) and any(".wrist.mp4#" in k for k in keys)
    assert sum("robot" not in k for k in keys) == 8 * 2  # 8 clips x 2 frames
    wrist_only = list(FrameStream([([robot], 1.0, ["wrist"], "robot")], 32, frames_per_video=1, endless=False))
    assert len(wrist_only) == 2 and all(".wrist.mp4#" in f["key"] for f in wrist_only)
    endless = iter(FrameStream(sources, 32, frames_per_video=2, endless=True, shuffle_buffer=4))
    assert len([next(endless) for _ in range(3 * len(frames))]) == 3 * len(frames)  # sources restart


def test_empty_source_and_too_small_frames_are_clear_errors(synthetic_shards, tmp_path):
    from types import SimpleNamespace

    with wds.TarWriter(str(tmp_path / "empty.tar")) as w:
        w.write({"__key__": "a", "json": b"{}"})  # a sample, but no video in it
    module = TokenizerModule(**TOKENIZER_ARGS)
    dm = FrameDataModule(train_sources=[{"shards": str(tmp_path / "empty.tar")}])
    dm.trainer = SimpleNamespace(lightning_module=module)
    with pytest.raises(ValueError, match=r"data.train_sources\[0\]: no decodable frames.*no mp4 member"):
        dm.setup("fit")
    with wds.TarWriter(str(tmp_path / "tiny.tar")) as w:
        w.write({"__key__": "a", "mp4": encode_mp4(np.zeros((4, 6, 6, 3), np.uint8), 8.0), "json": b"{}"})
    dm = FrameDataModule(train_sources=[{"shards": str(tmp_path / "tiny.tar")}])
    dm.trainer = SimpleNamespace(lightning_module=module)
    with pytest.raises(ValueError, match="6x6 px frames are smaller than the tokenizer's downsampling factor 8"):
        dm.setup("fit")
    with pytest.raises(ConfigError, match="image_size: 36x36 px frames .* multiple of 8"):
        TokenizerModule(**{**TOKENIZER_ARGS, "image_size": 36})
    with pytest.raises(ConfigError, match="data.train_sources: at least one"):
        FrameDataModule(train_sources=[])


def test_tokenizer_run_resumes_from_its_checkpoint(trained, synthetic_shards, tmp_path):
    from gr.cli import main

    run, _ = trained
    cfg = tokenizer_config(tmp_path / "resume.yaml", synthetic_shards, str(tmp_path / "resumed"), max_steps=6)
    main(["tokenizer", "fit", "--config", cfg, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    export = tmp_path / "resumed" / "export"
    assert torch.load(export / "vqgan.ckpt", weights_only=True)["global_step"] == 6
    assert not (tmp_path / "resumed" / "checkpoints" / "epoch=0-step=2.ckpt").exists()  # continued at step 4
    assert isinstance(load_taming_vqgan(str(export / "vqgan.ckpt"), str(export / "vqgan.yaml")), VQGAN)
