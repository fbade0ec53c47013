"""SB3 agents for ralis-gym: the RALIS query network, its per-pool policy and DQN (after the reference
code, https://github.com/ArantxaCasanova/ralis), and the baseline agents of ``agents.heuristics``."""

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
