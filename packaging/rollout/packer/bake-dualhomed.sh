#!/bin/sh
# Bakes dualhomed into an image being built (Packer's shell provisioner runs
# it as root on the build instance; see dualhomed.pkr.hcl and docs/fleet.md):
# installs the package enabled but not started, switches off cloud-init's and
# amazon-ec2-net-utils' secondary-ENI routing (docs/ami.md), and checks that
# the service is enabled and not running.
# DUALHOMED_PACKAGE: the absolute path of a .deb or .rpm on the build
# instance, or a package of its apt or dnf repositories (default: dualhomed).
# packaging/check.sh runs this script in its booted Debian 12 container.
set -eu
src=${DUALHOMED_PACKAGE:-dualhomed}

if command -v apt-get >/dev/null 2>&1; then
	# The package enables the service; policy-rc.d keeps it from starting on
	# the build instance, where it would configure that instance's ENIs.
	printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
	chmod 755 /usr/sbin/policy-rc.d
	trap 'rm -f /usr/sbin/policy-rc.d' EXIT
	case $src in /*) ;; *) apt-get update -q ;; esac
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$src"
elif command -v dnf >/dev/null 2>&1; then
	SYSTEMD_OFFLINE=1 dnf -y install "$src"
else
	echo "FAILED: neither apt-get nor dnf found" >&2
	exit 1
fi

# User data would set these from the second boot only.
if [ -d /etc/cloud/cloud.cfg.d ]; then
	printf 'datasource:\n  Ec2:\n    apply_full_imds_network_config: false\n' \
		>/etc/cloud/cloud.cfg.d/99-dualhomed.cfg
fi
if systemctl cat policy-routes@.service >/dev/null 2>&1; then
	systemctl mask policy-routes@.service refresh-policy-routes@.service refresh-policy-routes@.timer
fi

dualhomed version
state=$(systemctl is-enabled dualhomed.service || true)
if [ "$state" != enabled ]; then
	echo "FAILED: dualhomed.service is $state, not enabled" >&2
	exit 1
fi
if systemctl is-active --quiet dualhomed.service; then
	echo "FAILED: dualhomed.service runs on the build instance" >&2
	exit 1
fi
echo "dualhomed installed, enabled for the next boot, not running"
