"""advsemiseg-jax: Adversarial Learning for Semi-Supervised Semantic Segmentation in JAX."""
__version__ = "0.1.0"
