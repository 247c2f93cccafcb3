#!/bin/sh
# Create the secrets thalex-tp's docker-compose.yml needs, in deploy/secrets/ (git-ignored):
#
#   redis_<user>.txt            a random password per Redis ACL user (ingest portfolio takeprofit
#                               executor operator notify quoter admin); Redis gets their SHA-256 only
#   command_key.txt             the secret take-profit signs every command with and the executor
#                               checks (32 random bytes, hex); only those two services mount it
#   notify/                     your notification targets' secrets (bot token, webhook URL, ...),
#                               mounted read-only into the notify container at /run/secrets/notify
#   grafana_admin_password.txt  Grafana's admin password
#
# Existing files are kept (re-running never locks a running stack out); `--rotate` replaces the
# Redis and Grafana passwords and the command key (then: docker compose up -d --force-recreate).
#
# Your Thalex API keys are not created here: copy them in yourself (see docs/operations.md):
#   secrets/thalex_read_only.pem   the read-only key (ingest)
#   secrets/thalex_trading.pem     the trading key (executor)
#
# Permissions: the directory is 0700 (only you may enter it); the files are 0644 because the
# containers read them under their own non-root users through bind mounts.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dir=${TP_SECRETS_DIR:-$here/secrets}
rotate=no
[ "${1:-}" = "--rotate" ] && rotate=yes

mkdir -p "$dir"
chmod 0700 "$dir"

password() {
  # 32 random bytes, hex: no character that needs quoting in a URL or a shell
  od -An -N32 -tx1 /dev/urandom | tr -d ' \n'
}

write() {
  file="$dir/$1"
  if [ -s "$file" ] && [ "$rotate" = no ]; then
    echo "kept    $file"
  else
    (umask 077 && password > "$file.tmp")
    mv "$file.tmp" "$file"
    echo "written $file"
  fi
  chmod 0644 "$file"
}

for user in ingest portfolio takeprofit executor operator notify quoter admin; do
  write "redis_$user.txt"
done
write command_key.txt
write grafana_admin_password.txt
mkdir -p "$dir/notify"

for key in thalex_read_only.pem thalex_trading.pem; do
  if [ -f "$dir/$key" ]; then
    chmod 0644 "$dir/$key"
    echo "found   $dir/$key"
  else
    echo "missing $dir/$key  (needed by the live profile; the paper profile makes its own keys)"
  fi
done
