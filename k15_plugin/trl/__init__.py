"""TRL adapter: thin subclasses of TRL's trainers that call :mod:`k15_plugin.core`.

The configs import only TRL's config classes; the trainers (which pull in TRL's trainer modules and, when installed,
vLLM) load on first access, so checking a config stays cheap.
"""

from k15_plugin.trl.config import K15GRPOConfig, K15Options, K15RLOOConfig, KimiMirrorDescentConfig

_TRAINERS = ("K15GRPOTrainer", "K15RLOOTrainer", "KimiMirrorDescentTrainer", "LengthPenaltySlot")

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


def __getattr__(name):
    if name in _TRAINERS:
        from k15_plugin.trl import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'k15_plugin.trl' has no attribute {name!r}")
