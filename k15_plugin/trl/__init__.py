"""TRL adapter: thin subclasses of TRL's trainers that call :mod:`k15_plugin.core`."""

from k15_plugin.trl.config import K15GRPOConfig, K15Options, K15RLOOConfig, KimiMirrorDescentConfig
from k15_plugin.trl.trainer import K15GRPOTrainer, K15RLOOTrainer, KimiMirrorDescentTrainer, LengthPenaltySlot

__all__ = [
    "K15GRPOConfig",
    "K15GRPOTrainer",
    "K15Options",
    "K15RLOOConfig",
    "K15RLOOTrainer",
    "KimiMirrorDescentConfig",
    "KimiMirrorDescentTrainer",
    "LengthPenaltySlot",
]
