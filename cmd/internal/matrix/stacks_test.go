package matrix

import (
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
)

// stack is one column of the matrix: a network stack of an EC2 image, as
// its packages configure it, plus the configuration under test.
type stack struct {
	name string
	// files are written into the root before its first boot (path: content);
	// a content of "@/dev/null" masks (a symlink to /dev/null).
	files map[string]string
	// enable lists the units `systemctl enable` turns on in the root.
	enable []string
	// afterInstall runs in the booted container right after dualhomed's
	// installation (the variant's own configuration of dualhomed).
	afterInstall string
	// units are the stack's journal units (the fight check reads them), and
	// reconfig matches their messages that mean a link was (re)configured.
	units    []string
	reconfig *regexp.Regexp
	// restart is the stack's own restart and reload, one shell line each.
	restart []string
	// warnings match the `dualhomed status` warnings this configuration
	// deserves in its steady state (each must appear, nothing else may).
	warnings []string
	// limits names the assertions this configuration's stack cannot pass
	// whatever dualhomed does, with the reason; another configuration of the
	// same stack shows the fix.
	limits map[string]string
	// tracksIMDSIPs: the stack reads the ENIs' secondary IPs from IMDS
	// itself and adds and removes them (with its own rules) within
	// tracksWithin; the secondary IP step waits for it both ways.
	tracksIMDSIPs bool
	// hotAttachUnmanaged: nothing runs DHCP on a hot-attached ENI.
	hotAttachUnmanaged bool
	// udev holds the RUN+= commands of the stack's net udev rules, which
	// the matrix-udev stand-in runs when a link appears ("add") or goes.
	udevAdd, udevRemove string
}

// networkdReconfig matches what systemd-networkd logs when it configures a
// link again or fails to. A lease renewal logs nothing; "Could not set
// hostname" (hostnamed slow to start) is not about the link's objects.
const networkdReconfig = `Configuring with|Reconfiguring|Link UP|Link DOWN|Gained carrier|Lost carrier|DHCPv4 address .* acquired|DHCP lease lost|Could not (set|add|remove|drop) (address|route|nexthop|routing policy rule)|Failed to (configure|set up|drop|remove)`

// networkdDHCP is DHCP on every ENI, as a cloud image's networkd config does.
const networkdDHCP = `# matrix: DHCP on every ENI, as cloud images configure systemd-networkd.
[Match]
Name=eth*

[Network]
DHCP=ipv4
`

// The warnings networkd deserves without the packaged drop-in.
var networkdSettingWarnings = []string{
	`systemd-networkd is running without ManageForeignRoutingPolicyRules=no`,
	`systemd-networkd is running without ManageForeignRoutes=no`,
}

// overlapWarning is deserved in every configuration: VPC C reuses VPC A's
// CIDR, so dualhomed routes neither through eth2 in main. Its hint asks for
// nothing unless narrower routes are wanted: it stays after the hints step.
const overlapWarning = `not routing 10.0.0.0/16 of vpc-0cccccccccccccccc through eth2 in the main table: it overlaps`

// defaultViaSecondary is the warning for a DHCP default route on a secondary ENI in main.
const defaultViaSecondary = `main table has a default route through secondary ENI`

// secondaryGatewayLimit is the limit of a stack with DHCP on every ENI and
// no per-ENI configuration: each secondary ENI's gateway goes into main at
// the primary's metric, and the last lease wins all outbound traffic, the
// primary ENI's replies included. The warning above gives the per-ENI fix,
// which the hints step applies.
var secondaryGatewayLimit = map[string]string{
	"replies via the primary ENI": "DHCP on every ENI puts a secondary ENI's gateway ahead of the primary's in main (fixed per ENI by the warning's hint)",
}

