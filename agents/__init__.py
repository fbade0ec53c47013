"""SB3 agents for ralis-gym: the RALIS query network, its per-pool policy and DQN (spec §5, §6)."""

from agents.policies import RalisPolicy, RalisQNetwork
from agents.ralis_dqn import ExponentialEpsilon, PoolReplayBuffer, PoolReplayBufferSamples, RalisDQN

__all__ = [
    "ExponentialEpsilon",
    "PoolReplayBuffer",
    "PoolReplayBufferSamples",
    "RalisDQN",
    "RalisPolicy",
    "RalisQNetwork",
]
