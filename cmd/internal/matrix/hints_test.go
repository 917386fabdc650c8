package matrix

import (
	"fmt"
	"github.com/dualhomed/dualhomed/imds"
	"regexp"
	"strings"
)

type imdsENI = imds.ENI

var (
	// `create FILE containing `[Network]` and `KEY=no`, then `CMD``
	networkdHint = regexp.MustCompile("create (\\S+) containing `\\[Network\\]` and `(\\w+)=no`, then `([^`]+)`")
	// a hint's closing command: "..., then `ip rule del ...`"
	thenCommand = regexp.MustCompile("then (`[^`]+`)$")
	// a hint's `systemctl mask ...`
	maskCommand = regexp.MustCompile("`(systemctl mask [^`]+)`")
)

// follow turns a warning's hint into what an operator would type, in this
// stack's terms. ok is false when the hint gives nothing to act on.
func (r *run) follow(w warningView) (script string, ok bool) {
	link := ""
	for _, e := range r.w.enis {
		if strings.EqualFold(e.mac, w.ENI) {
			link = e.link
		}
	}
	cmd := ""
	if m := thenCommand.FindStringSubmatch(w.Hint); m != nil {
		cmd = strings.Trim(m[1], "`")
	}
	switch {
	case networkdHint.MatchString(w.Hint):
		m := networkdHint.FindStringSubmatch(w.Hint)
		return fmt.Sprintf(`mkdir -p "$(dirname %[1]s)" && { grep -qx '\[Network\]' %[1]s 2>/dev/null || echo '[Network]' >>%[1]s; } && echo '%[2]s=no' >>%[1]s && %[3]s`, m[1], m[2], m[3]), true
	case strings.HasPrefix(w.Message, defaultViaSecondary) && link != "":
		return r.noGatewayOn(link, w.ENI), true
	case strings.Contains(w.Hint, "amazon-ec2-net-utils") && maskCommand.MatchString(w.Hint) && cmd != "":
		// docs/coexistence.md's recipe (daemon change #4).
		return maskCommand.FindStringSubmatch(w.Hint)[1] + " && " + cmd, true
	case strings.Contains(w.Hint, "amazon-ec2-net-utils manages this interface") && cmd != "":
		// As written, with Debian's package manager for dnf.
		return "apt-get remove -y -q amazon-ec2-net-utils && " + cmd, true
	case strings.Contains(w.Hint, "cloud-init/netplan routing policy") && cmd != "":
		return `printf 'network: {config: disabled}\n' >/etc/cloud/cloud.cfg.d/99-disable-network-config.cfg && ` +
			`python3 -c 'import yaml,glob
for f in glob.glob("/etc/netplan/*.yaml"):
    y = yaml.safe_load(open(f)) or {}
    for e in (y.get("network", {}).get("ethernets") or {}).values():
        e.pop("routing-policy", None); e.pop("routes", None)
    yaml.safe_dump(y, open(f, "w"))' && netplan apply && (` + cmd + ` || true)`, true
	}
	return "", false
}

// noGatewayOn stops the stack's DHCP client from putting link's gateway
// (the ENI with that MAC) into main, the way the hint says for this stack.
func (r *run) noGatewayOn(link, mac string) string {
	switch {
	case strings.HasPrefix(r.s.name, "NetworkManager"):
		return fmt.Sprintf(`c=$(nmcli -g GENERAL.CONNECTION device show %[1]s) && nmcli connection modify "$c" ipv4.never-default yes && nmcli connection up "$c"`, link)
	case strings.HasPrefix(r.s.name, "ifupdown"):
		return fmt.Sprintf(`printf '[ "$interface" = %[1]s ] && unset new_routers\n' >/etc/dhcp/dhclient-enter-hooks.d/no-gateway-%[1]s && ifdown %[1]s && ifup %[1]s`, link)
	case strings.HasPrefix(r.s.name, "netplan"), strings.HasPrefix(r.s.name, "cloud-init"):
		return fmt.Sprintf(`printf 'network:\n  version: 2\n  ethernets:\n    %[1]s:\n      dhcp4-overrides: {use-routes: false}\n' >/etc/netplan/90-no-gateway-%[1]s.yaml && chmod 600 /etc/netplan/90-no-gateway-%[1]s.yaml && netplan apply`, link)
	default: // systemd-networkd: the link's own .network file matched by MAC, with UseGateway=no
		return fmt.Sprintf(`f=$(networkctl status %[1]s | sed -n 's/.*Network File: //p') && `+
			`sed -e '/^\[Match\]/,/^\[/{/^[A-Za-z]*=/d}' -e 's/^\[Match\]/[Match]\nMACAddress=%[2]s/' "$f" >/etc/systemd/network/10-no-gateway-%[1]s.network && `+
			`printf '\n[DHCPv4]\nUseGateway=no\n' >>/etc/systemd/network/10-no-gateway-%[1]s.network && networkctl reload && networkctl reconfigure %[1]s`, link, mac)
	}
}
