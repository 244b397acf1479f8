-- Version 5: the daemon that recorded each sample (``[store] instance``), and the instance of
-- each rollup ('' = every instance of the store: a SQLite store has one daemon, so only '').
ALTER TABLE usage_sample ADD COLUMN instance TEXT NOT NULL DEFAULT '';
ALTER TABLE usage_rollup_hour ADD COLUMN instance TEXT NOT NULL DEFAULT '';
ALTER TABLE usage_rollup_day ADD COLUMN instance TEXT NOT NULL DEFAULT '';
