# dualhomed %postun ($1: 0 = removal, 1 = upgrade): forget the removed unit.
if [ "$1" -eq 0 ] && [ "${SYSTEMD_OFFLINE:-0}" != "1" ] && [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
