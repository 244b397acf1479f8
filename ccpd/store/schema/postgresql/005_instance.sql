-- Version 5 on PostgreSQL (team mode): samples are unique per daemon, (instance, ts, rid); each
-- gets a ``seq`` in commit order (inserts take the ledger's advisory lock, see
-- ccpd/store/queries.py), which is how every daemon reads what the others recorded since it
-- last looked; rollups per instance and for the team (instance ''), and when the team's roller
-- last ran (rollup_state: one daemon rolls for all).
ALTER TABLE usage_sample ADD COLUMN instance TEXT NOT NULL DEFAULT '';
ALTER TABLE usage_sample ADD COLUMN seq BIGSERIAL;
ALTER TABLE usage_sample DROP CONSTRAINT usage_sample_pkey;
ALTER TABLE usage_sample ADD PRIMARY KEY (instance, ts, rid);
CREATE UNIQUE INDEX IF NOT EXISTS sample_seq ON usage_sample(seq);
CREATE INDEX IF NOT EXISTS sample_ts ON usage_sample(ts);
ALTER TABLE usage_rollup_hour ADD COLUMN instance TEXT NOT NULL DEFAULT '';
ALTER TABLE usage_rollup_hour DROP CONSTRAINT usage_rollup_hour_window_start_model_key;
ALTER TABLE usage_rollup_hour ADD UNIQUE (window_start, model, instance);
ALTER TABLE usage_rollup_day ADD COLUMN instance TEXT NOT NULL DEFAULT '';
ALTER TABLE usage_rollup_day DROP CONSTRAINT usage_rollup_day_date_model_key;
ALTER TABLE usage_rollup_day ADD UNIQUE (date, model, instance);
CREATE TABLE IF NOT EXISTS rollup_state (
    id INT PRIMARY KEY, rolled_at DOUBLE PRECISION NOT NULL
);
