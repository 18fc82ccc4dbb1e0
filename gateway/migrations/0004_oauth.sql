-- OAuth 2.1 for MCP clients that cannot send a header (SPEC §9).
--
-- A grant IS a key: an api_keys row of kind 'oauth', owned by the person who approved it, named
-- after the client, limited to one server and the `mcp` permission, and no broader than the key
-- that approved it. Scope, tool policy, usage records, the key list, revocation, disabling the
-- user and NOTIFY-based invalidation then work for grants exactly as for keys. Its secret_hash
-- is a marker no argon2 verification accepts: a grant is used only through its tokens.
ALTER TABLE api_keys
    ADD COLUMN kind text NOT NULL DEFAULT 'key' CHECK (kind IN ('key', 'oauth')),
    ADD COLUMN client_id text,
    ADD COLUMN client_name text;
-- Names stay unique among a user's live keys; grants are named after their client, and one
-- client may hold several (one per server, or approved again).
DROP INDEX api_keys_user_name;
CREATE UNIQUE INDEX api_keys_user_name ON api_keys (user_id, name)
    WHERE revoked_at IS NULL AND kind = 'key';

-- Clients registered dynamically (RFC 7591): public clients, identified by id only.
CREATE TABLE oauth_clients (
    id               text PRIMARY KEY,
    client_name      text NOT NULL,
    redirect_uris    text[] NOT NULL,
    registered_from  text NOT NULL,  -- the registering address, for operators
    created_at       timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE api_keys ADD CONSTRAINT api_keys_client FOREIGN KEY (client_id)
    REFERENCES oauth_clients (id);

-- A consent page waiting for its decision. The page carries a random token whose SHA-256 is
-- the id here; the decision reads redirect_uri and state from this row, never from the form.
CREATE TABLE oauth_requests (
    id_hash         bytea PRIMARY KEY,
    client_id       text NOT NULL REFERENCES oauth_clients (id),
    redirect_uri    text NOT NULL,
    state           text,
    code_challenge  text NOT NULL,
    server          text NOT NULL,
    expires_at      timestamptz NOT NULL,
    decided_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX oauth_requests_expiry ON oauth_requests (expires_at);

-- Authorization codes, stored as SHA-256 hashes; single use. grant_id is set by the exchange,
-- so a second use can revoke what the first one obtained.
CREATE TABLE oauth_codes (
    code_hash         bytea PRIMARY KEY,
    client_id         text NOT NULL REFERENCES oauth_clients (id),
    redirect_uri      text NOT NULL,
    code_challenge    text NOT NULL,
    approving_key_id  text NOT NULL REFERENCES api_keys (id),
    server            text NOT NULL,
    tools             text[],  -- the person's choice; NULL = every tool the approving key allows
    expires_at        timestamptz NOT NULL,
    used_at           timestamptz,
    grant_id          text REFERENCES api_keys (id),
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX oauth_codes_expiry ON oauth_codes (expires_at);

-- Access and refresh tokens, stored as SHA-256 hashes (a token carries 256 random bits, so a
-- fast hash is enough; argon2 is for keys). Each is bound to its grant's one server. A refresh
-- token is used once: used_at is set when it rotates, and presenting it again revokes the grant.
CREATE TABLE oauth_tokens (
    token_hash  bytea PRIMARY KEY,
    grant_id    text NOT NULL REFERENCES api_keys (id),
    kind        text NOT NULL CHECK (kind IN ('access', 'refresh')),
    server      text NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX oauth_tokens_grant ON oauth_tokens (grant_id);
CREATE INDEX oauth_tokens_expiry ON oauth_tokens (expires_at);
