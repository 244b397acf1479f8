-- Version 1: the tables and index of the R4 design (seed 002), exactly.
CREATE TABLE IF NOT EXISTS usage_sample (
    ts REAL, rid TEXT, model TEXT, lane TEXT, op TEXT,
    input_tokens INT, output_tokens INT, dirty_s REAL, stream_s REAL, ttft_ms INT,
    status INT, err_type TEXT, decision TEXT, reroute_mode TEXT,
    warn_pct_auto REAL, gap_seconds_p50 REAL, gap_seconds_p95 REAL, gap_samples INT,
    upstream TEXT, h2 INT, header_mode TEXT,
    PRIMARY KEY (ts, rid)
);
CREATE TABLE IF NOT EXISTS usage_rollup_hour (
    window_start REAL, model TEXT,
    in_tokens INT, out_tokens INT, dirty_s REAL, stream_s REAL, count INT,
    p50_ttft REAL, p90_ttft REAL, p99_ttft REAL,
    UNIQUE (window_start, model)
);
CREATE TABLE IF NOT EXISTS usage_rollup_day (
    date TEXT, model TEXT, in_tokens INT, out_tokens INT,
    dirty_s REAL, stream_s REAL, count INT,
    UNIQUE (date, model)
);
CREATE INDEX IF NOT EXISTS sample_model_ts ON usage_sample(model, ts);
