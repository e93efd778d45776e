"""`python -m app.simulator --model NAME --port N [options]`."""

import sys

from app.simulator.cli import main

sys.exit(main())
