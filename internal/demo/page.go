package demo

import (
	_ "embed"
	"net/http"
)

//go:embed page.html
var page []byte

// Page serves the live page; it reads the token from its own ?token= and
// opens an EventSource on the stream with it.
func Page(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-cache")
	_, _ = w.Write(page)
}
