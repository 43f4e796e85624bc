"""CPU test stub: only the pure-python functions OpenRLHF imports at module level (no CUDA kernels)."""

__version__ = "0.0.0+cpu-stub"
