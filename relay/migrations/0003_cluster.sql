-- Relays sharing this database and the peers logged in to each: how relays
-- find each other and where a chunk request can be forwarded.

CREATE TABLE relays (
    id text PRIMARY KEY,
    -- The relay's peer key (it logs in to other relays' /ws with it).
    key bytea NOT NULL,
    -- Where other relays reach its /ws.
    ws_url text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now()
);

-- A block that a peer logged in to `relay` holds and serves.
CREATE TABLE peer_presence (
    relay text NOT NULL REFERENCES relays (id) ON DELETE CASCADE,
    peer bytea NOT NULL,
    block bytea NOT NULL,
    since timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (relay, peer, block)
);
CREATE INDEX peer_presence_block ON peer_presence (block);
