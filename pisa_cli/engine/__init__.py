"""Tensors only: tile planning, the one-step UNet over latent tiles, VAE, colour fix.

No typer, rich or PIL here.
"""
