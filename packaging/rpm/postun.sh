# dualhomed %postun ($1: 0 = removal, 1 = upgrade): forget the removed unit
# and delete the daemon's state directory, which the unit keeps when it stops
# (RuntimeDirectoryPreserve=yes) so that %preun's `dualhomed cleanup`, run
# after the stop, finds the recorded originals and restores them.
if [ "$1" -eq 0 ]; then
	rm -rf /run/dualhomed
fi
if [ "$1" -eq 0 ] && [ "${SYSTEMD_OFFLINE:-0}" != "1" ] && [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
