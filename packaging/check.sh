#!/usr/bin/env bash
# Checks the packages built by packaging/build.sh (make package-check).
# CI runs it as root on a fresh Debian 12 machine; it installs its own tools.
#   1. lintian --fail-on warning on both .debs
#   2. rpm metadata: files, config(noreplace), requires, scriptlets
#   3. systemd-analyze verify (no output allowed) and security (<= 2.0)
#   4. cloud-init schema on docs/examples/*.yaml
#   5. install test: the amd64 .deb into a fresh debootstrap'd Debian 12 root
#      with a policy-rc.d that forbids starting (as in an AMI bake): files,
#      conffiles, enablement, `dualhomed version`, man page, `proto dualhomed`
#      names, remove and purge
#   6. boot test (BOOT_TEST=0 skips it): boot that root with systemd-nspawn
#      --private-network and the IMDS emulator on 169.254.169.254 inside it;
#      the unit must reach active (READY=1) under its full hardening; then
#      the rollout recipes of packaging/rollout run there: the SSM document
#      (install, upgrade, and failing when plan exits 2), the Image Builder
#      component's phases, and the Packer provisioner script
#   7. rpm scriptlets: install and erase the .rpm in that root, offline
# Environment: DEBIAN_MIRROR, ROOT_CACHE (reuse a debootstrap'd root between
# local runs; CI starts clean), BOOT_TEST.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH LC_ALL=C.UTF-8
export DEBIAN_FRONTEND=noninteractive

