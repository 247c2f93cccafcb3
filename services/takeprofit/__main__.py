"""`python -m services.takeprofit` runs the takeprofit service (same as `thalex-tp takeprofit`)."""

import sys

from services.takeprofit.app import main

sys.exit(main(sys.argv[1:]))
