"""rayflow: moment-matching distillation of diffusion models, at cluster scale on Ray."""

__version__ = "0.1.0"
