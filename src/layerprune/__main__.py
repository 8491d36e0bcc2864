"""python -m layerprune."""

import sys

from .cli import main

sys.exit(main())
