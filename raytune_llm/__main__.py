"""`python -m raytune_llm ...` (what `ray job submit -- python -m raytune_llm train FILE` runs)."""

import sys

from raytune_llm.cli import main

sys.exit(main())
