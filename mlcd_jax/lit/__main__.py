"""python -m mlcd_jax.lit: LiT, a text tower against a locked encoder (`trainer.py`)."""

from mlcd_jax.lit import trainer

if __name__ == "__main__":
    trainer.run()
