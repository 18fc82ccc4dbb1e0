-- Which tools a key, and a user, may call (SPEC §6): NULL = every tool of the servers in
-- scope; otherwise patterns '<server>/<tool>' with '*' and a leading '!' to exclude.
ALTER TABLE api_keys ADD COLUMN tools text[];
ALTER TABLE users ADD COLUMN tools text[];
