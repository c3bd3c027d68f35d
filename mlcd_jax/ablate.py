"""python -m mlcd_jax.ablate: the paper's ablations on your data or the demo's
(`mlcd_jax/demos/ablation.py`)."""

from mlcd_jax.demos import ablation

if __name__ == "__main__":
    ablation.run()
