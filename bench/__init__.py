"""Benchmarks of the mesh against raw pyzmq (and, later, NATS and torch/Gloo).

Run ``python -m bench`` (or ``make bench``); see bench/README.md.
"""
