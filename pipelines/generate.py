"""Write ``pipelines/hprune_transformer.py``: the modeling file an export with components removed uploads.

    python pipelines/generate.py

The file is generated from the installed package's own modules (``diffusers_hprune.hub.remote_code``), exactly as
``hprune export`` / ``hprune push`` write it into ``transformer/``; it is kept here so that the code a Hub user runs
with ``trust_remote_code=True`` can be read in the repository. ``tests/test_export.py`` fails when it is stale.
"""

from __future__ import annotations

from pathlib import Path

from diffusers_hprune.hub.remote_code import MODULE_NAME, modeling_source
from diffusers_hprune.utils.fileio import atomic_write_text

if __name__ == "__main__":
    target = Path(__file__).resolve().parent / f"{MODULE_NAME}.py"
    atomic_write_text(target, modeling_source())
    print(f"wrote {target}")
