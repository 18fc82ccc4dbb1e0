-- Browser origins a key may be used from (SPEC §4): NULL = any (or none: requests without an
-- Origin header are never affected); otherwise a list of origins like 'https://app.example.com'.
ALTER TABLE api_keys ADD COLUMN allowed_origins text[];
