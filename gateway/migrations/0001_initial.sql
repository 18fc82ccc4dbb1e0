-- Workspaces hold users; users hold keys. Ids are public, URL-safe, and never contain '-'.
CREATE TABLE workspaces (
    id          text PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id            text PRIMARY KEY,
    workspace_id  text NOT NULL REFERENCES workspaces (id),
    email         text NOT NULL,
    display_name  text NOT NULL DEFAULT '',
    role          text NOT NULL CHECK (role IN ('admin', 'member')),
    is_active     boolean NOT NULL DEFAULT true,
    is_bootstrap  boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz
);
-- An email is unique among a workspace's users that have not been deleted.
CREATE UNIQUE INDEX users_workspace_email ON users (workspace_id, lower(email))
    WHERE deleted_at IS NULL;

-- A member reaches only the servers granted here; '*' grants every configured server.
CREATE TABLE server_grants (
    user_id     text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    server      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, server)
);

CREATE TABLE api_keys (
    id                  text PRIMARY KEY,
    user_id             text NOT NULL REFERENCES users (id),
    workspace_id        text NOT NULL REFERENCES workspaces (id),
    name                text NOT NULL,
    description         text NOT NULL DEFAULT '',
    servers             text[] NOT NULL,
    permissions         text[] NOT NULL,
    valid_from          timestamptz,
    expires_at          timestamptz,
    is_active           boolean NOT NULL DEFAULT true,
    -- argon2id hash of the full key; the key itself is never stored.
    secret_hash         text NOT NULL,
    secret_prefix       text NOT NULL,
    -- After a rotation the previous secret may keep working until previous_expires_at.
    previous_hash       text,
    previous_expires_at timestamptz,
    rate_limit          jsonb,
    allowed_cidrs       text[],
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    last_used_at        timestamptz,
    revoked_at          timestamptz
);
-- Names are unique among a user's live (not revoked) keys.
CREATE UNIQUE INDEX api_keys_user_name ON api_keys (user_id, name) WHERE revoked_at IS NULL;
CREATE INDEX api_keys_workspace ON api_keys (workspace_id, created_at DESC);

CREATE TABLE audit_events (
    id             bigserial PRIMARY KEY,
    workspace_id   text NOT NULL REFERENCES workspaces (id),
    actor_user_id  text,
    actor_key_id   text,
    action         text NOT NULL,
    target_type    text NOT NULL,
    target_id      text NOT NULL,
    changes        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_events_workspace ON audit_events (workspace_id, id DESC);
