"""`python -m services.notify` runs the notify service (same as `thalex-tp notify`)."""

import sys

from services.notify.app import main

sys.exit(main(sys.argv[1:]))
