-- Server-side functions for the two statements of every small-object
-- request.  A PutObject was four round trips (BEGIN, the content upsert,
-- the swap of the key's live row, COMMIT), and PostgreSQL planned its two
-- large statements afresh each time: planning cost more than executing.
-- Statements inside a PL/pgSQL function are prepared once per session and
-- their plans cached, and the whole function runs as one statement (one
-- round trip, its own transaction: an error undoes everything it did).

-- PutObject's transaction (anvil.meta.objects.ObjectStore.put_object):
-- take the key's advisory lock, add one reference per manifest piece to
-- each content (creating the missing ones; rows are locked in hash order,
-- the arrays come sorted), check that the contents the caller did not
-- store itself already existed, then soft-delete the key's live row,
-- insert the new one and drop the old row's references.
--
-- Returns one row: how many contents the old row should have released and
-- how many it did (a mismatch means a content row is missing), whether a
-- row was inserted, and the old row's columns (NULLs when there was none).
-- A required content that did not exist raises SQLSTATE P0001 with the
-- HINT 'anvil:content-missing' and the missing hashes, comma-separated,
-- as DETAIL; nothing is changed then.
CREATE FUNCTION anvil_put_object(
    p_bucket_id BIGINT, p_key TEXT, p_size BIGINT, p_etag TEXT, p_content_type TEXT,
    p_user_metadata JSONB, p_system_metadata JSONB, p_checksums JSONB, p_manifest JSONB,
    p_last_modified TIMESTAMPTZ, p_parts_count INTEGER,
    p_hashes TEXT[], p_sizes BIGINT[], p_ks INTEGER[], p_ms INTEGER[], p_stripes INTEGER[],
    p_maps JSONB[], p_inline BYTEA[], p_refs INTEGER[], p_required TEXT[]
) RETURNS TABLE (
    r_expected BIGINT, r_released BIGINT, r_inserted BIGINT,
    o_bucket_id BIGINT, o_key TEXT, o_size BIGINT, o_etag TEXT, o_content_type TEXT,
    o_user_metadata JSONB, o_system_metadata JSONB, o_checksums JSONB, o_manifest JSONB,
    o_last_modified TIMESTAMPTZ, o_parts_count INTEGER
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    missing TEXT[];
BEGIN
    -- Serialises the writers of one key until the end of the transaction.
    PERFORM pg_advisory_xact_lock(hashtextextended(p_key, p_bucket_id));
    IF cardinality(p_hashes) > 0 THEN
        WITH up AS (
            INSERT INTO contents AS c (hash, size, k, m, stripe_size, shard_map, inline_data, refcount)
            SELECT v.hash, v.size, v.k, v.m, v.stripe_size, v.shard_map, v.inline_data, v.refs
              FROM unnest(p_hashes, p_sizes, p_ks, p_ms, p_stripes, p_maps, p_inline, p_refs)
                   AS v(hash, size, k, m, stripe_size, shard_map, inline_data, refs)
             ORDER BY v.hash
            ON CONFLICT (hash) DO UPDATE
               SET refcount = c.refcount + EXCLUDED.refcount, released_at = NULL
            RETURNING c.hash, (c.xmax = 0) AS inserted
        )
        SELECT array_agg(up.hash ORDER BY up.hash) INTO missing
          FROM up
         WHERE up.inserted AND up.hash = ANY(p_required);
        IF missing IS NOT NULL THEN
            RAISE EXCEPTION 'contents missing: %', array_to_string(missing, ',')
                USING ERRCODE = 'P0001', HINT = 'anvil:content-missing',
                      DETAIL = array_to_string(missing, ',');
        END IF;
    END IF;
    RETURN QUERY
    WITH old AS (
        UPDATE objects o SET deleted_at = now()
         WHERE o.bucket_id = p_bucket_id AND o.key = p_key AND o.deleted_at IS NULL
        RETURNING o.bucket_id, o.key, o.size, o.etag, o.content_type, o.user_metadata,
                  o.system_metadata, o.checksums, o.manifest, o.last_modified, o.parts_count
    ),
    new AS (
        INSERT INTO objects (bucket_id, key, size, etag, content_type, user_metadata,
                             system_metadata, checksums, manifest, last_modified, parts_count)
        VALUES (p_bucket_id, p_key, p_size, p_etag, p_content_type, p_user_metadata,
                p_system_metadata, p_checksums, p_manifest, p_last_modified, p_parts_count)
        RETURNING id
    ),
    net AS (
        SELECT e->>'hash' AS hash, count(*)::int AS n
          FROM old, jsonb_array_elements(old.manifest) e
         GROUP BY 1
    ),
    locked AS (
        SELECT c.hash FROM contents c
         WHERE c.hash = ANY(ARRAY(SELECT net.hash FROM net))
         ORDER BY c.hash
           FOR UPDATE
    ),
    released AS (
        UPDATE contents c
           SET refcount = c.refcount - r.n,
               released_at = CASE WHEN c.refcount = r.n THEN now() ELSE c.released_at END
          FROM net r
         WHERE c.hash = ANY(ARRAY(SELECT locked.hash FROM locked)) AND c.hash = r.hash
        RETURNING c.hash
    )
    SELECT (SELECT count(*) FROM net), (SELECT count(*) FROM released), (SELECT count(*) FROM new),
           old.bucket_id, old.key::TEXT, old.size, old.etag, old.content_type, old.user_metadata,
           old.system_metadata, old.checksums, old.manifest, old.last_modified, old.parts_count
      FROM (SELECT 1) one LEFT JOIN old ON TRUE;
END
$$;

-- GetObject's lookup (ObjectStore.get_object_with_contents): the live row
-- of a key and the contents its manifest names, from one snapshot.  The
-- first kind of row has the object columns and NULL content columns, the
-- second kind the reverse; each content comes once.
CREATE FUNCTION anvil_get_object(p_bucket_id BIGINT, p_key TEXT)
RETURNS TABLE (
    o_bucket_id BIGINT, o_key TEXT, o_size BIGINT, o_etag TEXT, o_content_type TEXT,
    o_user_metadata JSONB, o_system_metadata JSONB, o_checksums JSONB, o_manifest JSONB,
    o_last_modified TIMESTAMPTZ, o_parts_count INTEGER,
    c_hash TEXT, c_size BIGINT, c_k INTEGER, c_m INTEGER, c_stripe_size INTEGER,
    c_shard_map JSONB, c_inline_data BYTEA
)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    WITH o AS (
        SELECT ob.bucket_id, ob.key, ob.size, ob.etag, ob.content_type, ob.user_metadata,
               ob.system_metadata, ob.checksums, ob.manifest, ob.last_modified, ob.parts_count
          FROM objects ob
         WHERE ob.bucket_id = p_bucket_id AND ob.key = p_key AND ob.deleted_at IS NULL
    )
    SELECT o.bucket_id, o.key::TEXT, o.size, o.etag, o.content_type, o.user_metadata,
           o.system_metadata, o.checksums, o.manifest, o.last_modified, o.parts_count,
           NULL::TEXT, NULL::BIGINT, NULL::INTEGER, NULL::INTEGER, NULL::INTEGER,
           NULL::JSONB, NULL::BYTEA
      FROM o
    UNION ALL
    -- = ANY(ARRAY(...)): the hashes become one array and the contents are
    -- read through their primary key, never by a join over the table.
    SELECT NULL::BIGINT, NULL::TEXT, NULL::BIGINT, NULL::TEXT, NULL::TEXT, NULL::JSONB,
           NULL::JSONB, NULL::JSONB, NULL::JSONB, NULL::TIMESTAMPTZ, NULL::INTEGER,
           c.hash, c.size, c.k, c.m, c.stripe_size, c.shard_map, c.inline_data
      FROM contents c
     WHERE c.hash = ANY(ARRAY(SELECT e->>'hash' FROM o, jsonb_array_elements(o.manifest) e));
END
$$;
