"""Meta-World (MuJoCo) tasks with two rendered camera views, a 4-D state and the scripted expert.

    env = make_env("button-press-topdown-v3", seed=3, image_size=64)
    obs = env.reset()                       # object and goal positions drawn from `seed`
    while True:
        obs, success, done = env.step(env.expert_action(obs["raw"]))
        if done:
            break

Observation dict (S = image_size):
    images       {view: uint8 (S, S, 3)}   upright RGB, view "head" = camera corner4, "wrist" = gripperPOV
    state        float32 (4,)              end-effector xyz + gripper opening in [0, 1] (raw[:4])
    raw          float64 (39,)             the full goal-observable Meta-World observation
    instruction  str                       the task's sentence from TASK_INSTRUCTIONS
Actions are float (4,) in [-1, 1]: end-effector xyz delta (1 = 1 cm per step) and grip effort (+1 closes).

Rendering uses one mujoco.Renderer per env with shadows, reflections and MSAA off (about 15x faster than the
defaults). Meta-World's corner cameras are mounted rolled by 180 degrees (their image-up axis points at the floor), so
such views are rotated by 180 degrees: a plain vertical flip would give a mirror image of the scene.
"""

from __future__ import annotations

import atexit
import os
import warnings
import weakref
import zlib
from typing import Any, Optional, Sequence

# Must precede the first import of mujoco anywhere in the process (metaworld imports it).
os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

# Every Meta-World v3 task (MT50) -> the instruction given to the policy.
TASK_INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the ring and put it onto the peg",
    "basketball-v3": "pick up the ball and dunk it into the basket",
    "bin-picking-v3": "move the cube from the left bin into the right bin",
    "box-close-v3": "pick up the lid and close the box",
    "button-press-topdown-v3": "press the button down from the top",
    "button-press-topdown-wall-v3": "reach over the wall and press the button down from the top",
    "button-press-v3": "push the button in from the front",
    "button-press-wall-v3": "reach past the wall and push the button in from the front",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug out from under the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "pick the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "turn the knob to lock the door",
    "door-open-v3": "open the door",
    "door-unlock-v3": "turn the knob to unlock the door",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-close-v3": "turn the faucet handle to close the faucet",
    "faucet-open-v3": "turn the faucet handle to open the faucet",
    "hammer-v3": "pick up the hammer and hammer the nail into the wall",
    "hand-insert-v3": "put the gripper into the hole in the table",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "peg-insert-side-v3": "pick up the peg and insert it into the hole from the side",
    "peg-unplug-side-v3": "pull the peg out of the hole sideways",
    "pick-out-of-hole-v3": "pick the peg up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "pick-place-wall-v3": "pick up the puck, lift it over the wall and place it at the goal",
    "plate-slide-back-side-v3": "slide the plate sideways out of the cabinet",
    "plate-slide-back-v3": "slide the plate back out of the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-v3": "slide the plate into the cabinet",
    "push-back-v3": "pull the puck back to the goal",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach over the wall to the goal position",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "soccer-v3": "push the ball into the goal",
    "stick-pull-v3": "pick up the stick and pull the box with it",
    "stick-push-v3": "pick up the stick and push the box with it",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-close-v3": "slide the window closed",
    "window-open-v3": "slide the window open",
}

# The embedded benchmark: the object's layout is visible in the 64 px head view, it must be seen to succeed reliably
# (an expert fed the mean layout instead of the real one succeeds only 55-70% of the time), yet the expert still
# succeeds with its target off by 3 cm, and episodes are short (36-81 steps). Numbers: data_prep/metaworld_demos.py.
DEFAULT_TASKS: tuple[str, ...] = ("button-press-topdown-v3", "coffee-button-v3", "drawer-close-v3", "window-close-v3")

# Camera -> view name in the episode data (views not listed keep the camera's name).
VIEW_NAMES: dict[str, str] = {"corner4": "head", "gripperPOV": "wrist"}

# Open envs are closed at exit, before mujoco's own atexit hook terminates the EGL display: a context freed during
# interpreter teardown raises noisy errors. The hook is registered after the first context exists (atexit is LIFO).
_OPEN_ENVS: "weakref.WeakSet[MetaWorldEnv]" = weakref.WeakSet()
_EXIT_HOOK = []


def _close_open_envs() -> None:
    for env in list(_OPEN_ENVS):
        env.close()


def _check_seed(seed: int) -> int:
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return int(seed)


