// Package users holds the row of the users table that authorization reads.
// The store fills it and the API checks it; it lives apart from both so that
// neither imports the other (the store needs no HTTP, the API no database).
package users

import "time"

// User is the row of the users table that authorization needs (CONTRACT.md).
type User struct {
	UUID               string
	Username           string
	Role               string
	MustChangePassword bool
	TokensValidFrom    *time.Time
}
