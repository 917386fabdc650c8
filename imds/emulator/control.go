package emulator

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/dualhomed/dualhomed/imds"
)

// The control channel is HTTP+JSON over a local listener (a unix socket or a
// loopback TCP port), RPC style: POST /v1/<Method> with the arguments as a
// JSON object, answered with the result as JSON (200) or {"Error": "..."}
// (400). Method names and arguments mirror the Server's methods, so for
// example with curl:
//
//	curl --unix-socket ctl.sock -d '{"MAC":"02:00:00:00:00:01"}' http://emulator/v1/DetachENI
//	curl --unix-socket ctl.sock -d '{"Faults":{"Status":500,"Match":"local-ipv4s"}}' http://emulator/v1/SetFaults
//	curl --unix-socket ctl.sock -d '{}' http://emulator/v1/Stats
//
// Raw values travel as base64 ([]byte) so binary junk survives JSON.

// controlArgs is the union of every control method's arguments.
type controlArgs struct {
	MAC      string        `json:",omitempty"`
	Key      string        `json:",omitempty"`
	Path     string        `json:",omitempty"`
	Raw      []byte        `json:",omitempty"`
	ENI      *imds.ENI     `json:",omitempty"`
	Instance *Instance     `json:",omitempty"`
	Faults   *Faults       `json:",omitempty"`
	Duration time.Duration `json:",omitempty"`
}

type controlError struct{ Error string }

// ControlHandler serves the control channel for s. StartControl uses it; tests
// may mount it on an httptest server.
func (s *Server) ControlHandler() http.Handler {
	mux := http.NewServeMux()
	handle := func(method string, fn func(a controlArgs) (any, error)) {
		mux.HandleFunc("POST /v1/"+method, func(w http.ResponseWriter, r *http.Request) {
			var a controlArgs
			dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 256<<20))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&a); err != nil && !errors.Is(err, io.EOF) {
				writeJSON(w, http.StatusBadRequest, controlError{fmt.Sprintf("decoding %s arguments: %v", method, err)})
				return
			}
			res, err := fn(a)
			if err != nil {
				writeJSON(w, http.StatusBadRequest, controlError{err.Error()})
				return
			}
			if res == nil {
				res = struct{}{}
			}
			writeJSON(w, http.StatusOK, res)
		})
	}
	needENI := func(a controlArgs) (imds.ENI, error) {
		if a.ENI == nil {
			return imds.ENI{}, errors.New("missing ENI argument")
		}
		return *a.ENI, nil
	}
	handle("Ping", func(controlArgs) (any, error) { return nil, nil })
	handle("Instance", func(controlArgs) (any, error) { return s.Instance(), nil })
	handle("SetInstance", func(a controlArgs) (any, error) {
		if a.Instance == nil {
			return nil, errors.New("missing Instance argument")
		}
		return nil, s.SetInstance(*a.Instance)
	})
	handle("AttachENI", func(a controlArgs) (any, error) {
		e, err := needENI(a)
		if err != nil {
			return nil, err
		}
		return nil, s.AttachENI(e)
	})
	handle("DetachENI", func(a controlArgs) (any, error) { return nil, s.DetachENI(a.MAC) })
	handle("ReplaceENI", func(a controlArgs) (any, error) {
		e, err := needENI(a)
		if err != nil {
			return nil, err
		}
		return nil, s.UpdateENI(a.MAC, func(old *imds.ENI) { *old = e })
	})
	handle("SetPrimaryMAC", func(a controlArgs) (any, error) { return nil, s.SetPrimaryMAC(a.MAC) })
	handle("SetRaw", func(a controlArgs) (any, error) { return nil, s.SetRaw(a.Path, string(a.Raw)) })
	handle("DeletePath", func(a controlArgs) (any, error) { return nil, s.DeletePath(a.Path) })
	handle("ClearOverrides", func(controlArgs) (any, error) { return nil, s.ClearOverrides() })
	handle("SetFaults", func(a controlArgs) (any, error) {
		var f Faults
		if a.Faults != nil {
			f = *a.Faults
		}
		return nil, s.SetFaults(f)
	})
	handle("Faults", func(controlArgs) (any, error) { return s.Faults(), nil })
	handle("ExpireTokens", func(controlArgs) (any, error) { return nil, s.ExpireTokens() })
	handle("AdvanceClock", func(a controlArgs) (any, error) { return nil, s.AdvanceClock(a.Duration) })
	handle("Stats", func(controlArgs) (any, error) { return s.Stats(), nil })
	handle("ResetStats", func(controlArgs) (any, error) { return nil, s.ResetStats() })
	return mux
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// StartControl serves the control channel on addr in the background:
// "unix:/path/to.sock" (a stale socket file is replaced) or a TCP address
// such as "127.0.0.1:0". It returns the address to give DialControl, with
// the actual port. Close stops it.
func (s *Server) StartControl(addr string) (string, error) {
	network, address := controlNetwork(addr)
	if network == "unix" {
		if fi, err := os.Lstat(address); err == nil && fi.Mode()&os.ModeSocket != 0 {
			os.Remove(address)
		}
	}
	ln, err := net.Listen(network, address)
	if err != nil {
		return "", fmt.Errorf("listening for control on %s: %w", addr, err)
	}
	if network == "unix" {
		// The channel rewrites what IMDS says: only root (or the owner) may use it.
		if err := os.Chmod(address, 0o600); err != nil {
			ln.Close()
			return "", fmt.Errorf("restricting control socket: %w", err)
		}
	}
	if err := s.ServeControl(ln); err != nil {
		return "", err
	}
	if network == "unix" {
		return "unix:" + address, nil
	}
	return ln.Addr().String(), nil
}