// udevStandIn replaces udev, which cannot run in a container: it runs the
// stack's net rules' RUN+= commands (/etc/matrix-udev/{add,remove}) for
// every ethN at boot (coldplug) and whenever one appears or goes.
const udevStandIn = `#!/bin/bash
# matrix-udev: stands in for udev in the matrix container (see stacks_test.go).
run() { [ -x /etc/matrix-udev/$1 ] && INTERFACE=$2 ACTION=$1 /etc/matrix-udev/$1 "$2"; logger -t matrix-udev "$1 $2"; }
declare -A seen
coproc MON { exec ip -o monitor link; }
for l in /sys/class/net/eth*; do [ -e "$l" ] || continue; n=${l##*/}; seen[$n]=1; run add "$n"; done
while read -r line <&"${MON[0]}"; do
	case $line in
	Deleted*) n=$(echo "$line" | awk '{print $3}'); n=${n%:}; n=${n%%@*}
		[[ $n == eth* ]] && { unset "seen[$n]"; run remove "$n"; } ;;
	*) n=$(echo "$line" | awk '{print $2}'); n=${n%:}; n=${n%%@*}
		[[ $n == eth* && -z ${seen[$n]} ]] && { seen[$n]=1; run add "$n"; } ;;
	esac
done
`

// udevadmShim stands in for `udevadm trigger`, which asks udevd to replay
// "change" events and fails in a container (no udevd, /sys read-only):
// `netplan apply` stops there. No net rule of the matrix's stacks acts on
// "change", and netplan apply reconfigures the links itself right after
// (networkctl reload and reconfigure); everything else is udevadm's.
const udevadmShim = `#!/bin/sh
# matrix: udev cannot run in a container (see stacks_test.go).
[ "$1" = trigger ] && exit 0
exec /usr/bin/udevadm "$@"
`

const udevStandInUnit = `[Unit]
Description=matrix: udev stand-in for net links (udev cannot run in a container)
DefaultDependencies=no
After=local-fs.target systemd-journald.socket
Before=network-pre.target sysinit.target
Wants=network-pre.target

[Service]
ExecStart=/usr/local/sbin/matrix-udev

[Install]
WantedBy=sysinit.target
`

// cloudInitRecommended is docs/coexistence.md's cloud-init configuration:
// cloud-init configures the primary ENI only.
const cloudInitRecommended = `# dualhomed: cloud-init configures the primary ENI only (docs/coexistence.md)
datasource:
  Ec2:
    apply_full_imds_network_config: false
`

// netplanSecondaryENIs brings up every secondary ENI, hot-attached ones
// included, with DHCP but without its gateway (cloud-init with the
// configuration above leaves them alone). On an instance whose ENIs are named
// ens5, ens6, ..., the primary is ens5: match "ens[6-9]*" and so on.
const netplanSecondaryENIs = `# dualhomed: DHCP on the secondary ENIs, their gateways out of main (docs/coexistence.md)
network:
  version: 2
  ethernets:
    secondary-enis:
      match: {name: "eth[1-9]*"}
      dhcp4: true
      dhcp4-overrides: {use-routes: false}
`

