package emulator_test

import (
	"fmt"
	"io"
	"net/http"
	"net/netip"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

func Example() {
	// Two ENIs, each with 2 IPv4s, no IPv6, no prefixes, one network card.
	srv := emulator.New(emulator.ExampleInstance(2, 2, 0, 0, 1))
	base, err := srv.Start("127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer srv.Close()

	// Hot-attach a third ENI whose keys IMDS does not serve yet, and whose
	// device-number reads 0 twice once they appear.
	mac := "02:00:00:00:00:09"
	srv.AttachENI(imds.ENI{MAC: mac, DeviceNumber: 2, LocalIPv4s: []netip.Addr{netip.MustParseAddr("10.9.0.10")}})
	srv.SetFaults(emulator.Faults{PendingMACs: []string{mac}, DeviceNumberZeroReads: map[string]int{mac: 2}})

	do := func(method, path, header, value string) (int, string) {
		req, err := http.NewRequest(method, base+path, nil)
		if err != nil {
			panic(err)
		}
		req.Header.Set(header, value)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			panic(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	read := func(path string) string {
		_, token := do(http.MethodPut, emulator.TokenPath, emulator.TokenTTLHeader, "60")
		status, body := do(http.MethodGet, "/latest/meta-data/"+path, emulator.TokenHeader, token)
		if status != http.StatusOK {
			return http.StatusText(status)
		}
		return body
	}
	fmt.Println(read("network/interfaces/macs/"))
	fmt.Println(read("network/interfaces/macs/" + mac + "/device-number"))

	// Keys arrive (a 500 on one key for good measure).
	srv.SetFaults(emulator.Faults{DeviceNumberZeroReads: map[string]int{mac: 1}, Match: mac + "/local-ipv4s", Status: 500})
	fmt.Println(read("network/interfaces/macs/" + mac + "/device-number"))
	fmt.Println(read("network/interfaces/macs/" + mac + "/device-number"))
	fmt.Println(read("network/interfaces/macs/" + mac + "/local-ipv4s"))
	// Output:
	// 02:00:00:00:00:00/
	// 02:00:00:00:00:01/
	// 02:00:00:00:00:09/
	// Not Found
	// 0
	// 2
	// Internal Server Error
}
