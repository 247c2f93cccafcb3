"""Container healthcheck of thalex-tp images (no dependency beyond the standard library).

    python /opt/thalex-tp/healthcheck.py [PORT]     GET http://127.0.0.1:PORT/health, healthy on 200
    python /opt/thalex-tp/healthcheck.py --tcp PORT  something accepts TCP connections on PORT

PORT defaults to $TP_HEALTH_PORT; with neither (a one-shot command: keygen, status) there is
nothing to check and the answer is healthy.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    tcp = "--tcp" in argv
    args = [a for a in argv if a != "--tcp"]
    port = args[0] if args else os.environ.get("TP_HEALTH_PORT", "")
    if not port:
        return 0
    if tcp:
        try:
            socket.create_connection(("127.0.0.1", int(port)), timeout=3).close()
            return 0
        except OSError as exc:
            print(f"nothing listens on port {port}: {exc}")
            return 1
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as answer:
            print(answer.read().decode(errors="replace"))
            return 0 if answer.status == 200 else 1
    except urllib.error.HTTPError as exc:  # 503: the body names the failing check
        print(exc.read().decode(errors="replace"))
        return 1
    except (OSError, json.JSONDecodeError) as exc:
        print(f"no answer on port {port}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
