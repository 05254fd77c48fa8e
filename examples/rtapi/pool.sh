#!/usr/bin/env bash
# The reference worker pool: PHP's built-in server running worker.php in several worker
# processes, as the consumer's pool `rtapi` (reload = "signal", USR2, pidfile $2).
#
# PHP's built-in server keeps nothing between requests (static variables and connections live
# for one request), so a reload has nothing to drop: each USR2 is logged and acknowledged.
# Under PHP-FPM, which keeps workers and opcache between requests, the same USR2 restarts the
# workers gracefully.
#
#   examples/rtapi/pool.sh <listen host:port> <pidfile> [workers]
# Environment for worker.php: RTAPI_DB, RTAPI_REDIS, RTAPI_PREFIX, RTAPI_NODE (see worker.php);
# RTAPI_LOG: where the server and the reloads are logged (default: nowhere).
set -u
listen=$1
pidfile=$2
export PHP_CLI_SERVER_WORKERS=${3:-3}
log=${RTAPI_LOG:-/dev/null}
dir=$(cd "$(dirname "$0")" && pwd)
php -S "$listen" "$dir/worker.php" >>"$log" 2>&1 &
server=$!
trap 'echo "rtapi: reload $(date +%s.%N)" >>"$log"' USR2
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null; exit 0' TERM INT
echo $$ >"$pidfile"
# `wait` returns as soon as a trapped signal arrives.
while kill -0 "$server" 2>/dev/null; do
  sleep 1 &
  wait $! 2>/dev/null
done
echo "rtapi: the PHP server exited" >>"$log"
exit 1
