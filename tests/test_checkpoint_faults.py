"""Checkpoint writes under faults: a full disk or a SIGKILL mid-save leaves the previous checkpoint loadable, and
`ckpt_path="last"` resolves to the newest complete one."""

import errno
import os
import signal
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

import gr.training.checkpoint_io as checkpoint_io
from gr.training.checkpoint_io import AtomicCheckpointIO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ckpt(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((256, 256), float(step))}}


def _resolve_last(folder) -> str:
    """What Lightning's `fit(ckpt_path="last")` would load from a ModelCheckpoint writing to `folder`."""
    trainer = L.Trainer(callbacks=[ModelCheckpoint(dirpath=str(folder), save_last=True)], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    return trainer._checkpoint_connector._parse_ckpt_path(TrainerFn.FITTING, "last", model_provided=True,
                                                          model_connected=True)


def test_full_disk_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_ckpt(1), path)
    real_save = torch.save

    def save_then_disk_full(obj, f):  # half the bytes land, then the disk is full
        real_save({"partial": torch.zeros(1000)}, f)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", save_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint(_ckpt(2), path)
    monkeypatch.setattr(checkpoint_io.torch, "save", real_save)
    assert io.load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the partial temp file is gone
    assert _resolve_last(tmp_path) == str(path)


def test_sigkill_mid_save_keeps_the_previous_checkpoint_and_last_resolves_to_it(tmp_path):
    path = tmp_path / "last.ckpt"
    older = tmp_path / "last-v1.ckpt"  # an older complete "last" file: the newest complete one must win
    io = AtomicCheckpointIO()
    io.save_checkpoint(_ckpt(0), older)
    os.utime(older, (1, 1))
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        import torch
        from gr.training.checkpoint_io import AtomicCheckpointIO
        io = AtomicCheckpointIO()
        io.save_checkpoint({{"global_step": 1, "state_dict": {{"w": torch.ones(256, 256)}}}}, {str(path)!r})
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # die with the new bytes written, not renamed
        io.save_checkpoint({{"global_step": 2, "state_dict": {{"w": torch.ones(256, 256)}}}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and os.path.getsize(tmp_path / leftovers[0]) > 0  # the killed save's bytes
    assert io.load_checkpoint(path)["global_step"] == 1
    assert _resolve_last(tmp_path) == str(path)
    io.save_checkpoint(_ckpt(3), path)  # the next save of that path sweeps the dead writer's temp file
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert io.load_checkpoint(path)["global_step"] == 3
