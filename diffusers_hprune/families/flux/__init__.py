"""FLUX.1 (schnell, dev): see ``structure.py``."""
