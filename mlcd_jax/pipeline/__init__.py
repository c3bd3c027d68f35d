"""From a folder of images to an exported encoder in one command (`python -m mlcd_jax.pretrain`):
the manual path's commands run in order, each stage's output where the manual path puts it,
sized to the data and the machine (sizing.py), resumable stage by stage (stages.py)."""
