//go:build !linux

package testenv

import "os/exec"

// DieWithParent does nothing here: only Linux has Pdeathsig.
func DieWithParent(*exec.Cmd) {}
