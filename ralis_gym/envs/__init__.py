"""Gymnasium environments."""

from ralis_gym.envs.region_al import RegionALEnv, make_region_al_env

__all__ = ["RegionALEnv", "make_region_al_env"]
