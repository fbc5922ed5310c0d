-- Regional metadata, shared by the nodes of one region (ARCHITECTURE §3):
-- objects, the content they are made of (with erasure parameters and shard
-- maps), and multipart uploads with their parts.  Buckets live in the global
-- database, so bucket_id columns cannot carry foreign keys.

-- Keys use COLLATE "C" so that ORDER BY key is UTF-8 byte order, as S3
-- listings require, and prefix scans are plain b-tree ranges.
CREATE TABLE objects (
    id BIGSERIAL PRIMARY KEY,
    bucket_id BIGINT NOT NULL,
    key TEXT COLLATE "C" NOT NULL,
    size BIGINT NOT NULL CHECK (size >= 0),
    etag TEXT NOT NULL,
    content_type TEXT NOT NULL DEFAULT 'binary/octet-stream',
    user_metadata JSONB NOT NULL DEFAULT '{}'::JSONB,
    -- content-disposition, content-encoding, cache-control, expires
    system_metadata JSONB NOT NULL DEFAULT '{}'::JSONB,
    checksums JSONB NOT NULL DEFAULT '{}'::JSONB,
    -- Ordered list of content parts: [{"hash", "offset", "length"}, ...]
    manifest JSONB NOT NULL DEFAULT '[]'::JSONB,
    last_modified TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at TIMESTAMPTZ
);

-- One live object per key; replaced and deleted versions stay as
-- soft-deleted rows until the garbage collector removes them.
CREATE UNIQUE INDEX objects_live_key ON objects (bucket_id, key) WHERE deleted_at IS NULL;
CREATE INDEX objects_listing ON objects (bucket_id, key COLLATE "C");
CREATE INDEX objects_deleted_at ON objects (deleted_at) WHERE deleted_at IS NOT NULL;

-- Content-addressed data: identical bytes in a region are stored once.
-- refcount counts the object rows and multipart parts that use it; the
-- delete-object task removes shards once it reaches zero.
CREATE TABLE contents (
    hash TEXT PRIMARY KEY CHECK (hash ~ '^[0-9a-f]{64}$'),
    size BIGINT NOT NULL CHECK (size >= 0),
    k INTEGER NOT NULL CHECK (k > 0),
    m INTEGER NOT NULL CHECK (m >= 0),
    stripe_size INTEGER NOT NULL CHECK (stripe_size > 0),
    -- The placement chosen at write time: which node (and disk) holds each
    -- shard index.
    shard_map JSONB NOT NULL DEFAULT '{}'::JSONB,
    refcount INTEGER NOT NULL DEFAULT 0 CHECK (refcount >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX contents_unreferenced ON contents (created_at) WHERE refcount = 0;

CREATE TABLE multipart_uploads (
    upload_id TEXT PRIMARY KEY,
    bucket_id BIGINT NOT NULL,
    key TEXT COLLATE "C" NOT NULL,
    -- Content type, user and system metadata and checksum algorithm given
    -- at CreateMultipartUpload, applied to the object at completion.
    metadata JSONB NOT NULL DEFAULT '{}'::JSONB,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    state TEXT NOT NULL DEFAULT 'active'
        CHECK (state IN ('active', 'completing', 'completed', 'aborted'))
);

-- ListMultipartUploads orders by key, then initiation time.
CREATE INDEX multipart_uploads_listing ON multipart_uploads (bucket_id, key, created_at);

CREATE TABLE multipart_parts (
    upload_id TEXT NOT NULL REFERENCES multipart_uploads (upload_id) ON DELETE CASCADE,
    part_number INTEGER NOT NULL CHECK (part_number BETWEEN 1 AND 10000),
    content_hash TEXT NOT NULL,
    size BIGINT NOT NULL CHECK (size >= 0),
    etag TEXT NOT NULL,
    checksums JSONB NOT NULL DEFAULT '{}'::JSONB,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (upload_id, part_number)
);
