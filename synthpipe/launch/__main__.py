"""``python -m synthpipe.launch`` is the ``synthpipe`` command."""
import sys

from .cli import main

sys.exit(main())
