-- Version 3: the model ccpd asked the serving lane for (the quota key of a sample; providers
-- may answer with another name, e.g. a dated one, in served_model).
ALTER TABLE usage_sample ADD COLUMN upstream_model TEXT;