// ServeControl serves the control channel on ln in the background. Close
// closes ln.
func (s *Server) ServeControl(ln net.Listener) error {
	s.mu.Lock()
	if s.ctlSrv != nil {
		s.mu.Unlock()
		ln.Close()
		return errors.New("control channel already started")
	}
	s.ctlSrv = &http.Server{Handler: s.ControlHandler(), ReadHeaderTimeout: 10 * time.Second}
	hs := s.ctlSrv
	s.mu.Unlock()
	go hs.Serve(ln)
	return nil
}

func controlNetwork(addr string) (network, address string) {
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		return "unix", p
	}
	return "tcp", addr
}

// ControlClient drives an emulator through its control channel (typically the
// cmd/imds-emulator process). Its methods mirror Server's, and return the
// error the emulator reported or a transport error.
type ControlClient struct {
	hc *http.Client
}

// DialControl returns a client for the control channel at addr ("unix:/path"
// or "host:port", as StartControl returns it). It connects lazily; use Ping
// to wait for the process to be up.
func DialControl(addr string) *ControlClient {
	network, address := controlNetwork(addr)
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, address)
		},
		MaxIdleConnsPerHost: 2,
	}
	return &ControlClient{hc: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

// Close releases idle connections.
func (c *ControlClient) Close() error {
	c.hc.CloseIdleConnections()
	return nil
}

func (c *ControlClient) call(method string, args controlArgs, result any) error {
	body, err := json.Marshal(args)
	if err != nil {
		return fmt.Errorf("encoding %s arguments: %w", method, err)
	}
	resp, err := c.hc.Post("http://emulator/v1/"+method, "application/json", bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("calling emulator %s: %w", method, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var ce controlError
		data, _ := io.ReadAll(resp.Body)
		if json.Unmarshal(data, &ce) == nil && ce.Error != "" {
			return fmt.Errorf("emulator %s: %s", method, ce.Error)
		}
		return fmt.Errorf("emulator %s: %s: %s", method, resp.Status, strings.TrimSpace(string(data)))
	}
	if result == nil {
		io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(result); err != nil {
		return fmt.Errorf("decoding emulator %s result: %w", method, err)
	}
	return nil
}

// Ping succeeds once the control channel answers.
func (c *ControlClient) Ping() error { return c.call("Ping", controlArgs{}, nil) }

// Instance returns the emulator's current model.
func (c *ControlClient) Instance() (Instance, error) {
	var inst Instance
	err := c.call("Instance", controlArgs{}, &inst)
	return inst, err
}

// SetInstance replaces the whole model.
func (c *ControlClient) SetInstance(inst Instance) error {
	return c.call("SetInstance", controlArgs{Instance: &inst}, nil)
}

// AttachENI adds an ENI (see Server.AttachENI).
func (c *ControlClient) AttachENI(e imds.ENI) error {
	return c.call("AttachENI", controlArgs{ENI: &e}, nil)
}

// DetachENI removes an ENI (see Server.DetachENI).
func (c *ControlClient) DetachENI(mac string) error {
	return c.call("DetachENI", controlArgs{MAC: mac}, nil)
}

// UpdateENI reads the ENI, applies update locally and writes it back. Unlike
// Server.UpdateENI it is not atomic against other control clients.
func (c *ControlClient) UpdateENI(mac string, update func(*imds.ENI)) error {
	inst, err := c.Instance()
	if err != nil {
		return err
	}
	i := inst.eniIndex(mac)
	if i < 0 {
		return fmt.Errorf("updating ENI %s: not attached", mac)
	}
	e := inst.ENIs[i]
	update(&e)
	return c.call("ReplaceENI", controlArgs{MAC: mac, ENI: &e}, nil)
}

// SetPrimaryMAC changes meta-data/mac.
func (c *ControlClient) SetPrimaryMAC(mac string) error {
	return c.call("SetPrimaryMAC", controlArgs{MAC: mac}, nil)
}

// SetRawKey serves raw as macs/<mac>/<key> (see Server.SetRawKey).
func (c *ControlClient) SetRawKey(mac, key, raw string) error {
	return c.SetRaw(KeyPath(mac, key), raw)
}

// DeleteKey makes macs/<mac>/<key> absent.
func (c *ControlClient) DeleteKey(mac, key string) error { return c.DeletePath(KeyPath(mac, key)) }

// SetRaw serves raw at path relative to /latest/ (see Server.SetRaw).
func (c *ControlClient) SetRaw(path, raw string) error {
	return c.call("SetRaw", controlArgs{Path: path, Raw: []byte(raw)}, nil)
}

// DeletePath makes path relative to /latest/ absent.
func (c *ControlClient) DeletePath(path string) error {
	return c.call("DeletePath", controlArgs{Path: path}, nil)
}

// ClearOverrides drops every raw override and deletion.
func (c *ControlClient) ClearOverrides() error { return c.call("ClearOverrides", controlArgs{}, nil) }

// SetFaults replaces the injected faults.
func (c *ControlClient) SetFaults(f Faults) error {
	return c.call("SetFaults", controlArgs{Faults: &f}, nil)
}

// ClearFaults removes every injected fault.
func (c *ControlClient) ClearFaults() error { return c.SetFaults(Faults{}) }

// Faults returns the faults in force, with the counts left.
func (c *ControlClient) Faults() (Faults, error) {
	var f Faults
	err := c.call("Faults", controlArgs{}, &f)
	return f, err
}

// ExpireTokens expires every token issued so far.
func (c *ControlClient) ExpireTokens() error { return c.call("ExpireTokens", controlArgs{}, nil) }

// AdvanceClock moves the emulator's token clock forward.
func (c *ControlClient) AdvanceClock(d time.Duration) error {
	return c.call("AdvanceClock", controlArgs{Duration: d}, nil)
}

// Stats returns the emulator's counters.
func (c *ControlClient) Stats() (Stats, error) {
	var st Stats
	err := c.call("Stats", controlArgs{}, &st)
	return st.clone(), err
}

// ResetStats zeroes the counters.
func (c *ControlClient) ResetStats() error { return c.call("ResetStats", controlArgs{}, nil) }
