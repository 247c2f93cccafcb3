#!/bin/sh
# The official redis image's entry point contract, for Debian's redis-server: started as root,
# it gives /data to user `redis` and runs the server as that user. Protected mode is off, as the
# official image builds it: the server is reached from the other containers, and users.acl's
# `default` user (no password, PING only) would otherwise make Redis refuse them.
set -eu
if [ "${1:-}" = redis-server ]; then
  shift
  set -- redis-server --protected-mode no "$@"
  if [ "$(id -u)" = 0 ]; then
    find /data \! -user redis -exec chown redis:redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
  fi
fi
exec "$@"
