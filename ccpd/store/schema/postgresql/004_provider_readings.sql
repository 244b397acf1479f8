-- Version 4 on PostgreSQL: as ../004_provider_readings.sql.
CREATE TABLE IF NOT EXISTS provider_reading (
    lane TEXT NOT NULL,
    plan_window TEXT NOT NULL,
    utilization DOUBLE PRECISION,
    reset_at DOUBLE PRECISION,
    status TEXT,
    observed_at DOUBLE PRECISION NOT NULL,
    source TEXT NOT NULL,
    surpassed_threshold DOUBLE PRECISION,
    claim TEXT,
    PRIMARY KEY (lane, plan_window)
);
