"""LoRA finetuning (gr/model/lora.py): adapters over a frozen base, slim checkpoints, merged export."""

import copy
import os
import shutil

import numpy as np
import pytest
import torch

from gr.config import ConfigError
from gr.model.lora import LoRALinear, merge_lora
from gr.policy import GRPolicy
from gr.training.finetune import FinetuneModule
from gr.training.pretrain import PretrainModule
from tests.conftest import TINY_ROBOT_MODEL, module_init_args
from tests.test_pretokenized import tiny_vqgan  # noqa: F401 - a fixture, used by name

STATS = {"state": {"mean": [0.0] * 4, "std": [0.2] * 4, "min": [-1.0] * 4, "max": [1.0] * 4},
         "action": {"mean": [0.0] * 4, "std": [0.5] * 4, "min": [-1.0] * 4, "max": [1.0] * 4}}
LORA = {"rank": 2, "alpha": 4.0}


@pytest.fixture(scope="module")
def base(tiny_vqgan, tmp_path_factory):  # noqa: F811
    """A pretraining checkpoint whose VQGAN is a real taming file (so the merged export can bundle it)."""
    root = tmp_path_factory.mktemp("lora")
    tok = {"checkpoint": tiny_vqgan[0], "yaml": tiny_vqgan[1], "codebook_size": 64}
    torch.manual_seed(0)
    pre = PretrainModule(**module_init_args(image_tokenizer=tok))
    path = root / "base.ckpt"
    torch.save({"state_dict": pre.state_dict(), "hyper_parameters": dict(pre.hparams)}, path)
    return {"path": str(path), "tok": tok, "state": {k: v.clone() for k, v in pre.model.state_dict().items()},
            "root": root}


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"history": torch.randint(0, 64, (b, 2, 2, 4, 4), generator=g),
            "future": torch.randint(0, 64, (b, 2, 4, 4), generator=g),
            "state": torch.randn(b, 2, 4, generator=g), "instruction": ["open the drawer"] * b,
            "arm": torch.randn(b, 4, 3, generator=g), "gripper": (torch.rand(b, 4, 1, generator=g) > 0.5).float(),
            "action_mask": torch.ones(b, 4, dtype=torch.bool)}


def _lora_module(base, **lora):
    torch.manual_seed(1)
    module = FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL, image_tokenizer=base["tok"],
                                               init_from=base["path"], lora={**LORA, **lora}))
    module.normalization_stats(STATS)
    return module


def _train(module, steps=5):
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    module.train()
    for i in range(steps):
        loss = module.robot_losses(_batch(seed=i))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return module.eval()


def _obs(n=3):
    rng = np.random.default_rng(0)
    return [{"images": {v: rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for v in ("head", "wrist")},
             "state": rng.normal(size=4).astype(np.float32), "instruction": "open the drawer"} for _ in range(n)]


def test_only_adapters_and_robot_parts_train_and_the_base_stays_bit_identical(base):
    module = _lora_module(base)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) or n.startswith(
        ("view_emb.", "state_proj.", "readout_emb.", "action_head.")) for n in trainable)
    adapted = [n for n, m in module.model.named_modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 4 * 2  # qkv, proj, fc, proj in each of the 2 blocks
    full = FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL, image_tokenizer=base["tok"],
                                             init_from=base["path"]))
    n_lora = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    n_full = sum(p.numel() for p in full.model.parameters() if p.requires_grad)
    assert n_lora < n_full
    _train(module)
    state = module.model.state_dict()
    for k, v in base["state"].items():
        assert torch.equal(state[k], v), k  # every pretrained tensor, bit for bit
    assert any(m.lora_B.abs().sum() > 0 for m in module.model.modules() if isinstance(m, LoRALinear))


def test_checkpoint_holds_only_what_trained_and_merged_equals_unmerged(base, tmp_path):
    module = _train(_lora_module(base))
    path = tmp_path / "lora.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    saved = torch.load(path, weights_only=False)
    keys = set(saved["state_dict"])
    assert "model.trunk.blocks.0.attn.qkv.lora_A" in keys and "model.action_head.queries" in keys
    assert "model.trunk.blocks.0.attn.qkv.weight" not in keys and "model.code_emb.weight" not in keys
    assert saved["hyper_parameters"]["lora_base"] == base["path"]
    # Rebuilt over its base, the checkpoint acts exactly like the module that trained.
    obs = _obs()
    direct, rebuilt = GRPolicy(module), GRPolicy.from_checkpoint(str(path))
    for o in obs:
        np.testing.assert_array_equal(direct.act(o), rebuilt.act(o))
    # Merged weights give the adapter model's outputs, in training passes and in cached generation (whose CPU fast
    # path reads weights directly).
    merged = copy.deepcopy(module.model)
    assert merge_lora(merged) == 8
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(base["state"]) | {k for k in module.model.state_dict()
                                                              if k.startswith(("view_emb.", "state_proj.",
                                                                               "readout_emb.", "action_head."))}
    b = _batch()
    text, mask = module.text_encoder(b["instruction"])
    with torch.no_grad():
        la, ra = module.model(text, mask, b["history"], b["future"], b["state"])
        lm, rm = merged(text, mask, b["history"], b["future"], b["state"])
        torch.testing.assert_close(lm, la, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rm, ra, atol=1e-5, rtol=1e-5)
        ga = module.model.generate_future_frame(text, mask, b["history"], state=b["state"])
        gm = merged.generate_future_frame(text, mask, b["history"], state=b["state"])
        ref = module.model.generate_future_frame(text, mask, b["history"], state=b["state"], use_cache=False)
    assert torch.equal(ga, ref) and torch.equal(gm, ref)
    # gr export --merge-lora: a plain export whose policy matches the adapter checkpoint's.
    from gr.export import main as export_main

    with pytest.raises(SystemExit):
        export_main([str(path), str(tmp_path / "refused")])
    export_main([str(path), str(tmp_path / "merged"), "--merge-lora"])
    exported = GRPolicy.from_pretrained(str(tmp_path / "merged"))
    rebuilt.reset()
    for o in obs:
        np.testing.assert_allclose(exported.act(o), rebuilt.act(o), atol=1e-4)


def test_checkpoint_without_its_base_names_the_missing_file(base, tmp_path):
    module = _lora_module(base)
    moved = tmp_path / "base_copy.ckpt"
    shutil.copy(base["path"], moved)
    module.hparams["lora_base"] = str(moved)  # as if trained from this copy ...
    path = tmp_path / "lora.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    os.remove(moved)  # ... which is gone now
    with pytest.raises(ConfigError, match=f"lora_base: the base checkpoint '{moved}' is missing"):
        GRPolicy.from_checkpoint(str(path))


@pytest.mark.parametrize("lora, match", [
    ({"targets": ["trunk.blocks.*.attn.nothing"]}, "lora.targets: 'trunk.blocks.\\*.attn.nothing' matches no linear"),
    ({"rank": 0}, "lora.rank"),
    ({"trainable": ["nope."]}, "lora.trainable: prefix 'nope.'"),
])
def test_bad_lora_config_names_the_field(base, lora, match):
    with pytest.raises(ConfigError, match=match):
        _lora_module(base, **lora)


def test_lora_needs_a_base(base):
    with pytest.raises(ConfigError, match="lora: adapters need a base model"):
        FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL, image_tokenizer=base["tok"], lora=LORA))
