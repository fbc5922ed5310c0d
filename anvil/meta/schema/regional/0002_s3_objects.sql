-- What the S3 API needs beyond the initial schema: inline contents, parts
-- counts of multipart objects, release times for the garbage collector, an
-- index to walk multipart uploads in S3 order, and the key successor
-- function listings use to skip past common prefixes.

-- Listings compare keys character by character (substr, strpos, chr) and
-- rely on UTF-8 code point order being byte order; S3 keys are UTF-8.
DO $$
BEGIN
    IF current_setting('server_encoding') <> 'UTF8' THEN
        RAISE EXCEPTION 'The regional database must use the UTF8 encoding, not %',
            current_setting('server_encoding');
    END IF;
END
$$;

-- Small contents are kept here instead of in shard files: an fsync-bound
-- shard commit would cap small PUTs, and PostgreSQL already is the
-- durability anchor of every object's metadata.
ALTER TABLE contents ADD COLUMN inline_data BYTEA;

-- When refcount last dropped to zero.  The collector removes a content
-- (row and shards) only some time after that, so that a writer that found
-- the content present and skipped storing its own copy (dedup) is not
-- robbed of it between its check and its commit.
ALTER TABLE contents ADD COLUMN released_at TIMESTAMPTZ;
CREATE INDEX contents_released ON contents (released_at) WHERE refcount = 0;

-- Listings walk the partial unique index objects_live_key (bucket_id, key
-- COLLATE "C" of live rows).  The full index beside it also holds every
-- replaced and deleted row, and the planner, seeing two equal indexes,
-- would sometimes walk that one and step over dead rows.
DROP INDEX objects_listing;

-- NULL for objects written in one PUT.
ALTER TABLE objects ADD COLUMN parts_count INTEGER
    CHECK (parts_count BETWEEN 1 AND 10000);

-- ListMultipartUploads walks (key, upload id) in byte order; upload ids are
-- compared as S3 says, lexicographically, whatever the database collation
-- (they start with their initiation time, so this is also initiation
-- order).  The (key, created_at) index it replaces tempted the planner
-- into sorting each key's uploads at every step of the walk.
CREATE INDEX multipart_uploads_walk
    ON multipart_uploads (bucket_id, key, upload_id COLLATE "C");
DROP INDEX multipart_uploads_listing;

-- The smallest string greater than every string starting with s (NULL when
-- there is none): the last character that is not U+10FFFF is incremented
-- (skipping the surrogates, which are not characters) and what follows it
-- dropped.  "key >= anvil_key_successor(p)" is "key does not start with p"
-- for keys above p, as an index range.
CREATE FUNCTION anvil_key_successor(s TEXT) RETURNS TEXT
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    c INTEGER;
BEGIN
    WHILE s <> '' LOOP
        c := ascii(right(s, 1));
        IF c < 1114111 THEN
            IF c = 55295 THEN
                c := 57344;
            ELSE
                c := c + 1;
            END IF;
            RETURN left(s, -1) || chr(c);
        END IF;
        s := left(s, -1);
    END LOOP;
    RETURN NULL;
END
$$;
