"""macrid: disentangled recommenders (MacridVAE, Ma et al., NeurIPS 2019) on Ray."""

__version__ = "0.1.0"
