#!/bin/bash
# Runs inside the RDMA VM (started by init, in the guest's view of the host's
# files): builds the two-host RDMA network, runs the job's command from the
# project directory and leaves its exit code in the job directory.
#   guest.sh JOB_DIR WORK_DIR     (JOB_DIR/cmd: the command, shell-quoted)
job="$1" work="$2"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RDMA_VM=1
mkdir -p /run/tmp && export TMPDIR=/run/tmp  # / is read-only in here

# Two "hosts" one cable apart: veth0 (10.99.0.1, rxe0) <-> veth1 (10.99.0.2, rxe1).
ip link set lo up
ip link add veth0 type veth peer name veth1
ip addr add 10.99.0.1/24 dev veth0
ip addr add 10.99.0.2/24 dev veth1
ip link set veth0 up
ip link set veth1 up
rdma link add rxe0 type rxe netdev veth0
rdma link add rxe1 type rxe netdev veth1
# Both ends live in one network stack, which would route 10.99.0.1 -> 10.99.0.2
# over lo, where no rxe listens: send what leaves a veth out of that veth, and
# accept packets that come from a local address.
for conf in all veth0 veth1; do
    sysctl -qw "net.ipv4.conf.$conf.accept_local=1" "net.ipv4.conf.$conf.rp_filter=0"
done
ip route replace 10.99.0.0/24 dev veth0 src 10.99.0.1 table 100
ip route replace 10.99.0.0/24 dev veth1 src 10.99.0.2 table 101
ip rule add pref 10 oif veth0 lookup 100
ip rule add pref 11 oif veth1 lookup 101
ip rule add pref 1000 lookup local
ip rule del pref 0
# The GID index of rxe0's RoCE v2 IPv4 address (the same on rxe1).
gids=/sys/class/infiniband/rxe0/ports/1
for f in "$gids"/gids/*; do
    i=${f##*/}
    case "$(cat "$f" 2>/dev/null)" in
        0000:0000:0000:0000:0000:ffff:*)
            if [ "$(cat "$gids/gid_attrs/types/$i" 2>/dev/null)" = "RoCE v2" ]; then
                export RDMA_GID_INDEX=$i
                break
            fi ;;
    esac
done
[ -n "${RDMA_GID_INDEX:-}" ] || echo "rdma-vm: rxe0 has no RoCE v2 IPv4 GID" >&2

cd "$work" || exit 1
echo "@@rdma-vm-begin@@"
# Through a pipe: the command's output is a log (no tty: no colours, no progress bars).
bash -c "$(cat "$job/cmd")" </dev/null 2>&1 | cat
rc=${PIPESTATUS[0]}
echo "@@rdma-vm-end@@"
echo "$rc" >"$job/rc"
sync
