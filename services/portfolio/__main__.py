"""`python -m services.portfolio` runs the portfolio service (same as `thalex-tp portfolio`)."""

import sys

from services.portfolio.app import main

sys.exit(main(sys.argv[1:]))
