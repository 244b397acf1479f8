-- Version 1 on PostgreSQL: the tables of ../001_initial.sql; times and rates as DOUBLE
-- PRECISION (PostgreSQL's REAL is 4 bytes: an epoch second would lose minutes), token counts
-- as BIGINT.
CREATE TABLE IF NOT EXISTS usage_sample (
    ts DOUBLE PRECISION, rid TEXT, model TEXT, lane TEXT, op TEXT,
    input_tokens BIGINT, output_tokens BIGINT, dirty_s DOUBLE PRECISION,
    stream_s DOUBLE PRECISION, ttft_ms DOUBLE PRECISION,
    status INT, err_type TEXT, decision TEXT, reroute_mode TEXT,
    warn_pct_auto DOUBLE PRECISION, gap_seconds_p50 DOUBLE PRECISION,
    gap_seconds_p95 DOUBLE PRECISION, gap_samples INT,
    upstream TEXT, h2 INT, header_mode TEXT,
    PRIMARY KEY (ts, rid)
);
CREATE TABLE IF NOT EXISTS usage_rollup_hour (
    window_start DOUBLE PRECISION, model TEXT,
    in_tokens BIGINT, out_tokens BIGINT, dirty_s DOUBLE PRECISION, stream_s DOUBLE PRECISION,
    count BIGINT, p50_ttft DOUBLE PRECISION, p90_ttft DOUBLE PRECISION,
    p99_ttft DOUBLE PRECISION,
    UNIQUE (window_start, model)
);
CREATE TABLE IF NOT EXISTS usage_rollup_day (
    date TEXT, model TEXT, in_tokens BIGINT, out_tokens BIGINT,
    dirty_s DOUBLE PRECISION, stream_s DOUBLE PRECISION, count BIGINT,
    UNIQUE (date, model)
);
CREATE INDEX IF NOT EXISTS sample_model_ts ON usage_sample(model, ts);