func stacks() []stack {
	networkd := stack{
		name:     "networkd",
		files:    map[string]string{"/etc/systemd/network/50-matrix-dhcp.network": networkdDHCP},
		enable:   []string{"systemd-networkd.service", "systemd-networkd-wait-online.service"},
		units:    []string{"systemd-networkd.service"},
		reconfig: regexp.MustCompile(networkdReconfig),
		restart: []string{"systemctl restart systemd-networkd", "networkctl reload",
			"networkctl reconfigure eth0 eth1 eth2"},
		warnings: []string{defaultViaSecondary},
		limits:   secondaryGatewayLimit,
	}
	noDropIn := networkd
	noDropIn.name = "networkd, no drop-in"
	noDropIn.afterInstall = "ln -sf /dev/null /etc/systemd/networkd.conf.d/50-dualhomed.conf"
	noDropIn.files = map[string]string{"/etc/systemd/network/50-matrix-dhcp.network": networkdDHCP,
		"/etc/systemd/networkd.conf.d/.keep": ""}
	noDropIn.warnings = append([]string{defaultViaSecondary}, networkdSettingWarnings...)

	netplan := stack{
		name: "netplan",
		files: map[string]string{"/etc/netplan/50-matrix.yaml": `# matrix: DHCP on every ENI, rendered to systemd-networkd (Ubuntu's way).
network:
  version: 2
  renderer: networkd
  ethernets:
    eth0: {match: {name: eth0}, dhcp4: true}
    eth1: {match: {name: eth1}, dhcp4: true}
    eth2: {match: {name: eth2}, dhcp4: true}
    eth3: {match: {name: eth3}, dhcp4: true}
`},
		enable:   []string{"systemd-networkd.service", "systemd-networkd-wait-online.service"},
		units:    []string{"systemd-networkd.service"},
		reconfig: regexp.MustCompile(networkdReconfig),
		restart:  []string{"netplan apply", "systemctl restart systemd-networkd"},
		warnings: []string{defaultViaSecondary},
		limits:   secondaryGatewayLimit,
	}

	cloudCfg := `# matrix: the Ec2 datasource on the emulator. In a container cloud-init
# cannot tell that it runs on AWS (it reads no DMI there, and the kernel has
# no /sys/hypervisor), so DataSourceEc2Local does not run: Ec2 is found in
# the network stage, through the fallback DHCP on eth0 that init-local
# renders. init-local renders that fallback over 50-cloud-init.yaml on every
# boot, where EC2's cloud-init keeps the first boot's configuration; the
# network stage applies the instance's configuration again on every boot
# (updates: boot), which ends each boot as on EC2. Rendered through netplan,
# as on Ubuntu.
datasource_list: [ Ec2, None ]
datasource:
  Ec2:
    strict_id: false
    metadata_urls: [ 'http://169.254.169.254' ]
    timeout: 2
    max_wait: 30
updates:
  network:
    when: [ boot-new-instance, boot-legacy, boot ]
system_info:
  network:
    renderers: [ netplan ]
    # The root has every stack installed; cloud-init would otherwise pick
    # ifupdown's ifup to bring up what it rendered for netplan.
    activators: [ netplan ]
`
	cloudFiles := map[string]string{
		"/etc/cloud/cloud.cfg.d/90-matrix.cfg": cloudCfg,
		"/etc/cloud/cloud-init.disabled":       "-",
	}
	// cloud-init matches each NIC by MAC (`match: macaddress`), which
	// netplan renders as networkd's PermanentMACAddress=. An ENA's permanent
	// MAC is its MAC; a veth has none (ethtool -P reads zeros), so networkd
	// would leave every link unmanaged. The drop-ins empty that condition,
	// which leaves netplan's own Name= match (cloud-init's set-name).
	for i := 0; i < 4; i++ {
		cloudFiles[fmt.Sprintf("/etc/systemd/network/10-netplan-eth%d.network.d/matrix-veth.conf", i)] =
			"# matrix: veths have no permanent MAC address (see stacks_test.go)\n[Match]\nPermanentMACAddress=\n"
	}
	cloudInit := stack{
		name:     "cloud-init",
		files:    cloudFiles,
		enable:   []string{"systemd-networkd.service", "systemd-networkd-wait-online.service"},
		units:    []string{"systemd-networkd.service", "cloud-init.service", "cloud-init-local.service"},
		reconfig: regexp.MustCompile(networkdReconfig),
		restart:  []string{"netplan apply", "systemctl restart systemd-networkd"},
		// cloud-init 22.4 (Debian 12) renders DHCP on every ENI with
		// route metrics 100, 200, 300 and no policy routing (later
		// releases add per-NIC tables and rules), and configures the ENIs
		// of the first boot only: hotplug is off unless user data enables it.
		limits: map[string]string{
			"replies after attach": "cloud-init's default leaves a hot-attached ENI down (no hotplug)",
			"rules after attach":   "cloud-init's default leaves a hot-attached ENI down (no hotplug)",
		},
	}
	cloudInit.hotAttachUnmanaged = true
	cloudInitRec := cloudInit
	cloudInitRec.hotAttachUnmanaged = false
	cloudInitRec.name = "cloud-init, recommended"
	cloudInitRec.files = maps.Clone(cloudFiles)
	cloudInitRec.files["/etc/cloud/cloud.cfg.d/99-dualhomed.cfg"] = cloudInitRecommended
	cloudInitRec.files["/etc/netplan/60-secondary-enis.yaml"] = netplanSecondaryENIs
	cloudInitRec.limits = nil

	ec2Add := "#!/bin/sh\n# RUN+= of 99-vpc-policy-routes.rules (ACTION==add)\n/usr/bin/systemctl enable --now --no-block policy-routes@$1.service refresh-policy-routes@$1.timer\n"
	ec2Remove := "#!/bin/sh\n# RUN+= of 99-vpc-policy-routes.rules (ACTION==remove)\n/usr/bin/systemctl stop --no-block policy-routes@$1.service\n/usr/bin/systemctl disable --now refresh-policy-routes@$1.timer refresh-policy-routes@$1.service policy-routes@$1.service\n"
	ec2 := stack{
		name: "ec2-net-utils",
		files: map[string]string{
			// Its 80-ec2.network matches the ENA/ixgbevf/vif drivers; the
			// matrix's ENIs are veths. Same file, veth added.
			"/usr/lib/systemd/network/80-ec2.network": "@sed:s/^Driver=ena ixgbevf vif$/Driver=ena ixgbevf vif veth/",
		},
		enable:   []string{"systemd-networkd.service", "systemd-networkd-wait-online.service"},
		units:    []string{"systemd-networkd.service", "policy-routes@eth1.service", "policy-routes@eth2.service", "refresh-policy-routes@eth1.service", "refresh-policy-routes@eth2.service"},
		reconfig: regexp.MustCompile(networkdReconfig),
		restart:  []string{"systemctl restart systemd-networkd", "systemctl restart policy-routes@eth1.service policy-routes@eth2.service", "networkctl reload"},
		warnings: []string{`foreign rule .* looks up table 1000[12] instead of`},
		// refresh-policy-routes@ETH.timer: every 60 s (+ up to 5 s).
		tracksIMDSIPs: true,
		udevAdd:       ec2Add, udevRemove: ec2Remove,
	}
	ec2Masked := ec2
	ec2Masked.name = "ec2-net-utils, masked"
	ec2Masked.files = map[string]string{
		"/usr/lib/systemd/network/80-ec2.network":            ec2.files["/usr/lib/systemd/network/80-ec2.network"],
		"/etc/systemd/system/policy-routes@.service":         "@/dev/null",
		"/etc/systemd/system/refresh-policy-routes@.service": "@/dev/null",
		"/etc/systemd/system/refresh-policy-routes@.timer":   "@/dev/null",
	}
	ec2Masked.units = []string{"systemd-networkd.service"}
	ec2Masked.tracksIMDSIPs = false
	ec2Masked.restart = []string{"systemctl restart systemd-networkd", "networkctl reload"}
	ec2Masked.warnings = []string{defaultViaSecondary}
	ec2Masked.limits = secondaryGatewayLimit

	nm := stack{
		name:     "NetworkManager",
		enable:   []string{"NetworkManager.service", "NetworkManager-wait-online.service"},
		units:    []string{"NetworkManager.service"},
		reconfig: regexp.MustCompile(`device \(eth[0-9]\): state change|Activation: starting|policy: set`), // a lease renewal ("new lease") is not a reconfiguration
		restart: []string{`nmcli -g NAME,DEVICE connection show --active | grep ':eth[0-9]' | cut -d: -f1 | while read -r c; do nmcli connection up "$c"; done`,
			"systemctl restart NetworkManager", "nm-online -s -q -t 30"},
	}

	ifupdown := stack{
		name: "ifupdown",
		files: map[string]string{"/etc/network/interfaces.d/matrix": `# matrix: DHCP on every ENI (classic Debian, isc-dhcp-client).
auto eth0 eth1 eth2
allow-hotplug eth0 eth1 eth2 eth3
iface eth0 inet dhcp
iface eth1 inet dhcp
iface eth2 inet dhcp
iface eth3 inet dhcp
`,
			// Under systemd, ifupdown-hotplug starts ifup@<link>.service, which
			// is bound to the link's .device unit; systemd makes those from
			// udev's database, which a container has not ("Starting of
			// sys-subsystem-net-devices-eth3.device unsupported"), so the
			// start fails on its dependency. Same unit, device binding
			// removed; the udev stand-in's remove rule stops it instead.
			"/lib/systemd/system/ifup@.service": `@sed:/^\(BindsTo\|After\)=sys-subsystem-net-devices-%i\.device$/d`,
		},
		enable:   []string{"networking.service", "ifupdown-wait-online.service"},
		units:    []string{"networking.service", "ifup@eth0.service", "ifup@eth1.service", "ifup@eth2.service"},
		reconfig: regexp.MustCompile(`DHCPDISCOVER|RTNETLINK answers`), // "bound to ... renewal in" is a renewal
		restart:  []string{"ifdown eth1 && ifup eth1", "ifdown eth2 && ifup eth2", "systemctl restart networking"},
		udevAdd:  "#!/bin/sh\n# RUN+= of 80-ifupdown.rules\nINTERFACE=$1 ACTION=add exec /lib/udev/ifupdown-hotplug\n",
		udevRemove: "#!/bin/sh\n# RUN+= of 80-ifupdown.rules (under systemd it leaves the stop to the device unit's removal)\nINTERFACE=$1 ACTION=remove /lib/udev/ifupdown-hotplug\n" +
			"# what the removal of sys-subsystem-net-devices-$1.device does through ifup@'s BindsTo=\nexec systemctl stop --no-block ifup@$1.service\n",
	}
	all := []stack{networkd, noDropIn, netplan, cloudInit, cloudInitRec, ec2, ec2Masked, nm, ifupdown}
	for i := range all {
		all[i].warnings = append([]string{overlapWarning}, all[i].warnings...)
	}
	return all
}

