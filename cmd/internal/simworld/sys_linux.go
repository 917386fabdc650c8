package simworld

import "syscall"

func syscallKill(pid int) error { return syscall.Kill(pid, syscall.SIGKILL) }

// childAttrs makes the kernel kill a child when this process dies, so that a
// crashed test run never leaves a daemon or an emulator behind.
func childAttrs() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
