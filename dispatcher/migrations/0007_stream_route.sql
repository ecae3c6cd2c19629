-- Where a device's newest stream opened: the route tag (a u32) of the replica that issued its
-- stream_epoch, written by the same UPDATE. In cluster mode a replica that does not know where
-- a device is held asks the holder this names (protocol::subject explains the scheme); NULL
-- until the device first opens a stream.
ALTER TABLE devices ADD COLUMN stream_route BIGINT;
