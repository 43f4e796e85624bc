"""k15-plugin: the Kimi k1.5 RL recipe (arXiv 2501.12599) for TRL, verl and OpenRLHF.

``k15_plugin.core`` is importable with torch alone (the math and :class:`~k15_plugin.core.settings.K15Settings`); the
TRL trainers below are loaded on first access so that ``import k15_plugin`` stays cheap. verl loads
``k15_plugin.verl`` through its plugin entry point; OpenRLHF runs through ``k15-train host=openrlhf``. ARCHITECTURE.md
maps the package.
"""

__version__ = "0.1.0"

_TRL_NAMES = {
    "KimiMirrorDescentConfig": "k15_plugin.trl",
    "KimiMirrorDescentTrainer": "k15_plugin.trl",
    "K15GRPOConfig": "k15_plugin.trl",
    "K15GRPOTrainer": "k15_plugin.trl",
    "K15RLOOConfig": "k15_plugin.trl",
    "K15RLOOTrainer": "k15_plugin.trl",
}

__all__ = ["__version__", *_TRL_NAMES]


def __getattr__(name):
    if name in _TRL_NAMES:
        import importlib

        return getattr(importlib.import_module(_TRL_NAMES[name]), name)
    raise AttributeError(f"module 'k15_plugin' has no attribute {name!r}")
