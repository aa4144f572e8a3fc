// Package archtest holds the one test of the relay's layering: data flows
// consumer → fanout → api, all speaking sse's types, and cmd/relay wires
// them (README, "Layout"). A package reaching back fails here, not in review.
package archtest

import (
	"go/build"
	"os"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/decnet/identity-relay/"

// allowed lists, for each production package, the module's packages its
// non-test files may import. A package not listed may import none.
var allowed = map[string][]string{
	"pkg/fanout":      {"pkg/sse"},
	"pkg/consumer":    {"pkg/sse", "pkg/fanout"},
	"pkg/api":         {"pkg/sse", "pkg/fanout", "internal/users"},
	"internal/config": {"pkg/fanout"},
	"internal/store":  {"internal/users"},
	"internal/demo":   {"internal/store", "internal/users", "pkg/api"},
	"cmd/relay":       {"internal/config", "internal/demo", "internal/store", "pkg/api", "pkg/consumer", "pkg/fanout", "pkg/sse"},
	// Test harnesses: built only into tests.
	"internal/relaytest": {"internal/testenv", "internal/testsync", "pkg/api", "pkg/sse"},
}

func TestLayers(t *testing.T) {
	pkgs := []string{"cmd/relay"}
	for _, dir := range []string{"pkg", "internal"} {
		for _, name := range subdirs(t, "../../"+dir) {
			pkgs = append(pkgs, dir+"/"+name)
		}
	}
	for _, p := range pkgs {
		bp, err := build.ImportDir("../../"+p, 0) // GoFiles and Imports leave _test.go files out
		if err != nil {
			if _, ok := err.(*build.NoGoError); ok {
				continue // test files only
			}
			t.Fatalf("%s: %v", p, err)
		}
		for _, imp := range bp.Imports {
			dep, ok := strings.CutPrefix(imp, module)
			if !ok {
				continue
			}
			if !slices.Contains(allowed[p], dep) {
				t.Errorf("%s imports %s: not in its allowed list (internal/archtest); the layers are consumer → fanout → api over sse, wired by cmd/relay", p, dep)
			}
		}
	}
	if len(pkgs) < 12 {
		t.Fatalf("found %d packages (%v): the walk is broken", len(pkgs), pkgs)
	}
}

func subdirs(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		if e.IsDir() {
			names = append(names, e.Name())
		}
	}
	return names
}