def task_names() -> list[str]:
    """The Meta-World task names this layer can build, sorted (e.g. "reach-v3")."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return sorted(name for name in ALL_V3_ENVIRONMENTS if name in TASK_INSTRUCTIONS)


def check_task(task: str) -> str:
    """Return `task` if it names a known task, else raise a ValueError that lists the valid names.

    Args:
        task: a Meta-World task name such as "reach-v3".
    """
    valid = task_names()
    if task not in valid:
        raise ValueError(f"unknown Meta-World task {task!r} (field 'task'); valid tasks: {', '.join(valid)}")
    return task


SPLITS = ("train", "val", "test")  # disjoint seed streams: demos, held-out demos, closed-loop evaluation


def episode_seed(seed: int, task: str, split: str, index: int) -> int:
    """The environment seed of episode `index` of `task` in `split`: a stable uint32, independent of which other
    tasks are in the run, and different across splits so that val/test layouts are never training layouts.

    Args:
        seed: the run's base seed (>= 0).
        task: task name.
        split: one of SPLITS.
        index: episode (attempt) number within the task and split (>= 0).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed} index={index}")
    entropy = [int(seed), zlib.crc32(task.encode()), SPLITS.index(split), int(index)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class MetaWorldEnv:
    """One goal-observable Meta-World task with seeded object/goal randomization and rendered camera views.

    Args:
        task: task name, e.g. "reach-v3" (see `task_names()`).
        seed: seeds the first `reset()`; later resets continue the same random stream, so a run of resets is
            reproducible too.
        image_size: side S of the square images.
        camera_names: MuJoCo cameras to render; corner4 and gripperPOV appear as views "head" and "wrist".
        max_steps: episode length limit; at most the simulator's own limit (500).
    """

    def __init__(self, task: str, seed: int, image_size: int = 64,
                 camera_names: Sequence[str] = ("corner4", "gripperPOV"), max_steps: int = 500):
        from metaworld import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
        from metaworld.policies import ENV_POLICY_MAP

        self.task = check_task(task)
        self.instruction = TASK_INSTRUCTIONS[task]
        self.seed, self.image_size = _check_seed(seed), int(image_size)
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        # Passing the seed keeps the constructor's own reset off numpy's global random state.
        self._env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-goal-observable"](seed=self.seed)
        if not 1 <= max_steps <= self._env.max_path_length:
            raise ValueError(f"max_steps must be in [1, {self._env.max_path_length}], got {max_steps}")
        self.max_steps = int(max_steps)
        # The goal-observable classes freeze the first random layout; draw a new one from env.np_random per reset.
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True
        self._expert = ENV_POLICY_MAP[task]()
        self._cameras = self._check_cameras(camera_names)
        self.view_names = [VIEW_NAMES.get(cam, cam) for cam in self._cameras]
        self._renderer = self._make_renderer()
        self._rotate = {cam: self._camera_upside_down(cam) for cam in self._cameras}
        self._num_steps, self._next_seed = 0, self.seed
        _OPEN_ENVS.add(self)

    @property
    def fps(self) -> float:
        """Control rate in steps per second (80 for Meta-World: 5 physics steps of 2.5 ms)."""
        return 1.0 / self._env.dt

    def _check_cameras(self, camera_names: Sequence[str]) -> list[str]:
        model = self._env.model
        known = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
        cameras = list(camera_names)
        bad = [cam for cam in cameras if cam not in known]
        if not cameras or bad:
            raise ValueError(f"camera_names {cameras!r}: unknown {bad}; cameras of {self.task}: {known}")
        views = [VIEW_NAMES.get(cam, cam) for cam in cameras]
        if len(set(views)) != len(views):
            raise ValueError(f"camera_names {cameras!r} repeat a view")
        return cameras

    def _make_renderer(self) -> mujoco.Renderer:
        vis = self._env.model.vis
        # MSAA, shadows and reflections cost ~15x in frame rate and add nothing at 64 px.
        vis.quality.offsamples = 0
        vis.global_.offwidth = max(vis.global_.offwidth, self.image_size)
        vis.global_.offheight = max(vis.global_.offheight, self.image_size)
        try:
            renderer = mujoco.Renderer(self._env.model, self.image_size, self.image_size)
        except mujoco.FatalError as exc:
            backend = getattr(mujoco.gl_context, "GLContext", type(None)).__module__
            raise RuntimeError(f"cannot open an offscreen OpenGL context for MuJoCo (GL backend {backend}: {exc}). "
                               "Set MUJOCO_GL=egl (or osmesa) before anything imports mujoco or metaworld, e.g. "
                               "import gr.envs first, and install libegl1 libgl1 libegl-mesa0") from exc
        if not _EXIT_HOOK:
            _EXIT_HOOK.append(atexit.register(_close_open_envs))
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        return renderer

    def _camera_upside_down(self, camera: str) -> bool:
        """True when the camera's image-up axis points below the horizon (fixed per camera: no camera here rolls)."""
        cam_id = mujoco.mj_name2id(self._env.model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        up_world = self._env.data.cam_xmat[cam_id].reshape(3, 3)[:, 1]  # camera y axis in world coordinates
        return bool(up_world[2] < 0)

    def render(self) -> dict[str, np.ndarray]:
        """Render every view of the current state -> {view: uint8 (S, S, 3)}, upright."""
        images = {}
        for cam, view in zip(self._cameras, self.view_names):
            self._renderer.update_scene(self._env.data, camera=cam)
            img = self._renderer.render()  # (S, S, 3), a fresh array per call
            images[view] = np.ascontiguousarray(img[::-1, ::-1]) if self._rotate[cam] else img
        return images

    def _observation(self, raw: np.ndarray) -> dict[str, Any]:
        return {"images": self.render(), "state": raw[:4].astype(np.float32), "raw": raw,
                "instruction": self.instruction}

    def reset(self, seed: Optional[int] = None) -> dict[str, Any]:
        """Start an episode with a new object/goal layout.

        Args:
            seed: reseed the layout stream; the first reset uses the constructor's seed, later ones continue it.
        """
        if seed is not None:
            self._next_seed = _check_seed(seed)
        if self._next_seed is not None:
            self._env.seed(self._next_seed)  # env.reset(seed=...) ignores its seed
            self._next_seed = None
        raw, _ = self._env.reset()
        self._num_steps = 0
        return self._observation(raw)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], bool, bool]:
        """Apply one action -> (observation, success, done); done once successful or after `max_steps` steps.

        Args:
            action: float (4,) xyz delta and grip effort, clipped to [-1, 1].
        """
        action = np.asarray(action, np.float64).reshape(-1)
        if action.shape != (4,) or not np.isfinite(action).all():
            raise ValueError(f"action must be 4 finite numbers, got {action!r}")
        if self._num_steps >= self.max_steps:
            raise RuntimeError(f"{self.task}: episode is over after {self.max_steps} steps; call reset()")
        raw, _, _, _, info = self._env.step(np.clip(action, -1.0, 1.0))
        self._num_steps += 1
        success = bool(info["success"])
        return self._observation(raw), success, success or self._num_steps >= self.max_steps

    def expert_action(self, raw_obs: np.ndarray) -> np.ndarray:
        """The scripted expert's action for a raw observation -> float32 (4,) clipped to [-1, 1].

        Args:
            raw_obs: the `raw` entry of an observation dict (float (39,)).
        """
        with warnings.catch_warnings():  # the experts warn whenever their gain saturates, i.e. most steps
            warnings.simplefilter("ignore", UserWarning)
            action = self._expert.get_action(raw_obs)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def close(self) -> None:
        """Free the renderer's GL context and the simulator (idempotent)."""
        if self in _OPEN_ENVS:
            _OPEN_ENVS.discard(self)
            self._renderer.close()
            self._env.close()


