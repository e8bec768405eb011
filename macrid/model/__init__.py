"""Model: MacridVAE and its baselines, the ELBO, sampled softmax, row-sparse item tables. No I/O."""
