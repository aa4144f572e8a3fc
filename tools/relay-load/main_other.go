//go:build !linux

package main

import (
	"fmt"
	"os"
)

// The tool needs Linux (netlink sock_diag, IP_BIND_ADDRESS_NO_PORT,
// /proc); this stub lets the module build and vet on any system.
func main() {
	fmt.Fprintln(os.Stderr, "relay-load runs on Linux only")
	os.Exit(2)
}
