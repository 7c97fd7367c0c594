#!/usr/bin/env bash
# Emulated hosts for tests and benchmarks: one network namespace per host, each joined by a
# veth pair to a bridge that lives in a namespace of its own, with addresses from 10.250.0.0/24
# that exist only inside these namespaces (the machine's own network is never touched). Each
# host's link can be capped with tbf in both directions, and taken down or up (a partition).
#
#   testbed/netns.sh up NAME HOSTS [RATE]   HOSTS namespaces NAME-0 .. NAME-(HOSTS-1); host i has
#                                           10.250.0.(i+1); RATE (e.g. 1gbit) caps every link
#   testbed/netns.sh exec NAME I CMD...     runs CMD on host I
#   testbed/netns.sh link NAME I up|down    takes host I's link up or down
#   testbed/netns.sh rate NAME I RATE       caps host I's link (both directions)
#   testbed/netns.sh down NAME              removes every namespace of NAME (and so every link)
#
# Needs root (CAP_NET_ADMIN) and iproute2; says so and exits non-zero otherwise.
set -euo pipefail

die() { echo "testbed: $*" >&2; exit 1; }
command -v ip >/dev/null || die "ip (iproute2) is not installed"
[ $# -ge 2 ] || die "usage: netns.sh up|exec|link|rate|down NAME ..."
cmd=$1 name=$2
case "$name" in *[!a-zA-Z0-9_-]* | "") die "bad testbed name: $name" ;; esac
br="$name-br"

addr() { echo "10.250.0.$(($1 + 1))"; }

cap() { # cap I RATE: tbf on the host's egress and on the bridge side's egress (the host's ingress)
  local i=$1 rate=$2
  for dev in "$name-$i:eth0" "$br:h$i"; do
    ip netns exec "${dev%%:*}" tc qdisc replace dev "${dev##*:}" root tbf rate "$rate" burst 1mb latency 100ms
  done
}

case "$cmd" in
up)
  hosts=${3:?hosts}
  rate=${4:-}
  ip netns add "$br" 2>/dev/null || die "cannot create network namespaces (needs root / CAP_NET_ADMIN), or $br exists"
  ip -n "$br" link add br0 type bridge
  ip -n "$br" link set br0 up
  ip -n "$br" link set lo up
  for ((i = 0; i < hosts; i++)); do
    ns="$name-$i"
    ip netns add "$ns"
    ip -n "$br" link add "h$i" type veth peer name eth0 netns "$ns"
    ip -n "$br" link set "h$i" master br0 up
    ip -n "$ns" addr add "$(addr "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    [ -z "$rate" ] || cap "$i" "$rate"
  done
  ;;
exec)
  i=${3:?host}
  shift 3
  exec ip netns exec "$name-$i" "$@"
  ;;
link)
  ip -n "$name-${3:?host}" link set eth0 "${4:?up|down}"
  ;;
rate)
  cap "${3:?host}" "${4:?rate}"
  ;;
down)
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$name-([0-9]+|br)$" || true); do
    ip netns del "$ns"
  done
  ;;
*)
  die "unknown command $cmd"
  ;;
esac
