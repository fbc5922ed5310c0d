-- What the garbage collector (anvil.worker.gc) needs to find its work
-- through indexes instead of reading whole tables on every pass.

-- Stale multipart uploads, oldest first.
CREATE INDEX multipart_uploads_created ON multipart_uploads (created_at);

-- Whether a deleted bucket still has soft-deleted object rows.  Partial on
-- dead rows only: its predicate contradicts every listing's
-- "deleted_at IS NULL", so the planner can never walk it for a listing
-- (the reason 0002 dropped the full (bucket_id, key) index).
CREATE INDEX objects_dead_bucket ON objects (bucket_id) WHERE deleted_at IS NOT NULL;
