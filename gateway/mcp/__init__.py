"""MCP awareness: which tools a key may call.

Pure parts, each a function of its input: `patterns` (tool patterns and the effective policy),
`inspect` (a request body in, a decision out) and `listing` (tools/list answers filtered, in
JSON bodies and SSE events). `guard` is the one seam the data plane talks to.
"""
