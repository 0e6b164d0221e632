"""Helpers every layer may use: errors, atomic file writes, process groups, quiet logging, Diffusers registration,
and bitsandbytes' NF4 on the CPU. Nothing here knows the method or the model families."""
