"""Capacity planning without the hardware: the train step compiled for TPU or GPU topologies, what
the compiled program is, analytic FLOPs, XLA's GPU specs as data files."""
