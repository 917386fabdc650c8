package simworld

import "syscall"

func syscallKill(pid int) error { return syscall.Kill(pid, syscall.SIGKILL) }

// childAttrs makes the kernel kill a child when this process dies, so that a
// crashed test run never leaves a daemon or an emulator behind; and puts it in
// its own process group, so that a Ctrl-C on the terminal reaches only us and
// the teardown stops the children in order.
func childAttrs() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
}
