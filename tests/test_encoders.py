"""Frozen encoders: real checkpoint formats written with random weights, exact round trips, clear errors."""

import pytest
import torch

from gr.config import ImageTokenizerConfig, TextEncoderConfig
from gr.encoders import FrozenTextEncoder, FrozenVQGAN, load_taming_vqgan, save_taming_vqgan
from gr.encoders.vqgan import VQGAN, ddconfig_from
from tests.conftest import TINY_TOKENIZER


@pytest.fixture()
def taming_ckpt(tmp_path):
    torch.manual_seed(1)
    model = VQGAN(ddconfig_from(ImageTokenizerConfig(**TINY_TOKENIZER)), 64, 32)
    ckpt, yml = str(tmp_path / "vq.ckpt"), str(tmp_path / "vq.yaml")
    save_taming_vqgan(model, ckpt, yml)
    return model, ckpt, yml


def test_vqgan_taming_roundtrip_exact(taming_ckpt, tmp_path):
    model, ckpt, yml = taming_ckpt
    # A public taming .ckpt also carries discriminator / LPIPS weights under "loss."; they must be ignored.
    payload = torch.load(ckpt, weights_only=True)
    payload["state_dict"]["loss.discriminator.main.0.weight"] = torch.zeros(3)
    torch.save(payload, ckpt)
    loaded = load_taming_vqgan(ckpt, yml)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    frozen = FrozenVQGAN(ImageTokenizerConfig(**{**TINY_TOKENIZER, "checkpoint": ckpt, "yaml": yml}))
    frames = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)
    codes = frozen.encode(frames)
    assert codes.shape == (2, 3, 4, 4) and codes.max() < 64
    ref = model.eval().encode_to_codes(frames.reshape(-1, 32, 32, 3).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert torch.equal(codes.reshape(-1, 4, 4), ref)
    recon = frozen.decode(codes)
    assert recon.shape == frames.shape and recon.dtype == torch.uint8


def test_vqgan_yaml_is_taming_layout(taming_ckpt):
    import yaml

    _, _, yml = taming_ckpt
    doc = yaml.safe_load(open(yml))
    assert doc["model"]["target"] == "taming.models.vqgan.VQModel"
    assert set(doc["model"]["params"]) == {"embed_dim", "n_embed", "ddconfig"}
    assert doc["model"]["params"]["ddconfig"]["ch_mult"] == [1, 2, 2, 2]


def test_vqgan_frozen_and_excluded_from_grad(taming_ckpt):
    _, ckpt, yml = taming_ckpt
    frozen = FrozenVQGAN(ImageTokenizerConfig(**{**TINY_TOKENIZER, "checkpoint": ckpt, "yaml": yml}))
    frozen.train()
    assert not frozen.training and not frozen.vq.training
    assert all(not p.requires_grad for p in frozen.parameters())


def test_vqgan_missing_corrupt_mismatched(taming_ckpt, tmp_path):
    model, ckpt, yml = taming_ckpt
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_taming_vqgan(str(tmp_path / "nope.ckpt"), yml)
    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(open(ckpt, "rb").read()[:500])
    with pytest.raises(ValueError, match="corrupt.ckpt"):
        load_taming_vqgan(str(bad), yml)
    other = VQGAN(ddconfig_from(ImageTokenizerConfig(**TINY_TOKENIZER)), 128, 32)
    save_taming_vqgan(other, str(tmp_path / "other.ckpt"), str(tmp_path / "other.yaml"))
    with pytest.raises(ValueError, match=r"other\.ckpt.*quantize\.embedding\.weight"):
        load_taming_vqgan(str(tmp_path / "other.ckpt"), yml)  # 128 codes in the file, 64 in the yaml
    with pytest.raises(ValueError, match="codebook_size"):  # config disagrees with the checkpoint
        FrozenVQGAN(ImageTokenizerConfig(**{**TINY_TOKENIZER, "codebook_size": 32, "checkpoint": ckpt, "yaml": yml}))


def test_vqgan_pickled_ckpt_loads_without_opt_in(taming_ckpt, tmp_path):
    """A public taming .ckpt pickles Lightning objects beside the weights: they load inertly (tests/test_safe_load.py)."""
    import argparse

    model, ckpt, yml = taming_ckpt
    legacy = str(tmp_path / "legacy.ckpt")
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": argparse.Namespace(lr=1.0)}, legacy)
    loaded = load_taming_vqgan(legacy, yml)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_vqgan_image_size_must_fit_downsampling():
    frozen = FrozenVQGAN(ImageTokenizerConfig(**TINY_TOKENIZER))
    with pytest.raises(ValueError, match="image_size"):
        frozen.grid_size(30)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_open_clip_checkpoint_loads_exactly(tmp_path, fmt):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(7)
    ref = open_clip.create_model("ViT-S-32-alt", pretrained=None).eval()  # standard (non-custom) text layout
    path = str(tmp_path / f"open_clip_model.{fmt}")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    torch.save(sd, path) if fmt == "bin" else save_file(sd, path)
    enc = FrozenTextEncoder(TextEncoderConfig(model_name="ViT-S-32-alt", pretrained=path), max_tokens=16)
    ids = open_clip.get_tokenizer("ViT-S-32-alt")(["a red circle moves left"])
    pooled, _ = enc.text(ids)
    assert torch.allclose(pooled, ref.encode_text(ids), atol=1e-5)
    assert torch.equal(enc.text.token_embedding.weight, ref.token_embedding.weight)


def test_open_clip_mismatched_checkpoint(tmp_path):
    torch.save({"token_embedding.weight": torch.zeros(10, 4)}, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match=r"bad\.bin.*(missing key|shape)"):
        FrozenTextEncoder(TextEncoderConfig(model_name="ViT-S-32-alt", pretrained=str(tmp_path / "bad.bin")))


def test_text_encoder_tokens_mask_cache_frozen(caplog):
    with caplog.at_level("WARNING"):
        enc = FrozenTextEncoder(TextEncoderConfig(model_name="ViT-S-32-alt"), max_tokens=12)
    assert "random" in caplog.text
    feats, mask = enc(["a red circle moves left", "go"])
    assert feats.shape == (2, 12, enc.feature_dim) and mask.shape == (2, 12)
    assert mask[0].sum() == 7 and mask[1].sum() == 3  # SOT + words + EOT
    assert torch.all(feats[1, 3:] == 0)
    again, _ = enc(["go", "a red circle moves left"])
    assert torch.equal(again[0], feats[1]) and enc.cache_hits == 2
    enc.train()
    assert not enc.training and all(not p.requires_grad for p in enc.parameters())
    with pytest.raises(TypeError, match="caption 0"):
        enc([3])


def test_text_encoder_cache_is_bounded_in_bytes_and_lives_on_the_host():
    enc = FrozenTextEncoder(TextEncoderConfig(model_name="ViT-S-32-alt"), max_tokens=8)
    entry = 8 * (enc.feature_dim + 1) * 4  # float32 features + the mask channel
    enc.cfg.cache_mib = 2.5 * entry / 2**20  # room for two entries
    captions = [f"push the block {i} times" for i in range(5)]
    reference, _ = FrozenTextEncoder(TextEncoderConfig(model_name="ViT-S-32-alt"), max_tokens=8)(captions)
    feats, _ = enc(captions)
    assert torch.equal(feats, reference)
    assert list(enc._cache) == captions[-2:] and enc.cache_bytes == 2 * entry <= enc.cfg.cache_mib * 2**20
    assert all(t.device.type == "cpu" for t in enc._cache.values())
    again, _ = enc([captions[-1], captions[0]])  # one hit, one miss that evicts the least recent entry
    assert enc.cache_hits == 1 and list(enc._cache) == [captions[-1], captions[0]]
    assert torch.equal(again[0], reference[4])  # the hit is the cached tensor itself
    assert torch.allclose(again[1], reference[0], atol=1e-4)  # the miss is re-encoded (in another batch size)
    with pytest.raises(ValueError, match="text_encoder.cache_device"):
        TextEncoderConfig(model_name="ViT-S-32-alt", cache_device="gpu")


def test_text_encoder_unknown_model_and_missing_file():
    with pytest.raises(ValueError, match="text_encoder.model_name"):
        TextEncoderConfig(model_name="ViT-Nope")
    with pytest.raises(ValueError, match="text_encoder.pretrained.*missing.bin"):
        TextEncoderConfig(pretrained="missing.bin")
