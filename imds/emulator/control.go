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

// The control channel lets another process change what a running emulator
// serves (cmd/imds-emulator --control): HTTP over a unix socket or a
// loopback TCP port, with one resource, the model. GET /instance answers the
// Instance as JSON; PUT /instance replaces it, or answers 400 with the
// reason. With curl:
//
//	curl --unix-socket ctl.sock http://emulator/instance
//	curl --unix-socket ctl.sock -X PUT --data-binary @inst.json http://emulator/instance

func (s *Server) serveControl(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/instance" {
		http.NotFound(w, r)
		return
	}
	switch r.Method {
	case http.MethodGet:
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(s.Instance())
	case http.MethodPut:
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 256<<20))
		var inst Instance
		if err == nil {
			inst, err = ParseInstance(body)
		}
		if err == nil {
			err = s.SetInstance(inst)
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
		}
	default:
		w.Header().Set("Allow", "GET, PUT")
		http.Error(w, "GET or PUT", http.StatusMethodNotAllowed)
	}
}

// StartControl serves the control channel on addr in the background:
// "unix:/path/to.sock" (a stale socket file is replaced; Close removes it)
// or a TCP address such as "127.0.0.1:0". It returns the address to give
// DialControl, with the actual port.
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
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ctlSrv != nil {
		ln.Close()
		return "", errors.New("control channel already started")
	}
	s.ctlSrv = &http.Server{Handler: http.HandlerFunc(s.serveControl), ReadHeaderTimeout: 10 * time.Second}
	go s.ctlSrv.Serve(ln)
	if network == "unix" {
		return "unix:" + address, nil
	}
	return ln.Addr().String(), nil
}

func controlNetwork(addr string) (network, address string) {
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		return "unix", p
	}
	return "tcp", addr
}

// ControlClient drives an emulator through its control channel (typically
// the cmd/imds-emulator process). Its changes read the model, change it and
// write it back: unlike Server's, they are not atomic against another
// client's.
type ControlClient struct {
	hc *http.Client
}

// DialControl returns a client for the control channel at addr ("unix:/path"
// or "host:port", as StartControl returns it). It connects lazily; use Ping
// to wait for the process to be up.
func DialControl(addr string) *ControlClient {
	network, address := controlNetwork(addr)
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, address)
	}}
	return &ControlClient{hc: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

// Close releases idle connections.
func (c *ControlClient) Close() error {
	c.hc.CloseIdleConnections()
	return nil
}

// Ping succeeds once the control channel answers.
func (c *ControlClient) Ping() error {
	_, err := c.Instance()
	return err
}

// Instance returns the emulator's current model.
func (c *ControlClient) Instance() (Instance, error) {
	var inst Instance
	resp, err := c.hc.Get("http://emulator/instance")
	if err != nil {
		return inst, fmt.Errorf("reading the emulator's instance: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return inst, fmt.Errorf("reading the emulator's instance: %s", resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&inst); err != nil {
		return inst, fmt.Errorf("decoding the emulator's instance: %w", err)
	}
	return inst, nil
}

// SetInstance replaces the emulator's model.
func (c *ControlClient) SetInstance(inst Instance) error {
	body, err := json.Marshal(inst)
	if err != nil {
		return err
	}
	req, err := http.NewRequest(http.MethodPut, "http://emulator/instance", bytes.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("setting the emulator's instance: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("setting the emulator's instance: %s: %s", resp.Status, bytes.TrimSpace(msg))
	}
	return nil
}

// change reads the model, applies fn and writes the result back.
func (c *ControlClient) change(fn func(*Instance) error) error {
	inst, err := c.Instance()
	if err != nil {
		return err
	}
	if err := fn(&inst); err != nil {
		return err
	}
	return c.SetInstance(inst)
}

// AttachENI adds an ENI (see Server.AttachENI).
func (c *ControlClient) AttachENI(e imds.ENI) error {
	return c.change(func(inst *Instance) error { return inst.attach(e) })
}

// DetachENI removes an ENI (see Server.DetachENI).
func (c *ControlClient) DetachENI(mac string) error {
	return c.change(func(inst *Instance) error { return inst.detach(mac) })
}

// UpdateENI changes an ENI in place (see Server.UpdateENI).
func (c *ControlClient) UpdateENI(mac string, update func(*imds.ENI)) error {
	return c.change(func(inst *Instance) error { return inst.update(mac, update) })
}
