package imds_test

import (
	"context"
	"fmt"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

func ExampleClient_Snapshot() {
	// An emulated instance with a primary and one secondary ENI.
	srv := emulator.New(emulator.ExampleInstance(2, 2, 1, 0, 1))
	endpoint, err := srv.Start("127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer srv.Close()

	c, err := imds.New(imds.Options{Endpoint: endpoint}) // the --imds-endpoint flag
	if err != nil {
		panic(err)
	}
	snap, err := c.Snapshot(context.Background())
	if imds.IsUnreachable(err) {
		fmt.Println("IMDS unreachable: not on EC2?")
		return
	}
	if err != nil { // never a partial snapshot: keep the current configuration
		fmt.Println("IMDS error:", err)
		return
	}
	for _, e := range snap.ENIs {
		fmt.Println(e.MAC, e.Ready, e.DeviceNumber, e.LocalIPv4s, e.IPv6s, e.SubnetIPv4CIDR)
	}
	fmt.Println("requests:", snap.Requests)
	// Output:
	// 02:00:00:00:00:00 true 0 [10.0.0.10 10.0.0.11] [2001:db8::1000] 10.0.0.0/20
	// 02:00:00:00:00:01 true 1 [10.1.0.10 10.1.0.11] [2001:db8:0:100::1000] 10.1.0.0/20
	// requests: 27
}
