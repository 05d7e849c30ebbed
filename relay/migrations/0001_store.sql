-- The chain: block index, heads, chunk lists, payloads as chunk rows,
-- quarantine. Commits are serialised by an advisory lock, so `seq` is the
-- acceptance order and followers catch up with `seq > last seen`.

CREATE TABLE blocks (
    hash bytea PRIMARY KEY CHECK (length(hash) = 32),
    seq bigint NOT NULL UNIQUE,
    chain smallint NOT NULL,
    -- Encoded header and signature (web-node's Block::encode).
    envelope bytea NOT NULL,
    payload_len bigint NOT NULL CHECK (payload_len >= 0),
    chunk_size integer NOT NULL,
    -- SHA-256 of each payload chunk, 32 bytes each, in order.
    chunk_hashes bytea NOT NULL,
    accepted_at timestamptz NOT NULL DEFAULT now()
);

-- One row per slot: (meta block or empty for chain A, slot name).
CREATE TABLE heads (
    meta bytea NOT NULL,
    name text NOT NULL,
    hash bytea NOT NULL REFERENCES blocks (hash),
    PRIMARY KEY (meta, name)
);

-- A payload being stored (staged before its block commits) or stored.
CREATE TABLE payloads (
    block bytea PRIMARY KEY,
    len bigint NOT NULL,
    staged_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE payload_chunks (
    block bytea NOT NULL REFERENCES payloads (block) ON DELETE CASCADE,
    idx integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (block, idx)
);

CREATE TABLE quarantine (
    block bytea PRIMARY KEY,
    reason text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
