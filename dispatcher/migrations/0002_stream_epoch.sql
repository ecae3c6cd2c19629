-- Stream fencing: each stream a device opens gets the next value of its counter, handed out by
-- one UPDATE so that replicas sharing the database never issue the same epoch twice.
ALTER TABLE devices ADD COLUMN stream_epoch BIGINT NOT NULL DEFAULT 0;
