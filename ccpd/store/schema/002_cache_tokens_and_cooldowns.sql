-- Version 2: what the Python daemon records beyond the seed: cache tokens, the served model
-- and stream flag of each sample, and the reroute cooldowns that must survive a restart.
ALTER TABLE usage_sample ADD COLUMN served_model TEXT;
ALTER TABLE usage_sample ADD COLUMN stream INT;
ALTER TABLE usage_sample ADD COLUMN cache_creation_input_tokens INT DEFAULT 0;
ALTER TABLE usage_sample ADD COLUMN cache_read_input_tokens INT DEFAULT 0;
CREATE TABLE IF NOT EXISTS policy_cooldown (
    model TEXT PRIMARY KEY, until REAL NOT NULL
);
