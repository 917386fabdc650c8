#!/usr/bin/env bash
# Builds the Debian 12 root the coexistence matrix boots (cmd/internal/matrix):
# debootstrap minbase plus every network stack of the matrix, none of them
# started (a policy-rc.d forbids it, as in an image bake). Each configuration
# boots this root read-only under its own overlay, so it is built once.
#
#   root.sh DIR     builds DIR/root unless DIR/root/.complete exists
#
# The caller keys DIR by a hash of this file (which holds the package list),
# so a changed list builds a new root. Environment: DEBIAN_MIRROR.
set -euo pipefail
dir=${1:?usage: root.sh DIR}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$dir/root
[ -e "$root/.complete" ] && { echo "$root"; exit 0; }

# The packages: the base system with systemd as init, then one set per stack.
base=systemd,systemd-sysv,dbus,iproute2,procps,curl,ca-certificates,apt
stacks=(
	netplan.io                 # netplan rendering to networkd (Ubuntu)
	cloud-init                 # Ec2 datasource; renders through netplan here
	amazon-ec2-net-utils       # 2.3.0-3: Amazon Linux 2023's policy routing
	network-manager            # RHEL/Fedora's way
	ifupdown isc-dhcp-client   # classic Debian
)

rm -rf "$root"
mkdir -p "$dir"
debootstrap --variant=minbase --include="$base" bookworm "$root" "$mirror" >"$dir/debootstrap.log" 2>&1 ||
	{ tail -20 "$dir/debootstrap.log" >&2; echo "root.sh: debootstrap failed" >&2; exit 1; }
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$root/etc/resolv.conf"
pkgs=()
for p in "${stacks[@]}"; do pkgs+=("$p"); done
chroot "$root" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${pkgs[*]}" \
	>"$dir/apt.log" 2>&1 || { tail -20 "$dir/apt.log" >&2; echo "root.sh: apt-get install failed" >&2; exit 1; }
# The matrix installs dualhomed from local .debs only (it depends on procps,
# which is here). Without the package lists apt reads dpkg's status alone
# instead of rebuilding its cache from 80 MB of lists in every container, for
# every install, remove and purge.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/*
# Every stack starts disabled; each configuration enables its own. The
# image's own defaults that would act on every boot are neutralised here:
# cloud-init only runs where /etc/cloud/cloud-init.disabled is removed.
touch "$root/etc/cloud/cloud-init.disabled"
chroot "$root" systemctl disable -q NetworkManager.service NetworkManager-wait-online.service \
	systemd-networkd.service systemd-networkd-wait-online.service networking.service 2>/dev/null || true
# Quieter boots: none of the image's periodic housekeeping.
chroot "$root" systemctl disable -q apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
	e2scrub_all.timer fstrim.timer e2scrub_reap.service getty@tty1.service 2>/dev/null || true
rm -f "$root/usr/sbin/policy-rc.d" "$root/etc/resolv.conf"
echo matrix >"$root/etc/hostname"
# A root password is not needed: the harness enters with nsenter.
touch "$root/.complete"
echo "$root"
