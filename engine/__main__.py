"""``python -m engine`` is ``event-datagram``."""

import sys

from engine.cli import main

sys.exit(main())
