"""`spegla doctor`: probes gather facts on the node, pure checks judge them.

Owns: the doctor report.
May import: every agent package below it (`containerd`, `observability`, `node`, `advertising`).
"""
