"""Stable Diffusion 3 / 3.5 (SD3 Medium, SD3.5 Large / Large Turbo, SD3.5 Medium): see ``structure.py``."""
