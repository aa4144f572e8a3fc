package api

import "testing"

// FuzzTokenFrom guards credential extraction: the Authorization header wins
// only with the exact prefix "Bearer " and a non-empty rest, returned whole;
// any other header is ignored and the query parameter is used.
func FuzzTokenFrom(f *testing.F) {
	for _, s := range [][2]string{
		{"Bearer abc.def.ghi", "q"},
		{"Bearer ", "q"},
		{"Bearer", "q"},
		{"bearer abc", "q"},
		{"BEARER abc", ""},
		{"Basic dXNlcjpwYXNz", "q"},
		{" Bearer abc", "q"},
		{"Bearer  abc", ""},
		{"Bearer\tabc", "q"},
		{"Bearer abc def", "q"},
		{"", "q"},
		{"", ""},
		{"Bearer \x00", "\xff"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, header, query string) {
		got := tokenFrom(header, query)
		const prefix = "Bearer "
		headerWins := len(header) > len(prefix) && header[:len(prefix)] == prefix
		switch {
		case headerWins && got != header[len(prefix):]:
			t.Fatalf("tokenFrom(%q, %q) = %q, want the header's rest", header, query, got)
		case !headerWins && got != query:
			t.Fatalf("tokenFrom(%q, %q) = %q, want the query %q", header, query, got, query)
		}
	})
}
