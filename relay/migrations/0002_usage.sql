-- Usage counters and rewards, shared by every relay on this database.
-- Counters are added to (never overwritten), so relays counting at once
-- do not lose each other's work.

CREATE TABLE usage_versions (
    block bytea PRIMARY KEY,
    calls bigint NOT NULL DEFAULT 0,
    tokens bigint NOT NULL DEFAULT 0,
    latency_us_sum bigint NOT NULL DEFAULT 0,
    latency_samples bigint NOT NULL DEFAULT 0,
    reported_calls bigint NOT NULL DEFAULT 0,
    reported_tokens bigint NOT NULL DEFAULT 0,
    bytes_served bigint NOT NULL DEFAULT 0,
    computations bigint NOT NULL DEFAULT 0,
    paid_units bigint NOT NULL DEFAULT 0,
    verified_loss double precision,
    incumbent_loss double precision
);

CREATE TABLE usage_peers (
    peer bytea NOT NULL,
    block bytea NOT NULL,
    bytes bigint NOT NULL DEFAULT 0,
    chunks bigint NOT NULL DEFAULT 0,
    computations bigint NOT NULL DEFAULT 0,
    bad_chunks bigint NOT NULL DEFAULT 0,
    paid_bytes bigint NOT NULL DEFAULT 0,
    paid_computations bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (peer, block)
);

-- (key, block): some relay delivered chunks of this block to this key.
CREATE TABLE usage_fetched (
    peer bytea NOT NULL,
    block bytea NOT NULL,
    PRIMARY KEY (peer, block)
);

CREATE TABLE usage_reports_seen (
    key bytea NOT NULL,
    period bigint NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (key, period, seq)
);

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
    amount_uc bigint NOT NULL,
    role text NOT NULL,
    slot text NOT NULL,
    block bytea NOT NULL,
    reason text NOT NULL,
    at_ms bigint NOT NULL
);
CREATE INDEX reward_ledger_key ON reward_ledger (key, id);
