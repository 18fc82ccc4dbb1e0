-- Call records (SPEC §7): one row per data-plane request made with a verified key, written in
-- batches with COPY behind the request path (gateway.usage_store.write_calls). Who, what, how
-- it went and from where; never arguments, bodies or header values: there is no column for
-- them.
--
-- No foreign keys: a record is history, written after the fact in bulk, and must never be
-- refused (or slow a COPY of thousands of rows) because of the state of the key it names.
-- Keys and users are never hard-deleted, so the ids always resolve anyway.
CREATE TABLE calls (
    -- Increasing in arrival order of the batches: /api/calls pages newest first by id.
    id            bigserial PRIMARY KEY,
    time          timestamptz NOT NULL,
    request_id    text NOT NULL,
    workspace_id  text NOT NULL,
    user_id       text NOT NULL,
    key_id        text NOT NULL,
    route         text NOT NULL CHECK (route IN ('mcp', 'chat', 'me')),
    server        text,
    mcp_method    text,
    tool          text,
    status        smallint NOT NULL,
    duration_ms   double precision NOT NULL,
    bytes_in      bigint NOT NULL,
    bytes_out     bigint NOT NULL,
    client        text NOT NULL
);
-- An admin's page of the whole workspace, newest first (GET /api/calls with no filter): a
-- backward scan that stops after `limit` rows, however many workspaces share the table.
CREATE INDEX calls_workspace ON calls (workspace_id, id);
-- A member's pages (always limited to their own user) and an admin's ?user_id= filter.
CREATE INDEX calls_user ON calls (user_id, id);
-- One key's calls (?key_id=), the question an audit of a key asks.
CREATE INDEX calls_key ON calls (key_id, id);
-- Who called a given tool (?tool=): a rare tool would otherwise mean walking the whole
-- workspace's history to fill a page. Partial: chat and non-tool MCP requests have no tool.
CREATE INDEX calls_tool ON calls (workspace_id, tool, id) WHERE tool IS NOT NULL;
-- Retention: pruning takes the oldest rows in bounded batches (gateway.usage_store.prune).
-- Rows arrive in time order, so this index only ever grows at its right edge.
CREATE INDEX calls_time ON calls (time);

-- Hourly roll-ups of the same records, written in the same transaction as the raw rows, so
-- GET /api/usage never reads the raw table: one key over 7 days is at most 168 hours times
-- the (server, tool, status) combinations the key used, whatever the request volume.
-- '' stands for "none" in server and tool (chat and /me requests, MCP requests that are not
-- tool calls) because primary-key columns cannot be NULL; the API shows them as null.
-- user_id is not in the key: a key never changes owner, so it is fixed by key_id.
-- d0..d15 count requests per duration bucket: d<i> holds durations in
-- (DURATION_BUCKETS_MS[i-1], DURATION_BUCKETS_MS[i]] of gateway/calls.py (d0 from 0, d15
-- open-ended), which is what p50/p95 are estimated from (gateway.calls.percentile_ms).
CREATE TABLE usage_hourly (
    hour          timestamptz NOT NULL,  -- the start of the UTC hour
    workspace_id  text NOT NULL,
    key_id        text NOT NULL,
    user_id       text NOT NULL,
    server        text NOT NULL,
    tool          text NOT NULL,
    status        smallint NOT NULL,
    requests      bigint NOT NULL,
    errors        bigint NOT NULL,  -- requests with status >= 400
    bytes_in      bigint NOT NULL,
    bytes_out     bigint NOT NULL,
    d0 integer NOT NULL, d1 integer NOT NULL, d2 integer NOT NULL, d3 integer NOT NULL,
    d4 integer NOT NULL, d5 integer NOT NULL, d6 integer NOT NULL, d7 integer NOT NULL,
    d8 integer NOT NULL, d9 integer NOT NULL, d10 integer NOT NULL, d11 integer NOT NULL,
    d12 integer NOT NULL, d13 integer NOT NULL, d14 integer NOT NULL, d15 integer NOT NULL,
    -- The upsert's conflict target, and the range scan for one key over a window
    -- (?key_id=, the usage view of a key): key first, then hour.
    PRIMARY KEY (workspace_id, key_id, hour, server, tool, status)
) WITH (fillfactor = 90);  -- room on each page so the counter updates stay HOT (no index writes)
-- A member's usage (every key of their own user) and an admin's ?user_id= filter.
CREATE INDEX usage_hourly_user ON usage_hourly (workspace_id, user_id, hour);
-- An admin's usage of the whole workspace over a window.
CREATE INDEX usage_hourly_workspace ON usage_hourly (workspace_id, hour);
-- Retention: the oldest hours of every workspace at once, in bounded batches.
CREATE INDEX usage_hourly_hour ON usage_hourly (hour);
