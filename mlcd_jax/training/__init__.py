"""MLCD pretraining: the trainer (`trainer.py`), its input, the train step and its state, the
sharded head and region heads, losses, the optimizer, the run loop and its reports, the config
checks."""
