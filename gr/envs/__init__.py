"""Simulated robot benchmarks shared by demo generation (data_prep/) and closed-loop evaluation (`gr eval`)."""

import os

# MuJoCo picks its GL backend when it is first imported: headless EGL unless the user chose another.
os.environ.setdefault("MUJOCO_GL", "egl")

from gr.envs.metaworld import (  # noqa: E402
    DEFAULT_TASKS,
    SPLITS,
    TASK_INSTRUCTIONS,
    VIEW_NAMES,
    MetaWorldEnv,
    check_task,
    episode_seed,
    expert_episode,
    make_env,
    task_names,
)

__all__ = ["DEFAULT_TASKS", "SPLITS", "TASK_INSTRUCTIONS", "VIEW_NAMES", "MetaWorldEnv", "check_task", "episode_seed",
           "expert_episode", "make_env", "task_names"]
