"""``python -m synthpipe.benchmark bench|simulate ...`` (the same as ``synthpipe bench|simulate``)."""
import sys

from .cli import main

sys.exit(main())
