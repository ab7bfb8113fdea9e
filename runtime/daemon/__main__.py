"""``python -m edgecl.runtime.daemon BUNDLE [--socket PATH | --port N] [--config FILE]``."""

import sys

from .service import main

sys.exit(main())
