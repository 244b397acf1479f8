-- Version 4: what the providers last said about each lane's plan windows (utilisation, reset,
-- status, the warning threshold passed) and about the lane as a whole (plan_window 'unified':
-- status, reset and representative claim; 'overage_status': the overage status), so that a restart
-- decides from the same evidence as before it.
CREATE TABLE IF NOT EXISTS provider_reading (
    lane TEXT NOT NULL,
    plan_window TEXT NOT NULL,
    utilization REAL,
    reset_at REAL,
    status TEXT,
    observed_at REAL NOT NULL,
    source TEXT NOT NULL,
    surpassed_threshold REAL,
    claim TEXT,
    PRIMARY KEY (lane, plan_window)
);
