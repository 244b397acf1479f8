-- Version 2 on PostgreSQL: as ../002_cache_tokens_and_cooldowns.sql.
ALTER TABLE usage_sample ADD COLUMN served_model TEXT;
ALTER TABLE usage_sample ADD COLUMN stream INT;
ALTER TABLE usage_sample ADD COLUMN cache_creation_input_tokens BIGINT DEFAULT 0;
ALTER TABLE usage_sample ADD COLUMN cache_read_input_tokens BIGINT DEFAULT 0;
CREATE TABLE IF NOT EXISTS policy_cooldown (
    model TEXT PRIMARY KEY, until DOUBLE PRECISION NOT NULL
);
