"""megatron-speed: a Megatron-core RL recipe with a colocated vLLM engine, SPEED and James-Stein baselines."""

__version__ = "0.1.0"