def make_env(task: str, seed: int, image_size: int = 64, camera_names: Sequence[str] = ("corner4", "gripperPOV"),
             max_steps: int = 500) -> MetaWorldEnv:
    """Build a `MetaWorldEnv` (see the class for the arguments)."""
    return MetaWorldEnv(task, seed, image_size, camera_names, max_steps)


def expert_episode(env: MetaWorldEnv, seed: Optional[int] = None) -> dict[str, Any]:
    """Run the scripted expert for one episode, recording what the policy sees before each action.

    Args:
        env: the environment; its `max_steps` bounds the episode.
        seed: passed to `env.reset`.

    Returns:
        {"frames": {view: uint8 (T, S, S, 3)}, "state": float32 (T, 4), "action": float32 (T, 4),
         "success": bool, "success_step": index of the action that reached success, or None}. Step t pairs the
        frame and state observed before action t with that action.
    """
    obs = env.reset(seed)
    frames: dict[str, list[np.ndarray]] = {view: [] for view in env.view_names}
    states, actions = [], []
    success, done = False, False
    while not done:
        action = env.expert_action(obs["raw"])
        for view, img in obs["images"].items():
            frames[view].append(img)
        states.append(obs["state"])
        actions.append(action)
        obs, success, done = env.step(action)
    return {"frames": {view: np.stack(imgs) for view, imgs in frames.items()},
            "state": np.stack(states), "action": np.stack(actions), "success": success,
            "success_step": len(actions) - 1 if success else None}
