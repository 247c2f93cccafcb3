#!/bin/sh
# Render the ACL template: replace each `@<user>@` by the SHA-256 of the password in
# $SECRETS_DIR/redis_<user> (trailing newline ignored, as the services read it), drop comments.
#   render-acl.sh TEMPLATE SECRETS_DIR OUTPUT
# Used by deploy/redis/start.sh inside the Redis container, and by the tests.
set -eu
template=$1 secrets=$2 out=$3
tmp="$out.tmp"
sed -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' "$template" > "$tmp"
for file in "$secrets"/redis_*; do
  [ -f "$file" ] || continue
  user=${file##*/redis_}
  user=${user%.txt}
  hash=$(tr -d '\r\n' < "$file" | sha256sum | cut -d ' ' -f 1)
  sed -i -e "s/#@${user}@/#${hash}/" "$tmp"
done
if grep -q '#@[A-Za-z0-9_-]*@' "$tmp"; then
  echo "render-acl: no password secret for: $(grep -o '#@[A-Za-z0-9_-]*@' "$tmp" | tr -d '#@' | tr '\n' ' ')" >&2
  echo "render-acl: run deploy/make-secrets.sh (it writes deploy/secrets/redis_<user>.txt)" >&2
  rm -f "$tmp"
  exit 1
fi
chmod 0644 "$tmp"
mv "$tmp" "$out"
