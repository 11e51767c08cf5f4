"""The policy API: `GRPolicy.from_checkpoint(path)` (or `.from_pretrained(export_folder)`), then `.reset()` and `.act(obs)` / `.step(obs)`.

An observation is {"images": {view: uint8 (H, W, 3)}, "state": (S,) in robot units, "instruction": str}. The policy
keeps its own history of the last `num_history` steps (the first observation fills it), caches the text features per
instruction, and returns action chunks (k, A) in robot units, undoing the normalization stored in the checkpoint. The
action path is one prefix pass up to the readouts plus the action head's `predict` (CVAE: the prior-mean latent; flow
and diffusion: integration / denoising from noise drawn from the policy's generator, re-seeded with `seed` at every
`reset()`, so an episode's chunks are reproducible; tokens: greedy constrained decoding); no future frame is generated.

`.step(obs)` returns one action: it executes each chunk `execute_steps` actions at a time, or, with
`temporal_ensemble`, predicts a chunk every step and blends them (gr/temporal_ensemble.py, ACT's weights).
Robot units <-> model units: gr/normalization.py, shared with the data pipeline.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

import numpy as np
import torch

from gr.data.video_io import resize_center_crop
from gr.normalization import Normalizer
from gr.temporal_ensemble import TemporalEnsemble


class GRPolicy:
    """Closed-loop wrapper around a finetuned GR model.

    Args:
        module: a FinetuneModule (with normalization statistics).
        execute_steps: actions executed from each chunk before predicting the next (default: the whole chunk).
        temporal_ensemble: ACT's m; when set, a chunk is predicted every step and overlapping predictions averaged.
        device: torch device for the model.
        seed: seed of the generator that the sampling heads (flow, diffusion) draw their noise from.
    """

    def __init__(self, module, execute_steps: Optional[int] = None, temporal_ensemble: Optional[float] = None,
                 device: str | torch.device = "cpu", seed: int = 0):
        self.module = module.to(device).eval()
        self.seed = seed
        self.generator = torch.Generator(torch.device(device)).manual_seed(seed)
        self.model, self.robot, self.device = module.model, module.robot_spec, torch.device(device)
        self.clip = module.clip_spec
        k = self.robot.action_chunk
        self.execute_steps = execute_steps or k
        if not 1 <= self.execute_steps <= k:
            raise ValueError(f"execute_steps must be in [1, {k}] (the chunk length), got {execute_steps}")
        self.temporal_ensemble = temporal_ensemble
        self.norm = Normalizer.from_stats(module.normalization_stats(), self.robot.arm_index, self.robot.gripper_index)
        self.ensemble = None if temporal_ensemble is None else TemporalEnsemble(temporal_ensemble,
                                                                                self.norm.snap_gripper)
        self.reset()

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str = "cpu", **kwargs) -> "GRPolicy":
        """Rebuild the finetuned module from a Lightning checkpoint, a DeepSpeed / distributed-checkpoint folder or a
        `gr export` folder (gr.safe_load: no code from the files runs) and wrap it."""
        from gr.export import load_any

        return cls._checked(load_any(path, map_location), path, map_location, **kwargs)

    @classmethod
    def from_pretrained(cls, folder: str, map_location: str = "cpu", **kwargs) -> "GRPolicy":
        """Load a `gr export` folder (model.safetensors + config.json + encoders): no Lightning, no Trainer."""
        from gr.export import load_export

        return cls._checked(load_export(folder, map_location), folder, map_location, **kwargs)

    @classmethod
    def _checked(cls, module, path: str, map_location: str, **kwargs) -> "GRPolicy":
        if getattr(module, "robot_spec", None) is None:
            raise ValueError(f"{path!r}: a pretraining checkpoint has no action head; finetune it on robot data first")
        return cls(module, device=map_location, **kwargs)

    def reset(self) -> None:
        """Start a new episode: empty history, no pending actions, the sampling generator back at `seed`."""
        self.generator.manual_seed(self.seed)
        self.history: deque = self.new_history()
        self._queue: list[np.ndarray] = []
        if self.ensemble is not None:
            self.ensemble.reset()

    # ---- observation -> model inputs ----
    def _text_features(self, instruction: str):
        # One caption per call, so features never depend on what else is in a batch; the text encoder's own LRU
        # (bounded in entries and bytes, text_encoder.cache_size / cache_mib) caches them.
        return self.module.text_encoder([instruction])

    def check_observation(self, obs: Any) -> None:
        """Raise a ValueError naming the field when `obs` does not fit the model (views, image shapes, state size,
        instruction): the policy server answers with it instead of failing a batch."""
        if not isinstance(obs, dict):
            raise ValueError(f"obs must be a dict with images, state and instruction, got {type(obs).__name__}")
        images = obs.get("images")
        if not isinstance(images, dict):
            raise ValueError("obs['images'] must be a dict {view: uint8 (H, W, 3)}")
        missing = [v for v in self.robot.view_names if v not in images]
        if missing:
            raise ValueError(f"obs['images'] lacks view {missing[0]!r}; the model was trained on views "
                             f"{self.robot.view_names} (got {sorted(images)})")
        for v in self.robot.view_names:
            shape = np.shape(images[v])
            if len(shape) != 3 or shape[2] != 3 or min(shape[:2]) < 1:
                raise ValueError(f"obs['images'][{v!r}] has shape {shape}, expected (H, W, 3) uint8 RGB")
        if "state" not in obs:
            raise ValueError("obs lacks 'state'")
        state = np.shape(obs["state"])
        if state != (self.robot.state_dim,):
            raise ValueError(f"obs['state'] has shape {state}, the model expects ({self.robot.state_dim},)")
        try:
            finite = bool(np.isfinite(np.asarray(obs["state"], np.float64)).all())
        except (TypeError, ValueError):
            raise ValueError("obs['state'] must be numbers") from None
        if not finite:
            raise ValueError("obs['state'] has NaN or infinite values")
        if not isinstance(obs.get("instruction"), str):
            raise ValueError("obs['instruction'] must be a string")

    def encode_observations(self, observations: list[dict[str, Any]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """History entries (codes (Nv, h, w), normalized state (S,)) of several observations, their frames tokenized
        in one VQGAN call."""
        for obs in observations:
            self.check_observation(obs)
        views = self.robot.view_names
        frames = np.stack([resize_center_crop(np.asarray(obs["images"][v], np.uint8)[None], self.clip.image_size)[0]
                           for obs in observations for v in views])
        codes = self.module.image_tokenizer.encode(torch.from_numpy(frames).to(self.device))  # (N * Nv, h, w)
        codes = codes.reshape(len(observations), len(views), *codes.shape[1:])
        return [(codes[i], torch.from_numpy(self.norm.state(obs["state"])).to(self.device))
                for i, obs in enumerate(observations)]

    def new_history(self) -> deque:
        """The last (num_history - 1) * history_stride + 1 observations: every `history_stride`-th one, ending with
        the newest, goes to the model (`model_window`), as the training windows were cut."""
        return deque(maxlen=(self.clip.num_history - 1) * self.robot.history_stride + 1)

    def model_window(self, history: deque) -> list:
        return list(history)[:: self.robot.history_stride]

    def push_entry(self, history: deque, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        if not history:
            history.extend([entry] * history.maxlen)  # at the start, the first frame is the past
        else:
            history.append(entry)

    def _push(self, obs: dict[str, Any]) -> None:
        self.push_entry(self.history, self.encode_observations([obs])[0])

    @torch.no_grad()
    def predict_chunks(self, histories: list[deque], instructions: list[str]) -> list[np.ndarray]:
        """Action chunks (k, A) in robot units for several histories at once (one prefix pass over the batch)."""
        feats = [self._text_features(i) for i in instructions]
        text, mask = torch.cat([f for f, _ in feats]), torch.cat([m for _, m in feats])
        windows = [self.model_window(h) for h in histories]
        codes = torch.stack([torch.stack([c for c, _ in w]) for w in windows])  # (B, Th, Nv, h, w)
        state = torch.stack([torch.stack([s for _, s in w]) for w in windows])  # (B, Th, S)
        readouts = self.model.readout_features(text, mask, codes, state)
        arm, grip = self.model.action_head.predict(readouts, self.generator)
        arm = arm.float().cpu().numpy()
        grip = None if grip is None else grip.cpu().numpy()
        return [self.norm.to_robot(arm[i], None if grip is None else grip[i]) for i in range(len(histories))]

    @torch.no_grad()
    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """Add the observation to the history and return the predicted action chunk (k, A) in robot units."""
        self._push(obs)
        return self.predict_chunks([self.history], [obs["instruction"]])[0]

    def step(self, obs: dict[str, Any]) -> np.ndarray:
        """One action (A,) for this step: chunked execution or temporal ensembling."""
        if self.temporal_ensemble is None:
            if not self._queue:
                self._queue = list(self.act(obs)[: self.execute_steps])
            else:
                self._push(obs)  # keep the history current while executing the chunk
            return self._queue.pop(0)
        return self.ensemble(self.act(obs))
