package demo

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/decnet/identity-relay/internal/store"
	"github.com/decnet/identity-relay/internal/users"
)

// memStore is the demo's stand-in for PostgreSQL: one viewer user and the
// identities the demo publisher creates. It implements api.Store.
type memStore struct {
	mu         sync.Mutex
	users      map[string]*users.User
	identities map[string]*store.Identity
}

func newMemStore() *memStore {
	return &memStore{users: map[string]*users.User{}, identities: map[string]*store.Identity{}}
}

func (m *memStore) addUser(u users.User) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.users[u.UUID] = &u
}

func (m *memStore) User(_ context.Context, uuid string) (*users.User, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if u, ok := m.users[uuid]; ok {
		c := *u
		return &c, nil
	}
	return nil, nil
}

func (m *memStore) Revoked(context.Context, string) (bool, error) { return false, nil }

func (m *memStore) Ping(context.Context) error { return nil }

// Snapshot orders as the SQL does: updated_at descending, uuid ascending.
func (m *memStore) Snapshot(_ context.Context, limit int) (json.RawMessage, error) {
	m.mu.Lock()
	rows := make([]store.Identity, 0, len(m.identities))
	for _, id := range m.identities {
		if id.MergedIntoUUID == nil {
			rows = append(rows, *id)
		}
	}
	m.mu.Unlock()
	slices.SortFunc(rows, func(a, b store.Identity) int {
		if c := b.UpdatedAt.Compare(a.UpdatedAt.Time); c != 0 {
			return c
		}
		return strings.Compare(a.UUID, b.UUID)
	})
	return json.Marshal(rows[:min(limit, len(rows))])
}

// update applies fn to the identity under the lock and stamps updated_at.
func (m *memStore) update(uuid string, fn func(*store.Identity)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if id, ok := m.identities[uuid]; ok {
		fn(id)
		id.UpdatedAt = store.Time{Time: time.Now()}
	}
}

func (m *memStore) insert(id *store.Identity) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.identities[id.UUID] = id
}

// live returns the uuids of unmerged identities.
func (m *memStore) live() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for k, id := range m.identities {
		if id.MergedIntoUUID == nil {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}
