#!/usr/bin/env bash
# The vLLM image's PID 1:  entrypoint.sh COMMAND [ARG...]
#
# Runs COMMAND, passes SIGTERM/SIGINT on to it, and once it has exited waits (up to
# LMCACHE_EXIT_GRACE_S, 30 s) for every other process of the container to finish too.
# Why: vLLM's engine core and workers, and multiprocessing's resource tracker, remove their
# shared memory (psm_*, sem.mp-*) after the API server has exited. When a container's PID 1
# exits the kernel SIGKILLs everything left in it at once, so with `vllm serve` as PID 1 those
# segments stayed in the host's /dev/shm (--ipc host): 400 MB per stop, seen here.
set -u
"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
code=0
# `wait` returns early when a trapped signal arrives; wait again until the child is gone.
while kill -0 "$child" 2>/dev/null; do
    wait "$child"
    code=$?
done
others() {
    local p n=0
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" = $$ ] || [ "$p" = "$BASHPID" ] || n=$((n + 1))
    done
    echo $n
}
deadline=$((SECONDS + ${LMCACHE_EXIT_GRACE_S:-30}))
while [ "$(others)" -gt 0 ] && [ $SECONDS -lt $deadline ]; do
    sleep 0.2
done
exit "$code"
