"""Weights in and out: training workdirs, our model dirs and transformers' MLCD / CLIP models
(`weights.py`, `hf/`)."""
