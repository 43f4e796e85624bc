"""CPU test stub of the few vLLM names OpenRLHF imports at module level. Generation is never run."""

__version__ = "0.0.0+cpu-stub"


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class AsyncEngineArgs:  # referenced only inside RolloutRayActor.__init__
    def __init__(self, *a, **k):
        raise RuntimeError("vllm CPU stub: no engine")