MAX_EXPOSURE=2.0
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BOOT_TEST=${BOOT_TEST:-1}
WORK=$(mktemp -d /var/tmp/dualhomed-check.XXXXXX)
NSPAWN_PID=
cleanup() {
	if [ -n "$NSPAWN_PID" ]; then kill "$NSPAWN_PID" 2>/dev/null || true; wait "$NSPAWN_PID" 2>/dev/null || true; fi
	rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

start_all=$SECONDS
step_start=$SECONDS
step() { # step NAME: announces NAME and starts timing it (took prints it).
	echo "== $1"
	step_start=$SECONDS
}
took() { echo "   ($(( SECONDS - step_start )) s)"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

step "installing check tools"
need=()
for pkg in lintian rpm debootstrap cloud-init systemd systemd-container iproute2 xz-utils; do
	dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
took

shopt -s nullglob
debs=(dist/dualhomed_*_amd64.deb dist/dualhomed_*_arm64.deb)
rpms=(dist/dualhomed-*.x86_64.rpm dist/dualhomed-*.aarch64.rpm)
[ ${#debs[@]} -eq 2 ] || fail "expected an amd64 and an arm64 .deb in dist/ (run make package)"
[ ${#rpms[@]} -eq 2 ] || fail "expected an x86_64 and an aarch64 .rpm in dist/ (run make package)"
ls -l dist/

step "lintian"
# lintian refuses nothing as root but says so; the message is noise here.
lintian --fail-on warning --display-info "${debs[@]}" 2>&1 | grep -v 'running with root privileges' || true
lintian --fail-on warning "${debs[@]}" >/dev/null 2>&1 || fail "lintian reports warnings or errors"
took

step "rpm metadata"
expect_files=(
	/usr/bin/dualhomed
	/usr/lib/systemd/system/dualhomed.service
	/usr/lib/systemd/system-preset/50-dualhomed.preset
	/usr/lib/systemd/networkd.conf.d/50-dualhomed.conf
	/etc/iproute2/rt_protos.d/dualhomed.conf
	/etc/dualhomed/dualhomed.yaml
	/usr/share/man/man1/dualhomed.1.gz
	/usr/share/licenses/dualhomed/LICENSE
	/usr/share/doc/dualhomed/config.md
	/usr/share/bash-completion/completions/dualhomed
	/usr/share/dualhomed/prometheus/dualhomed.rules.yml
)
for rpmfile in "${rpms[@]}"; do
	echo "-- $rpmfile"
	info=$(rpm -qpil "$rpmfile")
	echo "$info" | sed -n '1,/^Description/p' | grep -E '^(Name|Version|Release|Architecture|License|Size) *:'
	for f in "${expect_files[@]}"; do
		grep -qx -- "$f" <<<"$info" || fail "$rpmfile lacks $f"
	done
	# %config(noreplace): rpm prints file flags c (config) and n (noreplace).
	flags=$(rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpmfile")
	for f in /etc/dualhomed/dualhomed.yaml /etc/iproute2/rt_protos.d/dualhomed.conf; do
		grep -Eq "^c[a-z]*n[a-z]* $f\$|^[a-z]*n[a-z]*c[a-z]* $f\$" <<<"$flags" || fail "$rpmfile: $f is not %config(noreplace): $(grep " $f\$" <<<"$flags")"
	done
	mode=$(rpm -qp --qf '[%{FILEMODES:perms} %{FILENAMES}\n]' "$rpmfile" | awk '$2=="/usr/bin/dualhomed"{print $1}')
	[ "$mode" = "-rwxr-xr-x" ] || fail "$rpmfile: /usr/bin/dualhomed mode $mode"
	requires=$(rpm -qp --requires "$rpmfile")
	grep -qx systemd <<<"$requires" || fail "$rpmfile does not require systemd"
	grep -qx /usr/bin/kill <<<"$requires" || fail "$rpmfile does not require /usr/bin/kill (ExecReload)"
	scripts=$(rpm -qp --scripts "$rpmfile")
	grep -q '^postinstall scriptlet' <<<"$scripts" || fail "$rpmfile: no %post"
	grep -q 'systemctl --no-reload preset dualhomed.service' <<<"$scripts" || fail "$rpmfile: %post does not preset"
	grep -q 'systemctl try-restart dualhomed.service' <<<"$scripts" || fail "$rpmfile: %post does not try-restart on upgrade"
	grep -q 'SYSTEMD_OFFLINE' <<<"$scripts" || fail "$rpmfile: scriptlets ignore SYSTEMD_OFFLINE"
	grep -q '^preuninstall scriptlet' <<<"$scripts" || fail "$rpmfile: no %preun"
	grep -q 'disable --now dualhomed.service' <<<"$scripts" || fail "$rpmfile: %preun does not stop"
	grep -q 'dualhomed cleanup' <<<"$scripts" || fail "$rpmfile: %preun does not clean up"
	grep -q '^postuninstall scriptlet' <<<"$scripts" || fail "$rpmfile: no %postun"
	# Every scriptlet must be valid POSIX sh.
	for s in post preun postun; do
		sh -n "packaging/rpm/$s.sh" || fail "packaging/rpm/$s.sh: syntax"
	done
done
for f in packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm; do sh -n "$f" || fail "$f: syntax"; done
took

step "systemd-analyze security"
report=$(systemd-analyze security --offline=yes systemd/dualhomed.service)
echo "$report" | grep -E '^✗' || true
overall=$(sed -n 's/.*Overall exposure level for dualhomed.service: \([0-9.]*\).*/\1/p' <<<"$report")
[ -n "$overall" ] || fail "no overall exposure level in: $report"
echo "   exposure $overall (limit $MAX_EXPOSURE)"
awk -v e="$overall" -v m="$MAX_EXPOSURE" 'BEGIN{exit !(e <= m)}' || fail "exposure $overall above $MAX_EXPOSURE"
took

step "cloud-init schema"
examples=(docs/examples/*.yaml)
[ ${#examples[@]} -gt 0 ] || fail "no docs/examples/*.yaml"
for ex in "${examples[@]}"; do
	out=$(cloud-init schema --config-file "$ex" 2>&1) || fail "cloud-init schema $ex: $out"
	echo "   $ex: $out"
done
took

step "install test: debootstrap Debian 12 (minbase)"
if [ -n "${ROOT_CACHE:-}" ] && [ -d "$ROOT_CACHE" ]; then
	ROOT=$WORK/root
	cp -a "$ROOT_CACHE" "$ROOT"
	echo "   reusing $ROOT_CACHE"
else
	ROOT=$WORK/root
	debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,iproute2,man-db \
		bookworm "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
		{ tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
	if [ -n "${ROOT_CACHE:-}" ]; then cp -a "$ROOT" "$ROOT_CACHE"; fi
fi
took

step "install test: apt-get install the amd64 .deb (policy-rc.d forbids starting)"
in_root() { chroot "$ROOT" "$@"; }
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
cp "${debs[0]}" "$ROOT/tmp/dualhomed.deb"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
in_root apt-get install -y -qq --no-install-recommends /tmp/dualhomed.deb >"$WORK/install.log" 2>&1 ||
	{ cat "$WORK/install.log"; fail "installing the .deb"; }
if grep -iE 'warning|error' "$WORK/install.log" | grep -v 'policy-rc.d returned 101'; then
	fail "install printed warnings"
fi
for f in /usr/bin/dualhomed /lib/systemd/system/dualhomed.service /etc/dualhomed/dualhomed.yaml \
	/etc/iproute2/rt_protos.d/dualhomed.conf /usr/lib/systemd/networkd.conf.d/50-dualhomed.conf \
	/usr/share/man/man1/dualhomed.1.gz /usr/share/doc/dualhomed/copyright /usr/share/doc/dualhomed/changelog.Debian.gz \
	/usr/share/doc/dualhomed/config.md /usr/share/dualhomed/prometheus/dualhomed.rules.yml; do
	[ -e "$ROOT$f" ] || fail "installed root lacks $f"
done
in_root dpkg-query -W -f='${Conffiles}\n' dualhomed | grep -q /etc/dualhomed/dualhomed.yaml || fail "config is not a conffile"
[ -L "$ROOT/etc/systemd/system/multi-user.target.wants/dualhomed.service" ] || fail "not enabled (no multi-user.target.wants symlink)"
state=$(in_root systemctl is-enabled dualhomed.service || true)
[ "$state" = enabled ] || fail "systemctl is-enabled says $state"
echo "   enabled: $state"
ver=$(in_root dualhomed version) || fail "dualhomed version failed"
echo "   dualhomed version: $ver"
[ -n "$ver" ] || fail "dualhomed version printed nothing"
in_root man -w dualhomed >/dev/null || fail "man dualhomed: no page"
# The shipped units must verify cleanly where they are installed (the binary,
# /bin/kill and the man page exist there); verify exits 0 on warnings.
vout=$(in_root systemd-analyze verify /lib/systemd/system/dualhomed.service 2>&1) || true
[ -z "$vout" ] || fail "systemd-analyze verify: $vout"
echo "   systemd-analyze verify: no output"
# "proto dualhomed": iproute2 in the root reads our rt_protos.d entry
# (in a throwaway network namespace).
names=$(unshare --net chroot "$ROOT" sh -c 'ip link set lo up &&
	ip route add 192.0.2.0/24 dev lo proto 210 table 20000 &&
	ip rule add from 192.0.2.1 lookup 20000 proto 210 pref 20000 &&
	ip route show table 20000; ip rule show pref 20000')
grep -c 'proto dualhomed' <<<"$names" | grep -qx 2 || fail "ip does not name protocol 210: $names"
echo "   ip: $(tr '\n' ';' <<<"$names")"
took

if [ "$BOOT_TEST" = 1 ]; then
	step "boot test: systemd-nspawn --private-network with the IMDS emulator"
	rm -f "$ROOT/usr/sbin/policy-rc.d"
	CGO_ENABLED=0 go build -trimpath -o "$ROOT/usr/local/bin/imds-emulator" ./cmd/imds-emulator
	# Inside the container (its own network namespace): two veth pairs with
	# the MACs of the emulator's example instance play the primary ENI (eth0,
	# VPC 10.0/16) and a secondary ENI from another VPC (eth1, 10.1/16), and
	# the emulator answers on 169.254.169.254:80, ordered before dualhomed as
	# IMDS would be on EC2.
	cat >"$ROOT/usr/local/sbin/fake-enis" <<-'SCRIPT'
	#!/bin/sh
	set -e
	ip link set lo up
	ip addr add 169.254.169.254/32 dev lo
	ip link add eth0 address 02:00:00:00:00:00 type veth peer name vpc-a
	ip link add eth1 address 02:00:00:00:00:01 type veth peer name vpc-b
	for l in eth0 eth1 vpc-a vpc-b; do ip link set "$l" up; done
	ip addr add 10.0.0.10/20 dev eth0
	ip route add default via 10.0.0.1 dev eth0 onlink
	# Strict, as an administrator may have set it: dualhomed makes it loose
	# and `dualhomed cleanup` on removal must put strict back.
	echo 1 >/proc/sys/net/ipv4/conf/eth1/rp_filter
	SCRIPT
	chmod 755 "$ROOT/usr/local/sbin/fake-enis"
	cat >"$ROOT/etc/systemd/system/imds-emulator.service" <<-'UNIT'
	[Unit]
	Description=IMDS emulator and fake ENIs for the dualhomed boot test
	DefaultDependencies=no
	Before=dualhomed.service
	[Service]
	ExecStartPre=/usr/local/sbin/fake-enis
	ExecStart=/usr/local/bin/imds-emulator --listen 169.254.169.254:80 --example 2,1,0,0,1
	[Install]
	WantedBy=multi-user.target
	UNIT
	in_root systemctl enable imds-emulator.service >/dev/null 2>&1
	# CAP_BPF and the bpf() syscall let systemd in the container attach the
	# unit's IPAddressDeny=/IPAddressAllow= firewall (nspawn withholds both by
	# default), so the daemon reaches IMDS through its real allow list.
	systemd-nspawn -q --register=no --keep-unit --private-network \
		--capability=CAP_BPF --system-call-filter=bpf -D "$ROOT" -b \
		>"$WORK/boot.log" 2>&1 </dev/null &
	NSPAWN_PID=$!
	# The container's PID 1: the child of nspawn that has become systemd
	# (nspawn's short-lived setup child comes first).
	leader=
	for _ in $(seq 200); do
		for pid in $(pgrep -P "$NSPAWN_PID" || true); do
			if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = systemd ]; then leader=$pid; fi
		done
		[ -n "$leader" ] && break
		sleep 0.1
	done
	[ -n "$leader" ] || { cat "$WORK/boot.log"; fail "container did not start"; }
	in_ct() { nsenter -t "$leader" -a "$@"; }
	# Wait for the boot to settle, then for the unit to leave activating
	# (its own start timeout bounds that: READY=1 at the latest in degraded mode).
	state=
	for _ in $(seq 90); do
		state=$(in_ct systemctl is-active dualhomed.service 2>/dev/null || true)
		case $state in active|failed) break ;; esac
		sleep 1
	done
	in_ct systemctl status --no-pager --lines=0 dualhomed.service || true
	if [ "$state" != active ]; then
		in_ct journalctl -b --no-pager -u dualhomed.service | tail -30 || true
		fail "dualhomed.service is $state in the booted container, not active"
	fi
	show=$(in_ct systemctl show -p NRestarts -p StatusText -p User dualhomed.service)
	echo "$show" | sed 's/^/   /'
	grep -qx 'NRestarts=0' <<<"$show" || fail "dualhomed restarted"
	# IPAccounting= counts through the same cgroup BPF program that enforces
	# IPAddressDeny=: a byte count proves the firewall is attached and that
	# IMDS answers passed it.
	ingress=$(in_ct systemctl show -p IPIngressBytes --value dualhomed.service)
	if ! [[ $ingress =~ ^[0-9]+$ ]] || [ "$ingress" -eq 0 ]; then
		fail "no IP accounting ($ingress): the unit's BPF firewall is not active in the container"
	fi
	echo "   IP firewall active: $ingress bytes from IMDS passed IPAddressAllow="
	# The hardened daemon configured the secondary ENI: its address, its
	# table (20000 + device number 1) with the VPC router as default gateway,
	# and a rule for its address, all with protocol dualhomed.
	routing=""
	for _ in $(seq 20); do
		routing=$(in_ct sh -c 'ip -4 addr show dev eth1; ip -4 rule show; ip -4 route show table 20001' 2>&1 || true)
		grep -q 'default via 10.1.0.1 dev eth1 proto dualhomed' <<<"$routing" &&
			grep -q 'from 10.1.0.10 lookup 20001 proto dualhomed' <<<"$routing" && break
		sleep 0.5
	done
	echo "$routing" | sed 's/^/   /'
	grep -q 'inet 10.1.0.10/20' <<<"$routing" || fail "secondary ENI address not added"
	grep -q 'default via 10.1.0.1 dev eth1 proto dualhomed' <<<"$routing" || fail "no default route in table 20001"
	grep -q 'from 10.1.0.10 lookup 20001 proto dualhomed' <<<"$routing" || fail "no source rule for the secondary ENI"
	rp_filter() { in_ct cat /proc/sys/net/ipv4/conf/eth1/rp_filter; }
	[ "$(rp_filter)" = 2 ] || fail "eth1's rp_filter is $(rp_filter), not 2 (loose)"
	in_ct systemctl reload dualhomed.service || fail "systemctl reload"
	sleep 1
	state=$(in_ct systemctl is-active dualhomed.service || true)
	[ "$state" = active ] || fail "dualhomed.service is $state after reload"
	echo "   active with READY=1, secondary ENI configured, reload OK"

	# Upgrade (same package again: postinst configure <old-version>) must
	# restart the running daemon, which stays active.
	pid_before=$(in_ct systemctl show -p MainPID --value dualhomed.service)
	# (the container has its own /tmp)
	cp "${debs[0]}" "$ROOT/root/dualhomed.deb"
	in_ct dpkg -i /root/dualhomed.deb >"$WORK/upgrade.log" 2>&1 || { cat "$WORK/upgrade.log"; fail "upgrade"; }
	state=
	for _ in $(seq 60); do
		state=$(in_ct systemctl is-active dualhomed.service 2>/dev/null || true)
		[ "$state" = activating ] || break
		sleep 0.5
	done
	pid_after=$(in_ct systemctl show -p MainPID --value dualhomed.service)
	[ "$state" = active ] || fail "dualhomed.service is $state after upgrade"
	[ "$pid_before" != "$pid_after" ] || fail "upgrade did not restart the daemon (MainPID $pid_after)"
	echo "   upgrade: restarted (MainPID $pid_before -> $pid_after), active"

	# Removal on a running system stops the daemon and runs `dualhomed
	# cleanup`: our rule, routes and address are gone, the primary untouched.
	in_ct apt-get remove -y -qq dualhomed >"$WORK/remove-booted.log" 2>&1 || { cat "$WORK/remove-booted.log"; fail "remove in the container"; }
	state=$(in_ct systemctl is-active dualhomed.service 2>/dev/null || true)
	[ "$state" != active ] || fail "dualhomed.service still active after removal"
	left=$(in_ct sh -c 'ip -4 rule show; ip -4 route show table 20001; ip -4 addr show dev eth1' 2>&1 || true)
	if grep -Eq 'lookup 20001|10\.1\.0\.10' <<<"$left"; then
		echo "$left"; fail "dualhomed cleanup left state behind on removal"
	fi
	in_ct ip -4 addr show dev eth0 | grep -q 'inet 10.0.0.10/20' || fail "removal touched the primary ENI"
	# The original was recorded by the first daemon, kept through the
	# upgrade's restart and prerm's stop (RuntimeDirectoryPreserve=yes).
	[ "$(rp_filter)" = 1 ] || fail "eth1's rp_filter is $(rp_filter) after removal, not its original 1"
	! in_ct test -e /run/dualhomed || fail "a successful cleanup on removal left /run/dualhomed behind"
	echo "   remove: stopped, cleanup removed rule, routes and address and put rp_filter 1 back, then its records; primary untouched"

	# Reinstallation after a remove (the package is in config-files state, so
	# postinst gets the removed version as for an upgrade) starts the enabled
	# daemon again, then the package is removed again for the recipes below.
	in_ct dpkg -i /root/dualhomed.deb >"$WORK/reinstall.log" 2>&1 || { cat "$WORK/reinstall.log"; fail "reinstall after remove"; }
	state=
	for _ in $(seq 60); do
		state=$(in_ct systemctl is-active dualhomed.service 2>/dev/null || true)
		[ "$state" = activating ] || break
		sleep 0.5
	done
	[ "$state" = active ] || fail "dualhomed.service is $state after reinstalling a removed package"
	# It reads the records root's cleanup rewrote in the kept directory
	# (within the daemon's own bounds: eth1's address waits for dhcp_grace,
	# a failed reconcile is retried after 5 s).
	# (ip's output is read whole first: `ip | grep -q` fails under pipefail
	# when grep exits before ip has written its last line.)
	rules=
	for _ in $(seq 60); do
		rules=$(in_ct ip -4 rule show 2>&1 || true)
		grep -q 'from 10.1.0.10 lookup 20001 proto dualhomed' <<<"$rules" && break
		sleep 0.5
	done
	grep -q 'from 10.1.0.10 lookup 20001 proto dualhomed' <<<"$rules" ||
		{ echo "$rules"; in_ct journalctl -b --no-pager -u dualhomed.service | tail -40 | cut -c1-300; fail "reinstalled after a remove, dualhomed did not configure eth1"; }
	in_ct apt-get remove -y -qq dualhomed >"$WORK/remove-booted.log" 2>&1 || { cat "$WORK/remove-booted.log"; fail "second remove in the container"; }
	echo "   reinstall after remove: active again, eth1 configured"

	# Rollout recipes (packaging/rollout, docs/fleet.md): each step as the SSM
	# Agent or AWSTOE would run it (cmd/internal/rollout writes them out with
	# the parameters substituted), run in this container against the IMDS
	# emulator. The package is removed at this point.
	CGO_ENABLED=0 go build -trimpath -o "$WORK/rollout" ./cmd/internal/rollout
	recipe() { # recipe DIR DOCUMENT NAME=VALUE...: writes DOCUMENT's steps into $ROOT/root/recipes/DIR
		local dir=$1 doc=$2; shift 2
		"$WORK/rollout" extract -out "$ROOT/root/recipes/$dir" "${@/#/-param=}" "$doc" >/dev/null
	}
	run_step() { # run_step SCRIPT LOG: runs a step in the container; its status, output in LOG
		in_ct "$1" >"$2" 2>&1
	}
	rule_ok() { # the secondary ENI's rule appears within 10 s
		for _ in $(seq 20); do
			in_ct ip -4 rule show | grep -q 'from 10.1.0.10 lookup 20001 proto dualhomed' && return 0
			sleep 0.5
		done
		in_ct ip -4 rule show
		in_ct journalctl -b --no-pager -u dualhomed.service | tail -20
		return 1
	}
	ssm_step=01-main-installDualhomedAndCheckPlan.sh

	# SSM: install on a running instance.
	recipe ssm-install packaging/rollout/ssm-install-dualhomed.json PackageSource=/root/dualhomed.deb PlanWaitSeconds=30
	run_step "/root/recipes/ssm-install/$ssm_step" "$WORK/ssm-install.log" ||
		{ cat "$WORK/ssm-install.log"; fail "SSM document: install failed"; }
	grep -q '^in sync' "$WORK/ssm-install.log" || { cat "$WORK/ssm-install.log"; fail "SSM document: no plan in its output"; }
	rule_ok || fail "SSM document: installed, but the secondary ENI is not configured"
	echo "   SSM document, install: succeeded (plan in sync, service active, ENI configured)"

	# SSM: upgrade to a newer version (the same package, revision bumped).
	dpkg-deb -R "${debs[0]}" "$WORK/next"
	sed -i 's/^Version: .*/&.1/' "$WORK/next/DEBIAN/control"
	next_version=$(sed -n 's/^Version: //p' "$WORK/next/DEBIAN/control")
	dpkg-deb -b -Zxz "$WORK/next" "$ROOT/root/dualhomed-next.deb" >/dev/null
	pid_before=$(in_ct systemctl show -p MainPID --value dualhomed.service)
	recipe ssm-upgrade packaging/rollout/ssm-install-dualhomed.json PackageSource=/root/dualhomed-next.deb PlanWaitSeconds=30
	run_step "/root/recipes/ssm-upgrade/$ssm_step" "$WORK/ssm-upgrade.log" ||
		{ cat "$WORK/ssm-upgrade.log"; fail "SSM document: upgrade failed"; }
	installed=$(in_ct dpkg-query -W -f='${Version}' dualhomed)
	[ "$installed" = "$next_version" ] || fail "SSM document: $installed installed after the upgrade, not $next_version"
	pid_after=$(in_ct systemctl show -p MainPID --value dualhomed.service)
	[ "$pid_before" != "$pid_after" ] || fail "SSM document: the upgrade did not restart the daemon"
	rule_ok || fail "SSM document: secondary ENI not configured after the upgrade"
	echo "   SSM document, upgrade to $next_version: succeeded (daemon restarted, plan in sync)"

	# SSM: plan exits 2 (daemon disabled and stopped, so the document leaves
	# it alone; one of its rules deleted): the command fails and prints the plan.
	in_ct systemctl disable --now dualhomed.service 2>/dev/null
	in_ct ip rule del from 10.1.0.10 lookup 20001
	recipe ssm-pending packaging/rollout/ssm-install-dualhomed.json PackageSource=/root/dualhomed-next.deb PlanWaitSeconds=3
	if run_step "/root/recipes/ssm-pending/$ssm_step" "$WORK/ssm-pending.log"; then
		cat "$WORK/ssm-pending.log"; fail "SSM document succeeded with changes pending"
	fi
	grep -q 'dualhomed plan exited 2' "$WORK/ssm-pending.log" && grep -q '+ rule from 10.1.0.10' "$WORK/ssm-pending.log" ||
		{ cat "$WORK/ssm-pending.log"; fail "SSM document: the failure does not say plan exited 2, or lacks the plan"; }
	echo "   SSM document, plan exit 2: failed, printing the pending rule"
	in_ct systemctl enable --now dualhomed.service 2>/dev/null
	rule_ok || fail "the restarted daemon did not restore the rule"

	# Image Builder component: build and validate on a "build instance"
	# without the package, then what an instance launched from the image
	# does: the enabled service starts, and the test phase runs.
	in_ct apt-get purge -y -qq dualhomed >"$WORK/purge-booted.log" 2>&1 || { cat "$WORK/purge-booted.log"; fail "purge in the container"; }
	! in_ct test -e /run/dualhomed || fail "purge left /run/dualhomed behind"
	mkdir -p "$ROOT/etc/cloud/cloud.cfg.d"
	recipe imagebuilder packaging/rollout/imagebuilder-dualhomed.yml PackageSource=/root/dualhomed.deb
	for s in 01-build-InstallEnabledNotStarted 02-validate-InstalledEnabledNotRunning; do
		run_step "/root/recipes/imagebuilder/$s.sh" "$WORK/$s.log" || { cat "$WORK/$s.log"; fail "Image Builder component: $s failed"; }
	done
	[ "$(in_ct systemctl is-enabled dualhomed.service)" = enabled ] || fail "Image Builder component: service not enabled"
	! in_ct systemctl is-active --quiet dualhomed.service || fail "Image Builder component: build started the service"
	[ ! -e "$ROOT/usr/sbin/policy-rc.d" ] || fail "Image Builder component: left policy-rc.d behind"
	grep -q 'apply_full_imds_network_config: false' "$ROOT/etc/cloud/cloud.cfg.d/99-dualhomed.cfg" ||
		fail "Image Builder component: cloud-init setting not written"
	in_ct systemctl start dualhomed.service
	s=03-test-RunningAndInSync
	run_step "/root/recipes/imagebuilder/$s.sh" "$WORK/$s.log" || { cat "$WORK/$s.log"; fail "Image Builder component: $s failed"; }
	grep -q '^in sync' "$WORK/$s.log" || { cat "$WORK/$s.log"; fail "Image Builder component: no plan in the test phase's output"; }
	in_ct systemctl stop dualhomed.service
	if run_step "/root/recipes/imagebuilder/$s.sh" "$WORK/$s-stopped.log"; then
		cat "$WORK/$s-stopped.log"; fail "Image Builder component: test phase passed with the service stopped"
	fi
	echo "   Image Builder component: build (enabled, not started, cloud-init setting), validate, test pass; test fails with the service stopped"

	# Packer: the shell provisioner's script, as root, on a build instance
	# without the package.
	in_ct apt-get purge -y -qq dualhomed >"$WORK/purge-booted.log" 2>&1 || { cat "$WORK/purge-booted.log"; fail "purge in the container"; }
	cp packaging/rollout/packer/bake-dualhomed.sh "$ROOT/root/recipes/"
	in_ct env DUALHOMED_PACKAGE=/root/dualhomed.deb /root/recipes/bake-dualhomed.sh >"$WORK/packer.log" 2>&1 ||
		{ cat "$WORK/packer.log"; fail "Packer provisioner script failed"; }
	[ "$(in_ct systemctl is-enabled dualhomed.service)" = enabled ] || fail "Packer provisioner script: service not enabled"
	! in_ct systemctl is-active --quiet dualhomed.service || fail "Packer provisioner script: started the service"
	echo "   Packer provisioner script: installed enabled, not started"

	in_ct systemctl poweroff >/dev/null 2>&1 || true
	wait "$NSPAWN_PID" 2>/dev/null || true
	NSPAWN_PID=
	took
fi

step "install test: remove and purge"
# Removed already in the booted container when the boot test ran; removing in
# the chroot, prerm skips `dualhomed cleanup` (it would act on the host); the
# throwaway network namespace makes sure of that here.
if in_root dpkg -s dualhomed 2>/dev/null | grep -q '^Status: install ok installed'; then
	unshare --net chroot "$ROOT" apt-get remove -y -qq dualhomed >"$WORK/remove.log" 2>&1 ||
		{ cat "$WORK/remove.log"; fail "apt-get remove"; }
fi
[ ! -e "$ROOT/usr/bin/dualhomed" ] || fail "binary left after remove"
[ -e "$ROOT/etc/dualhomed/dualhomed.yaml" ] || fail "conffile gone after remove (only purge removes it)"
in_root apt-get purge -y -qq dualhomed >"$WORK/purge.log" 2>&1 || { cat "$WORK/purge.log"; fail "apt-get purge"; }
[ ! -e "$ROOT/etc/dualhomed/dualhomed.yaml" ] || fail "conffile left after purge"
[ ! -e "$ROOT/etc/systemd/system/multi-user.target.wants/dualhomed.service" ] || fail "enablement symlink left after purge"
took

step "rpm scriptlets: install and erase the x86_64 .rpm in the same root"
# No RPM distribution is reachable from CI, but the scriptlets are plain sh
# around systemctl: run them in the Debian root (rpm --root runs them
# chrooted; --nodeps because the root's packages are in dpkg's database).
# Offline (no running systemd): preset enables through our preset file,
# nothing starts, and erase disables without running cleanup.
rpm_in_root() { unshare --net rpm --root "$ROOT" --nodeps "$@" 2>&1 | grep -v -e 'use Alien' -e 'you know what you are doing' || true; }
rpm_in_root -i "${rpms[0]}"
rpm --root "$ROOT" -q dualhomed >/dev/null 2>&1 || fail "rpm install into the root failed"
state=$(in_root systemctl is-enabled dualhomed.service || true)
[ "$state" = enabled ] || fail "rpm %post: systemctl is-enabled says $state (preset file not applied)"
in_root dualhomed version >/dev/null || fail "dualhomed version (rpm)"
rpm_in_root -e dualhomed
[ ! -e "$ROOT/usr/bin/dualhomed" ] || fail "rpm -e left the binary"
[ ! -e "$ROOT/etc/systemd/system/multi-user.target.wants/dualhomed.service" ] || fail "rpm %preun did not disable"
echo "   %post enabled it via the preset, %preun disabled it"
took

echo "== package-check passed in $(( SECONDS - start_all )) s"
