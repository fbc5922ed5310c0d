-- Global metadata, shared by every node of every region (ARCHITECTURE §3):
-- regions, tenants, apps and their policies, buckets, the task queue (§7),
-- the cluster CA and cluster-wide settings.

CREATE TABLE regions (
    name TEXT PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE tenants (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- An app is a set of S3 credentials belonging to a tenant.  SigV4 needs the
-- secret itself, so it is stored encrypted (AES-256-GCM under
-- ANVIL_SECRET_ENCRYPTION_KEY, bound to the client id), not hashed.
CREATE TABLE apps (
    id BIGSERIAL PRIMARY KEY,
    tenant_id BIGINT NOT NULL REFERENCES tenants (id),
    name TEXT NOT NULL UNIQUE,
    client_id TEXT NOT NULL UNIQUE,
    secret_ciphertext BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    secret_rotated_at TIMESTAMPTZ
);

CREATE INDEX apps_tenant_id ON apps (tenant_id);

CREATE TABLE policies (
    id BIGSERIAL PRIMARY KEY,
    app_id BIGINT NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    action TEXT NOT NULL,
    resource TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (app_id, action, resource)
);

-- Bucket names are globally unique among live buckets only: a soft-deleted
-- bucket keeps its row (and id) until the delete-bucket task has removed its
-- objects, while the name is already free for someone else.
CREATE TABLE buckets (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    tenant_id BIGINT NOT NULL REFERENCES tenants (id),
    region TEXT NOT NULL REFERENCES regions (name),
    public BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at TIMESTAMPTZ
);

CREATE UNIQUE INDEX buckets_live_name ON buckets (name) WHERE deleted_at IS NULL;
CREATE INDEX buckets_tenant_id ON buckets (tenant_id) WHERE deleted_at IS NULL;

-- The task queue.  Workers claim pending rows whose run_after has passed
-- with SELECT ... FOR UPDATE SKIP LOCKED, hold a lease while running, and
-- park a task as 'failed' after max_attempts.  region is NULL for tasks any
-- region's workers may run.
CREATE TABLE tasks (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    payload JSONB NOT NULL DEFAULT '{}'::JSONB,
    region TEXT,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'running', 'done', 'failed', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts INTEGER NOT NULL DEFAULT 10 CHECK (max_attempts > 0),
    run_after TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_owner TEXT,
    lease_expires_at TIMESTAMPTZ,
    last_error TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX tasks_claim ON tasks (state, run_after);
-- Finding expired leases of crashed workers without scanning finished tasks.
CREATE INDEX tasks_running_lease ON tasks (lease_expires_at) WHERE state = 'running';

-- The cluster CA (ARCHITECTURE §6): at most one row, its private key
-- encrypted like app secrets.
CREATE TABLE cluster_ca (
    id BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    cert_pem TEXT NOT NULL,
    key_ciphertext BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Cluster-wide settings; 'secret_key_check' holds a value encrypted under
-- ANVIL_SECRET_ENCRYPTION_KEY so a node with the wrong key refuses to start.
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
