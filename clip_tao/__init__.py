"""clip-tao: fine-tune, evaluate, embed, export and deploy CLIP-style image-text models."""

__version__ = "0.1.0"
