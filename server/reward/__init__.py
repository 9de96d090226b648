"""`/v1/reward`: LongRM-style scalar (discriminative) and judge (generative) reward scoring."""
