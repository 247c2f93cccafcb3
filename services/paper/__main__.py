"""``python -m services.paper [paper args]`` runs the exchange; ``python -m services.paper keygen ...``
makes keys."""

import sys

from services.paper.cli import keygen_main, paper_main

if len(sys.argv) > 1 and sys.argv[1] == "keygen":
    sys.exit(keygen_main(sys.argv[2:]))
sys.exit(paper_main(sys.argv[1:] if sys.argv[1:2] != ["paper"] else sys.argv[2:]))
