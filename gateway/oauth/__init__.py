"""OAuth 2.1 for MCP clients that cannot send a header (SPEC §9).

Keystile is the flow's authorization server and resource server. A client discovers it
(`metadata`), registers (`registration`), sends a person to the consent page (`authorize`,
`page`), exchanges the code and refreshes (`token`), and may revoke (`revoke`); `store` holds
the SQL and `endpoints` routes the data plane's OAuth paths to them.

What the flow produces is a grant, and a grant IS a key: an api_keys row of kind "oauth", no
broader than the key that approved it (gateway.narrowing), used through short-lived access
tokens that gateway.auth verifies on the key cache path. So a request made with a token yields
the same Principal a key's does, and scope, tool policy, usage, the key list, revocation and
invalidation need no OAuth-specific branch; what does differ (a token is bound to its one
server, and refused with 401 elsewhere) is decided in gateway.auth and gateway.policy.
"""
