"""gr.training.ema.EMA: the average, validation on it, checkpoints that carry it, and an exact resume."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gr.config import ConfigError
from gr.training.ema import EMA


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 1)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.val_weights = []

    def training_step(self, batch, _):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def validation_step(self, batch, _):
        self.val_weights.append(self.net.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _fit(root, max_steps, ckpt_path=None, every=None):
    torch.manual_seed(0)
    module, ema = Tiny(), EMA(decay=0.9)
    cbs = [ema] + ([pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1,
                                                 filename="s{step}", auto_insert_metric_name=False)] if every else [])
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=cbs, limit_val_batches=1, val_check_interval=2,
                         enable_checkpointing=bool(every))
    trainer.fit(module, _loader(), _loader(), ckpt_path=ckpt_path)
    return module, ema, trainer


def test_average_matches_the_recurrence_and_validation_sees_it(tmp_path):
    torch.manual_seed(0)
    module, ema = Tiny(), EMA(decay=0.9)
    ema.on_fit_start(None, module)
    expected = module.net.weight.detach().clone()
    assert "frozen" not in ema.shadow  # only what trains is averaged
    for step in range(1, 6):
        with torch.no_grad():
            module.net.weight.add_(float(step))
        ema.on_train_batch_end(type("T", (), {"global_step": step})(), module, None, None, 0)
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * module.net.weight.detach()
    torch.testing.assert_close(ema.shadow["net.weight"], expected)
    raw = module.net.weight.detach().clone()
    ema.on_validation_start(None, module)
    torch.testing.assert_close(module.net.weight.detach(), expected)  # validation runs on the average
    ema.on_validation_end(None, module)
    assert torch.equal(module.net.weight.detach(), raw)  # ... and training continues on the raw weights
    with pytest.raises(ConfigError, match="EMA.decay"):
        EMA(decay=1.0)


def test_checkpoint_holds_the_average_and_resume_is_exact(tmp_path):
    full, full_ema, _ = _fit(tmp_path / "full", 8)
    _fit(tmp_path / "a", 4, every=4)  # 4 batches per epoch: a checkpoint at an epoch's end (plain DataLoader)
    ckpt_file = tmp_path / "a" / "s4.ckpt"
    ckpt = torch.load(ckpt_file, weights_only=False)
    first, first_ema, _ = _fit(tmp_path / "b", 4)
    # state_dict = the EMA weights (what eval and export read); the raw weights ride along for the resume.
    assert torch.equal(ckpt["state_dict"]["net.weight"], first_ema.shadow["net.weight"])
    assert torch.equal(ckpt["ema"]["raw"]["net.weight"], first.net.weight.detach())
    assert not torch.equal(ckpt["state_dict"]["net.weight"], ckpt["ema"]["raw"]["net.weight"])
    resumed, resumed_ema, _ = _fit(tmp_path / "c", 8, ckpt_path=str(ckpt_file))
    assert torch.equal(resumed.net.weight, full.net.weight)
    assert torch.equal(resumed_ema.shadow["net.weight"], full_ema.shadow["net.weight"])
    assert len(full.val_weights) >= 2 and not torch.equal(full.val_weights[-1], full.net.weight.detach())