// prepare writes the stack's configuration into the (not yet booted) root.
func (s stack) prepare(root string) error {
	files := map[string]string{"/usr/local/sbin/udevadm": udevadmShim}
	for k, v := range s.files {
		files[k] = v
	}
	if s.udevAdd != "" {
		files["/usr/local/sbin/matrix-udev"] = udevStandIn
		files["/etc/systemd/system/matrix-udev.service"] = udevStandInUnit
		files["/etc/matrix-udev/add"] = s.udevAdd
		files["/etc/matrix-udev/remove"] = s.udevRemove
	}
	enable := s.enable
	if s.udevAdd != "" {
		enable = append(enable[:len(enable):len(enable)], "matrix-udev.service")
	}
	for path, content := range files {
		p := filepath.Join(root, path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		switch {
		case content == "-":
			if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
				return err
			}
		case content == "@/dev/null":
			_ = os.Remove(p)
			if err := os.Symlink("/dev/null", p); err != nil {
				return err
			}
		case strings.HasPrefix(content, "@sed:"):
			if out, err := exec.Command("sed", "-i", strings.TrimPrefix(content, "@sed:"), p).CombinedOutput(); err != nil {
				return fmt.Errorf("editing %s: %v: %s", path, err, out)
			}
		case strings.HasSuffix(path, "/.keep"):
		default:
			mode := os.FileMode(0o644)
			if strings.HasPrefix(content, "#!") {
				mode = 0o755
			}
			if err := os.WriteFile(p, []byte(content), mode); err != nil {
				return err
			}
		}
	}
	if len(enable) > 0 {
		args := append([]string{root, "systemctl", "enable", "-q"}, enable...)
		if out, err := exec.Command("chroot", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("enabling %v: %v: %s", enable, err, out)
		}
	}
	return nil
}
