package testenv

import (
	"os/exec"
	"syscall"
)

// DieWithParent makes the kernel kill cmd's process when the test binary
// dies, so that a test binary killed before its cleanup (a timeout, a
// broken output pipe, SIGKILL) leaves no process behind. (Pdeathsig follows
// the thread that started the process; the Go runtime does not end the
// threads of goroutines that did not lock them, so in practice that is the
// process.)
func DieWithParent(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
