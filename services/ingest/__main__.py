"""`python -m services.ingest --config FILE`."""

import sys

from services.ingest.app import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
