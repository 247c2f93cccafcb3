#!/bin/sh
# Entry point of the Redis container: render the ACL from the password secrets, then hand over to
# the official image's entry point (which drops root and runs redis-server). The rendered file
# holds SHA-256 hashes only and lives in the container's /tmp, never on the host.
set -eu
/bin/sh /usr/local/etc/redis/render-acl.sh /usr/local/etc/redis/users.acl /run/secrets /tmp/users.acl
exec docker-entrypoint.sh redis-server \
  --aclfile /tmp/users.acl \
  --appendonly yes --appendfsync everysec \
  --dir /data \
  "$@"
