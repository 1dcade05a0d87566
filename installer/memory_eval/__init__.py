"""The memory A/B harness behind `delta-mem-mlx eval`: does δ-mem help an agent remember?

The same questions, asked with the same decoding, through a running sidecar in several modes
(δ off, δ on, δ + hidden memory, plain model + memory pasted into the prompt, long context).
This package talks to the sidecar over HTTP only; it never imports MLX.
"""
