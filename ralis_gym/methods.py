"""The one list of acquisition method names (no heavy imports: the CLI builds its choices from it).

``HEURISTICS`` need only the network's predictions; ``ORACLES`` read the candidates' ground truth,
so they bound what a policy can gain and are never a heuristic a user could run on unlabeled data.
``RegionALEnv.score_candidates`` computes all of them; ``agents.heuristics`` has an agent for each.
"""

from __future__ import annotations

#: the reference code's baselines (random, entropy, BALD) plus margin and this project's class balance
HEURISTICS = ("random", "entropy", "margin", "bald", "class_balance")
#: ground-truth references
ORACLES = ("oracle", "oracle_loss", "oracle_rarity")
#: every name ``score_candidates`` accepts (and ``ralis-gym run --strategies`` offers)
METHODS = HEURISTICS + ORACLES
