#!/usr/bin/env bash
# zmesh's LAN lab: a few "hosts" on one Ethernet segment, made of Linux network
# namespaces (root only). The multi-host tests (tests/test_lan*.py and the lab
# mode of tests/test_discovery.py) drive it; it also works by hand:
#
#   tests/harness/netns_lab.sh up [N]        N hosts (default 3) on one bridge
#   tests/harness/netns_lab.sh down          kill what runs inside, remove everything
#   tests/harness/netns_lab.sh show          namespaces and addresses
#   tests/harness/netns_lab.sh exec I CMD..  run CMD on host I (exec: CMD keeps our PID)
#   tests/harness/netns_lab.sh loss I PCT    host I drops PCT% of what it sends
#   tests/harness/netns_lab.sh rate I RATE   host I sends at most RATE (tc tbf, e.g. 10mbit)
#   tests/harness/netns_lab.sh cut I         unplug host I (its bridge port down)
#   tests/harness/netns_lab.sh heal I        plug it back
#   tests/harness/netns_lab.sh clear I       remove loss and rate from host I
# (setup/teardown/status are accepted for up/down/show.)
#
# Namespaces: ${ZMESH_LAB}sw holds the switch (bridge sw0, no STP, no multicast
# snooping, so mDNS reaches every port); ${ZMESH_LAB}hI is host I, with eth0 =
# ${ZMESH_LAB_NET}.I/24, lo, and a multicast route on eth0. Nothing is created in
# the namespace that runs the script, and nothing routes out of the lab.
# Env: ZMESH_LAB (name prefix, default "zlab-"; each test module uses its own so
# that runs do not collide), ZMESH_LAB_NET (default 10.77.0: the tests expect it).
# Needs: iproute2 (ip, tc), nftables (nft) for `loss`.
set -euo pipefail

prefix="${ZMESH_LAB:-zlab-}"
net="${ZMESH_LAB_NET:-10.77.0}"
sw="${prefix}sw"

die() { echo "netns_lab: $*" >&2; exit 2; }
host() { [[ "${1:-}" =~ ^[0-9]+$ ]] || die "host index expected, got '${1:-}'"; echo "${prefix}h$1"; }

ours() {  # the namespaces of this lab, one per line
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${prefix}(sw|h[0-9]+)\$" || true
}

down() {
    local ns pid sig
    # Processes left inside first (by PID: a namespace with processes in it lingers).
    for sig in TERM KILL; do
        for ns in $(ours); do
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -s "$sig" "$pid" 2>/dev/null || true; done
        done
        [ "$sig" = TERM ] && sleep 0.2
    done
    for ns in $(ours); do ip netns delete "$ns"; done  # takes its veth ends with it
}

up() {
    local n="${1:-3}" i h
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 250 ] || die "up: 1..250 hosts, got '$n'"
    down
    ip netns add "$sw"
    ip -n "$sw" link set lo up
    ip -n "$sw" link add sw0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0
    ip -n "$sw" link set sw0 up
    for i in $(seq 1 "$n"); do
        h=$(host "$i")
        ip netns add "$h"
        # The cable: port pI on the switch, eth0 on the host (born in their namespaces).
        ip -n "$sw" link add "p$i" type veth peer name eth0 netns "$h"
        ip -n "$sw" link set "p$i" master sw0 up
        ip -n "$h" link set lo up
        ip -n "$h" addr add "$net.$i/24" dev eth0
        ip -n "$h" link set eth0 multicast on up
        ip -n "$h" route add 224.0.0.0/4 dev eth0
    done
    # Ready when every cable has carrier (bounded: 5 s per host).
    for i in $(seq 1 "$n"); do
        h=$(host "$i")
        for _ in $(seq 50); do
            ip -n "$h" link show eth0 | grep -q LOWER_UP && continue 2
            sleep 0.1
        done
        die "host $i: eth0 has no carrier after 5 s"
    done
}

show() {
    local ns
    for ns in $(ours); do echo "== $ns"; ip -n "$ns" -brief addr; done
}

clear_faults() {
    local h; h=$(host "$1")
    ip netns exec "$h" nft delete table inet zlabfault 2>/dev/null || true
    tc -n "$h" qdisc del dev eth0 root 2>/dev/null || true
}

loss() {
    local h; h=$(host "$1")
    [[ "${2:-}" =~ ^[0-9]+$ ]] && [ "$2" -le 100 ] || die "loss: percentage 0..100 expected"
    ip netns exec "$h" nft delete table inet zlabfault 2>/dev/null || true
    # Random egress drop on eth0 (this kernel has no netem): nft's numgen per packet.
    ip netns exec "$h" nft -f - <<NFT
table inet zlabfault {
    chain egress {
        type filter hook output priority 0; policy accept;
        oifname "eth0" numgen random mod 100 < $2 counter drop
    }
}
NFT
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    up|setup)      up "${1:-3}" ;;
    down|teardown) down ;;
    show|status)   show ;;
    exec)          h=$(host "${1:-}"); shift; [ $# -gt 0 ] || die "exec: command expected"
                   exec ip netns exec "$h" "$@" ;;
    loss)          loss "${1:-}" "${2:-}" ;;
    rate)          h=$(host "${1:-}"); [ -n "${2:-}" ] || die "rate: e.g. 10mbit"
                   tc -n "$h" qdisc replace dev eth0 root tbf rate "$2" burst 32kbit latency 50ms ;;
    cut)           host "${1:-}" >/dev/null; ip -n "$sw" link set "p$1" down ;;
    heal)          host "${1:-}" >/dev/null; ip -n "$sw" link set "p$1" up ;;
    clear)         clear_faults "${1:-}" ;;
    *)             sed -n '5,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
