"""The demos on bundled data (MLCD, regions, native resolution), their runs, and the ablation
sweeps."""
