"""The running agent: one Trio nursery of supervised services (`spegla registry`), supervision
with backoff, and giving the heap back once the agent goes quiet.

Owns: the task tree and the order services start and stop in.
May import: every agent package but `cli` and `doctor`.
"""
