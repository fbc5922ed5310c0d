-- Nodes an operator declared gone for good (anvil-admin cluster remove):
-- their shards are to be rebuilt elsewhere at once rather than after
-- worker.dead_member_repair_after, and the repair workers (issue 5) find
-- them here.  Removing a node again keeps the first removal time.
CREATE TABLE removed_nodes (
    node_id TEXT PRIMARY KEY,
    removed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
