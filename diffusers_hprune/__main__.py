import sys

from diffusers_hprune.cli import main

sys.exit(main())
