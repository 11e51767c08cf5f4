"""Random-shift augmentation of finetuning windows (gr/training/augment.py)."""

import pytest
import torch

from gr.config import ConfigError
from gr.training.augment import _shift_grid, shift_window
from gr.training.finetune import FinetuneModule
from tests.conftest import TINY_ROBOT_MODEL, module_init_args


def test_shift_is_a_translation_with_replicated_edges():
    x = torch.arange(16).reshape(1, 1, 1, 4, 4)
    down = _shift_grid(x, torch.tensor([[[1, 0]]]))[0, 0, 0]
    assert down.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    left = _shift_grid(x, torch.tensor([[[0, -1]]]))[0, 0, 0]
    assert left.tolist() == [[1, 2, 3, 3], [5, 6, 7, 7], [9, 10, 11, 11], [13, 14, 15, 15]]
    frames = torch.randint(0, 255, (1, 2, 1, 6, 6, 3), dtype=torch.uint8)
    moved = _shift_grid(frames, torch.tensor([[[2, 1]]]))
    assert torch.equal(moved[0, :, 0, 2:, 1:], frames[0, :, 0, :-2, :-1])  # channels ride along


def test_one_shift_per_sample_and_view_for_history_and_future():
    torch.manual_seed(0)
    scene = torch.randint(0, 64, (8, 2, 4, 4))  # (B, Nv, h, w)
    history = scene[:, None].expand(8, 3, 2, 4, 4).clone()
    hist, fut = shift_window(history, scene.clone(), 1, pixels=False)
    assert all(torch.equal(hist[:, t], fut) for t in range(3))  # the scene moves as a whole
    assert not torch.equal(fut, scene)  # ... and it did move
    same = shift_window(history, scene, 0, pixels=False)
    assert same[0] is history  # 0 = off, and no random draw


def test_finetune_module_shifts_only_in_training():
    torch.manual_seed(0)
    module = FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL, augment={"code_shift": 1, "pixel_shift": 2}))
    g = torch.Generator().manual_seed(1)
    codes = {"history": torch.randint(0, 64, (4, 2, 2, 4, 4), generator=g),
             "future": torch.randint(0, 64, (4, 2, 4, 4), generator=g)}
    module.train()
    h, _ = module.codes(codes)
    assert not torch.equal(h, codes["history"])
    module.eval()
    assert torch.equal(module.codes(codes)[0], codes["history"])
    frames = {"history": torch.randint(0, 255, (2, 2, 2, 32, 32, 3), dtype=torch.uint8, generator=g),
              "future": torch.randint(0, 255, (2, 2, 32, 32, 3), dtype=torch.uint8, generator=g)}
    plain = module.codes(frames)[0]
    module.train()
    assert not torch.equal(module.codes(frames)[0], plain)  # pixels shifted before the VQGAN
    assert module.hparams["augment"] == {"pixel_shift": 2, "code_shift": 1}
    with pytest.raises(ConfigError, match="augment.pixel_shift"):
        FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL, augment={"pixel_shift": -1}))
