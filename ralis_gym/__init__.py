"""ralis-gym: region-based active learning for semantic segmentation (RALIS, ICLR 2020).

Importing the package registers the environments with Gymnasium::

    import gymnasium as gym
    import ralis_gym  # noqa: F401

    env = gym.make("RegionAL-CamVid-Fast-v0", mode="train")
"""

from gymnasium.envs.registration import register, registry

__version__ = "0.1.0"

#: Registered environment ids and their fixed keyword arguments.
ENV_IDS: dict[str, dict] = {
    "RegionAL-CamVid-v0": {"dataset": "camvid", "model": "paper", "device": "auto"},
    "RegionAL-CamVid-Fast-v0": {"dataset": "camvid", "model": "fast"},
    "RegionAL-Cityscapes-v0": {"dataset": "cityscapes", "model": "paper", "device": "auto"},
}

for _env_id, _kwargs in ENV_IDS.items():
    if _env_id not in registry:
        # The entry point wraps the env in TimeLimit(ceil(budget / K)) computed from the actual
        # kwargs, so a test-mode budget of 1920 is not cut off at the training budget's 20 steps.
        register(id=_env_id, entry_point="ralis_gym.envs.region_al:make_region_al_env", kwargs=_kwargs)

__all__ = ["ENV_IDS", "__version__"]
