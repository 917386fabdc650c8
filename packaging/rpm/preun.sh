# dualhomed %preun ($1: 0 = removal, 1 = upgrade).
# Shell equivalent of %systemd_preun, then remove the routes, rules and tables
# the daemon owns. Nothing happens on upgrade.
in_host_root() {
	[ "$(stat -Lc %d:%i / 2>/dev/null)" = "$(stat -Lc %d:%i /proc/1/root 2>/dev/null)" ]
}

if [ "$1" -eq 0 ]; then
	if [ "${SYSTEMD_OFFLINE:-0}" != "1" ] && [ -d /run/systemd/system ]; then
		systemctl --no-reload disable --now dualhomed.service >/dev/null 2>&1 || :
	else
		systemctl --no-reload disable dualhomed.service >/dev/null 2>&1 || :
	fi
	if [ "${SYSTEMD_OFFLINE:-0}" != "1" ] && in_host_root && [ -x /usr/bin/dualhomed ]; then
		# The records in /run/dualhomed (kept by the stopped unit) are what
		# cleanup restored from: once it succeeded nothing needs them; after
		# a failure they stay for a manual `dualhomed cleanup`.
		if /usr/bin/dualhomed cleanup; then
			rm -rf /run/dualhomed
		else
			echo "dualhomed: cleanup failed; run 'dualhomed cleanup' by hand" >&2
		fi
	fi
fi
exit 0
