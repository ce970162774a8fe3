"""Loading: the base model (hub id or folder), the PiSA-SR checkpoint, LoRA merging.

Nothing here knows about images or files of images.
"""
