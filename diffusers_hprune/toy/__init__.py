"""The embedded default: tiny genuine SD3 and FLUX pipelines (see DESIGN.md section 7)."""
