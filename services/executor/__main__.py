"""`python -m services.executor --config FILE` runs the executor."""

import sys

from services.executor.app import main

sys.exit(main(sys.argv[1:]))
