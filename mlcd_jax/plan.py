"""python -m mlcd_jax.plan: the train step compiled for a TPU or GPU topology on this CPU
(`mlcd_jax/planning/`)."""

from mlcd_jax.planning import plan

if __name__ == "__main__":
    plan.run()
