# dualhomed %post ($1: 1 = installation, 2 or more = upgrade).
# Shell equivalent of %systemd_post plus a start on installation and
# %systemd_postun_with_restart's try-restart on upgrade (done here, in the new
# package, so it does not depend on the old package's scriptlets).
# The preset file we ship enables the unit unless an administrator's preset
# says otherwise. SYSTEMD_OFFLINE=1 (image builds) or no running systemd:
# only the symlinks are made, nothing is started.
online=1
if [ "${SYSTEMD_OFFLINE:-0}" = "1" ] || [ ! -d /run/systemd/system ]; then
	online=0
fi

if [ "$1" -eq 1 ]; then
	systemctl --no-reload preset dualhomed.service >/dev/null 2>&1 || :
	if [ "$online" = 1 ]; then
		systemctl daemon-reload >/dev/null 2>&1 || :
		if systemctl --quiet is-enabled dualhomed.service 2>/dev/null; then
			systemctl start dualhomed.service >/dev/null 2>&1 || :
		fi
	fi
elif [ "$online" = 1 ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	systemctl try-restart dualhomed.service >/dev/null 2>&1 || :
fi
exit 0
