-- Version 3 on PostgreSQL: as ../003_upstream_model.sql.
ALTER TABLE usage_sample ADD COLUMN upstream_model TEXT;
