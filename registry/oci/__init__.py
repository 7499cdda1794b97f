"""The OCI distribution protocol, pure: request paths, references, digests, ranges, media types,
and which references this node serves (filters).

Owns: every decision about what a request or a reference means, without I/O.
May import: nothing else of `registry` (only the standard library).
"""
