-- Usage counters and rewards, shared by every relay on this database.
-- Counters are added to (never overwritten), so relays counting at once
-- do not lose each other's work. See relay/src/usage/pg.rs.

CREATE TABLE usage_versions (
    block bytea PRIMARY KEY CHECK (length(block) = 32),
    calls bigint NOT NULL DEFAULT 0,
    tokens bigint NOT NULL DEFAULT 0,
    latency_us_sum bigint NOT NULL DEFAULT 0,
    latency_samples bigint NOT NULL DEFAULT 0,
    reported_calls bigint NOT NULL DEFAULT 0,
    reported_tokens bigint NOT NULL DEFAULT 0,
    bytes_served bigint NOT NULL DEFAULT 0,
    computations bigint NOT NULL DEFAULT 0,
    -- Miner reward units already paid (units at the last reward).
    paid_units bigint NOT NULL DEFAULT 0,
    -- The quality gate's losses (set, not added; NULL for genesis versions).
    verified_loss double precision,
    incumbent_loss double precision
);

CREATE TABLE usage_peers (
    peer bytea NOT NULL CHECK (length(peer) = 32),
    block bytea NOT NULL CHECK (length(block) = 32),
    bytes bigint NOT NULL DEFAULT 0,
    chunks bigint NOT NULL DEFAULT 0,
    computations bigint NOT NULL DEFAULT 0,
    bad_chunks bigint NOT NULL DEFAULT 0,
    paid_bytes bigint NOT NULL DEFAULT 0,
    paid_computations bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (peer, block)
);
-- A reward reads (and locks) the peers of a slot's blocks.
CREATE INDEX usage_peers_block ON usage_peers (block);

-- (key, block): some relay delivered chunks of this block to this key.
CREATE TABLE usage_fetched (
    peer bytea NOT NULL,
    block bytea NOT NULL,
    PRIMARY KEY (peer, block)
);

-- Reports counted: the primary key refuses a replay, on any relay.
-- `period` and `seq` hold the bits of the report's u64 values.
CREATE TABLE usage_reports_seen (
    key bytea NOT NULL,
    period bigint NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (key, period, seq)
);

-- What each key reported in each period (the per-key caps).
CREATE TABLE usage_report_caps (
    key bytea NOT NULL,
    period bigint NOT NULL,
    calls bigint NOT NULL DEFAULT 0,
    tokens bigint NOT NULL DEFAULT 0,
    reports bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (key, period)
);

CREATE TABLE reward_ledger (
    id bigserial PRIMARY KEY,
    key bytea NOT NULL,
    amount_uc bigint NOT NULL CHECK (amount_uc >= 0),
    role text NOT NULL,
    slot text NOT NULL,
    block bytea NOT NULL,
    reason text NOT NULL,
    at_ms bigint NOT NULL
);
CREATE INDEX reward_ledger_key ON reward_ledger (key, id);

-- One row per open usage ledger (a relay process): the last flush batch
-- it added. A flush retried after its commit's answer was lost finds its
-- batch here and is not added twice.
CREATE TABLE usage_writers (
    id bigserial PRIMARY KEY,
    batch bigint NOT NULL DEFAULT 0,
    seen_at timestamptz NOT NULL DEFAULT now()
);
