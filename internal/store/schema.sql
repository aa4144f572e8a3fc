-- The tables the relay reads (CONTRACT.md, "Tables the relay reads").
-- Production points at DECNET's own database; this DDL exists for the tests
-- and for operators who want a scratch database. The relay never writes them.

CREATE TABLE IF NOT EXISTS attacker_identities (
    uuid                  TEXT PRIMARY KEY,
    schema_version        INTEGER NOT NULL DEFAULT 1,
    campaign_id           TEXT NULL,
    first_seen_at         TIMESTAMPTZ NULL,
    last_seen_at          TIMESTAMPTZ NULL,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    confidence            DOUBLE PRECISION NULL,
    observation_count     INTEGER NOT NULL DEFAULT 0,
    ja3_hashes            TEXT NOT NULL DEFAULT '[]',
    hassh_hashes          TEXT NOT NULL DEFAULT '[]',
    ja4h_hashes           TEXT NOT NULL DEFAULT '[]',
    ja4_quic_hashes       TEXT NOT NULL DEFAULT '[]',
    http_versions_seen    TEXT NOT NULL DEFAULT '[]',
    tls_cert_sha256       TEXT NOT NULL DEFAULT '[]',
    ipv6_link_local_iids  TEXT NOT NULL DEFAULT '[]',
    payload_simhashes     TEXT NOT NULL DEFAULT '[]',
    c2_endpoints          TEXT NOT NULL DEFAULT '[]',
    kd_digraph_simhash    BYTEA NULL,
    merged_into_uuid      TEXT NULL,
    notes                 TEXT NULL
);

-- Serves the snapshot query: newest unmerged rows first.
CREATE INDEX IF NOT EXISTS attacker_identities_live_updated
    ON attacker_identities (updated_at DESC, uuid ASC)
    WHERE merged_into_uuid IS NULL;

CREATE TABLE IF NOT EXISTS users (
    uuid                  TEXT PRIMARY KEY,
    username              TEXT NOT NULL UNIQUE,
    role                  TEXT NOT NULL,
    must_change_password  BOOLEAN NOT NULL DEFAULT FALSE,
    tokens_valid_from     TIMESTAMPTZ NULL
);

CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti                   TEXT PRIMARY KEY
);
