"""Where a blob's bytes should come from: provider supply for one request (the 20 ms x 3 resolve),
attempts, claims in a burst (one node goes upstream), provider choice and upload slots, and this
node's own downloads (no loops in a burst's tree).

Owns: the decisions and Trio drivers that turn a Router lookup into "fetch from this peer", "wait
for that claimant" or "give up".
May import: `registry.oci`, `registry.auth`, `registry.http` and the shared seams; never `mirror`
or `serve`.
"""
