#!/bin/sh
# Provisions a Debian 12 machine for layerfs (the Vagrant VM in this folder), or
# checks one:
#
#   vagrant/provision.sh           as root: the README's set-up (./scripts/setup),
#                                  device-mapper modules, the scratch disk for
#                                  direct-lvm exported as LAYERFS_TEST_BLOCKDEV
#   vagrant/provision.sh --check   what the devicemapper driver and its tests
#                                  need, present? (exit 1 if not). The qemu test
#                                  guest runs this too, before the devicemapper
#                                  tests (tests/vm/test_devicemapper_in_guest.py).
set -eu
SRC=${LAYERFS_SRC:-$(cd "$(dirname "$0")/.." && pwd)}

check() {
    fail=0
    for tool in dmsetup losetup lvcreate wipefs thin_check thin_ls mkfs.ext4 debugfs \
                resize2fs mkfs.xfs xfs_growfs blkdiscard; do
        command -v "$tool" >/dev/null 2>&1 || { echo "provision: $tool is missing"; fail=1; }
    done
    if ! dmsetup targets 2>/dev/null | grep -q '^thin-pool '; then
        echo "provision: the kernel has no dm thin-pool target"
        fail=1
    fi
    if [ -n "${LAYERFS_TEST_BLOCKDEV:-}" ] && [ ! -b "$LAYERFS_TEST_BLOCKDEV" ]; then
        echo "provision: LAYERFS_TEST_BLOCKDEV=$LAYERFS_TEST_BLOCKDEV is not a block device"
        fail=1
    fi
    if ! "$SRC/.venv/bin/python" -c 'import layerfs_drivers.devicemapper' 2>/dev/null; then
        echo "provision: $SRC/.venv cannot import layerfs (run ./scripts/setup)"
        fail=1
    fi
    [ "$fail" = 0 ] && echo "provision: devicemapper prerequisites present"
    return "$fail"
}

if [ "${1:-}" = "--check" ]; then
    check
    exit $?
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "provision.sh: run as root" >&2
    exit 1
fi
cd "$SRC"
./scripts/setup

# Device-mapper and thin provisioning, now and at every boot.
modprobe -a dm_mod dm_thin_pool dm_snapshot loop
printf 'dm_mod\ndm_thin_pool\ndm_snapshot\nloop\n' > /etc/modules-load.d/layerfs.conf

# The extra disk (Vagrantfile) is the direct-lvm test device: the first of these
# that exists, has no partitions and carries no signature. It is never mounted.
disk=
for candidate in /dev/sdb /dev/vdb; do
    [ -b "$candidate" ] || continue
    [ -z "$(lsblk -no NAME "$candidate" | tail -n +2)" ] || continue
    [ -z "$(wipefs --no-act --noheadings "$candidate")" ] || continue
    disk=$candidate
    break
done
if [ -n "$disk" ]; then
    sed -i '/^LAYERFS_TEST_BLOCKDEV=/d' /etc/environment
    echo "LAYERFS_TEST_BLOCKDEV=$disk" >> /etc/environment
    export LAYERFS_TEST_BLOCKDEV="$disk"
    echo "provision: $disk is the direct-lvm scratch disk (LAYERFS_TEST_BLOCKDEV; it gets wiped)"
else
    echo "provision: no empty extra disk found; direct-lvm tests will skip"
fi
check
